"""The `tunefetch` command line. Bad input: one line on stderr, non-zero exit, no traceback.

Heavy libraries (Ray, vLLM, torch) are imported inside the commands that need them, so
`tunefetch --help` and the small verbs answer in a second.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from cluster.config import TunefetchConfig, load_config
from cluster.errors import UserError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UserError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", type=Path, default=argparse.SUPPRESS,
                        help="state directory (default: $TUNEFETCH_HOME or ./.tunefetch)")
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="tunefetch YAML config")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    parser = _Parser(prog="tunefetch", parents=[common],
                     description="Tune or fetch: LoRA fine-tuning, versioned knowledge stores, multi-LoRA serving.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str):
        return sub.add_parser(name, help=help, parents=[common], description=help)

    p = command("demo", "build, ingest, train, serve and query the sample domain end to end")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: serving.port)")

    p = command("ingest", "write a new version of a knowledge store from files, directories or globs")
    p.add_argument("paths", nargs="+")
    p.add_argument("--kb", required=True, help="knowledge store name")
    p.add_argument("--full", action="store_true", help="re-embed every chunk (default: reuse unchanged ones)")
    p.add_argument("--text-field", default="text", help="JSONL: field holding the text")
    p.add_argument("--id-field", default="id", help="JSONL: field holding the record id (default: line number)")
    p.add_argument("--metadata-field", action="append", default=[], help="JSONL: fields kept as metadata")

    p = command("kb", "inspect and roll back knowledge stores")
    kb = p.add_subparsers(dest="kb_command", required=True, parser_class=_Parser)
    kb.add_parser("list", parents=[common], help="stores and their current versions")
    kb.add_parser("versions", parents=[common], help="versions of one store").add_argument("name")
    rb = kb.add_parser("rollback", parents=[common], help="point a store back at an older version")
    rb.add_argument("name")
    rb.add_argument("--to", default=None, help="version (vN); default: the one before the current")

    p = command("search", "retrieval only: top hits of a store")
    p.add_argument("text")
    p.add_argument("--kb", required=True)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE")

    p = command("train", "LoRA fine-tune from a train YAML and register the adapter")
    p.add_argument("train_config", type=Path)
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")

    p = command("submit", "submit a job to a remote Ray cluster (Ray Jobs API) and stream its logs")
    sj = p.add_subparsers(dest="submit_command", required=True, parser_class=_Parser)
    st = sj.add_parser("train", parents=[common], help="a training run: `tunefetch train CONFIG` on the cluster")
    st.add_argument("train_config", type=Path)
    st.add_argument("--address", required=True, help="Ray job server, e.g. http://127.0.0.1:8265")

    p = command("adapters", "the adapter registry")
    ad = p.add_subparsers(dest="adapters_command", required=True, parser_class=_Parser)
    ad.add_parser("list", parents=[common], help="every adapter version")
    ad.add_parser("show", parents=[common], help="one version's record and model card").add_argument("ref")

    p = command("serve", "run the Ray Serve application in the foreground")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--print-serve-config", action="store_true",
                   help="print the Serve config (YAML) a KubeRay RayService deploys, and exit")

    p = command("query", "ask a running server")
    p.add_argument("question")
    p.add_argument("--model", default=None, help="base model id, adapter NAME or NAME@vN (default: base)")
    p.add_argument("--kb", default=None, help="retrieve from this knowledge store")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--url", default=None, help="server URL (default: from serving.host/port)")

    p = command("eval", "evaluations")
    ev = p.add_subparsers(dest="eval_command", required=True, parser_class=_Parser)
    er = ev.add_parser("retrieval", parents=[common], help="recall@k, MRR and nDCG@10 of a store against qrels")
    er.add_argument("--kb", required=True)
    er.add_argument("--qrels", required=True, type=Path,
                    help="JSONL {id, question, doc_ids} or a BEIR folder / qrels .tsv")
    er.add_argument("--k", type=int, action="append", default=None, help="cut-offs (default: 1 3 5 10)")
    er.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")

    p = command("provenance", "lineage records of answers")
    pv = p.add_subparsers(dest="provenance_command", required=True, parser_class=_Parser)
    pl = pv.add_parser("list", parents=[common], help="recent records, newest first")
    pl.add_argument("--limit", type=int, default=20)
    ps = pv.add_parser("show", parents=[common], help="one record")
    ps.add_argument("id")
    ps.add_argument("--json", action="store_true")
    return parser


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    # SIGTERM unwinds like Ctrl-C, so an interrupted ingest or training cleans up after itself.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = build_parser().parse_args(argv)
        config = _config(args)
        if args.command == "train" and args.address:
            config = config.model_copy(update={"ray": config.ray.model_copy(update={"address": args.address})})
        from cluster import commands, runtime

        runtime.configure_process(config)

        return getattr(commands, f"cmd_{args.command}")(args, config) or 0
    except UserError as exc:
        print(f"tunefetch: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("tunefetch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI never shows a raw traceback by default
        if debug:
            raise
        print(f"tunefetch: internal error: {exc.__class__.__name__}: {exc} (rerun with --debug)", file=sys.stderr)
        return 1


def _config(args: argparse.Namespace) -> TunefetchConfig:
    # TUNEFETCH_HOME is the one documented variable; read here, at the edge, and nowhere else.
    home = getattr(args, "home", None) or os.environ.get("TUNEFETCH_HOME") or None
    return load_config(getattr(args, "config", None), Path(home) if home else None)


def print_json(data) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


if __name__ == "__main__":
    sys.exit(main())
