"""The `tunefetch` command line. Bad input: one line on stderr, non-zero exit, no traceback.

Each verb lives in a module of tunefetch/commands/ that adds its parsers and handlers; heavy
libraries (Ray, vLLM, torch) are imported inside the handlers, so `--help`, `--version` and
the small verbs answer at once.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from cluster.config import TunefetchConfig, load_config
from cluster.errors import UserError
from cluster.runtime import configure_process
from tunefetch import __version__
from tunefetch.commands import demo, evaluation, governance, keys, operations, provenance, serving, stores, training
from tunefetch.console import Console

EXIT_USER_ERROR = 2
_COMMAND_MODULES = (demo, stores, training, serving, evaluation, provenance, governance, operations, keys)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UserError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", type=Path, default=argparse.SUPPRESS,
                        help="state directory (default: $TUNEFETCH_HOME or ./.tunefetch)")
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="tunefetch YAML config (default: $TUNEFETCH_CONFIG, else built-in defaults)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of internal errors")
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="show framework output (Ray, vLLM, DeepSpeed) instead of writing it to HOME/logs")

    parser = _Parser(prog="tunefetch", parents=[common],
                     description="Tune or fetch: LoRA fine-tuning, versioned knowledge stores, multi-LoRA serving.")
    parser.add_argument("--version", action="version", version=f"tunefetch {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def command(parent, name: str, help: str, handler=None, json: str | None = None):
        """A (sub)command with the common flags; `json` is the help of its --json flag."""
        p = parent.add_parser(name, help=help, description=help, parents=[common])
        if json:
            p.add_argument("--json", action="store_true", help=json)
        if handler:
            p.set_defaults(handler=handler)
        return p

    for module in _COMMAND_MODULES:
        module.add_parsers(sub, command)
    return parser


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    console = Console(verbose="--verbose" in argv or "-v" in argv)
    # SIGTERM unwinds like Ctrl-C, so an interrupted ingest or training cleans up after itself.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        args = build_parser().parse_args(argv)
        config = _config(args)
        configure_process(config)  # before anything imports Ray
        return args.handler(args, config, console) or 0
    except UserError as exc:
        console.info(f"tunefetch: error: {exc}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        console.info("tunefetch: interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI never shows a raw traceback by default
        if debug:
            raise
        where = f"; framework log: {console.log_path}" if console.log_path else ""
        console.info(f"tunefetch: internal error: {exc.__class__.__name__}: {exc} (rerun with --debug{where})")
        return 1


def _config(args: argparse.Namespace) -> TunefetchConfig:
    return load_config(getattr(args, "config", None), home=getattr(args, "home", None))


if __name__ == "__main__":
    sys.exit(main())
