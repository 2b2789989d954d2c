"""Provenance: `provenance list|show`, the lineage of answers."""

from __future__ import annotations

import time
from argparse import Namespace

from cluster.config import TunefetchConfig
from cluster.errors import UserError
from tunefetch.console import Console


def add_parsers(sub, command) -> None:
    p = command(sub, "provenance", "lineage records of answers")
    pv = p.add_subparsers(dest="provenance_command", required=True, metavar="ACTION")
    p = command(pv, "list", "recent records, newest first (the id first on each line)",
                handler=provenance_list, json="print JSON")
    p.add_argument("--limit", type=int, default=20, help="records to show (default: 20)")
    p = command(pv, "show", "one record: adapter -> training run -> dataset; chunks -> sources",
                handler=provenance_show, json="print the record as JSON")
    p.add_argument("id", help="a provenance id (prov-...), as answers carry it")
    p = command(pv, "refusals", "requests a guard policy refused, newest first (they have no answer, so no record)",
                handler=provenance_refusals, json="print JSON")
    p.add_argument("--limit", type=int, default=20, help="refusals to show (default: 20)")


def provenance_list(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from serving.provenance import ProvenanceLog

    def line(r) -> str:
        return f"{r.provenance_id}\t{_when(r.time)}\t{r.answered_by}\t{r.retrieval.collection if r.retrieval else '-'}"

    return _newest(args, console, ProvenanceLog(config.paths.provenance), line)


def provenance_refusals(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from serving.refusals import RefusalLog

    def line(r) -> str:
        who = f"{r.tenant}/{r.key_id}" if r.key_id else "-"
        return f"{r.trace_id or '-'}\t{_when(r.time)}\t{r.policy}/{r.guard}\t{r.detail}\t{r.model}\t{who}"

    return _newest(args, console, RefusalLog(config.paths.refusals), line)


def _newest(args: Namespace, console: Console, log, line) -> int:
    """`--limit` entries of an append-only log, newest first: one line each, or JSON."""
    if args.limit < 1:
        raise UserError("--limit must be at least 1")
    records = log.recent(args.limit)
    if args.json:
        console.json([r.model_dump(mode="json") for r in records])
    else:
        for r in records:
            console.result(line(r))
    return 0


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def provenance_show(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from serving.provenance import ProvenanceLog

    record = ProvenanceLog(config.paths.provenance).get(args.id)
    if args.json:
        console.json(record.model_dump(mode="json"))
        return 0
    _show_lineage(record, config, console)
    return 0


def _show_lineage(record, config: TunefetchConfig, console: Console) -> None:
    from training.registry import open_registry

    say = console.result
    say(f"provenance {record.provenance_id}  trace {record.trace_id}")
    say(f"  base model: {record.base_model.id} (sha256 {record.base_model.sha256[:16]})")
    if record.adapter:
        lineage = open_registry(config.registry_settings()).get(record.adapter.ref).record
        say(f"  adapter: {record.adapter.ref} (hash {record.adapter.content_hash[:16]}) <- run {lineage.run_id}, "
            f"dataset {lineage.dataset.rows} rows sha256 {lineage.dataset.sha256[:16]}")
    if record.retrieval:
        r = record.retrieval
        say(f"  store: {r.kb} -> {r.collection} (v{r.kb_version}), template {record.prompt_template}")
        for chunk in r.chunks:
            say(f"    {chunk.doc_id}  chunk {chunk.chunk_id}  score {chunk.score:.3f}")
    say(f"  output sha256 {record.output_hash[:16]}")
    if record.latency_ms is not None:
        parts = [f"{name} {ms:.0f} ms" for name, ms in (("retrieval", record.retrieval_ms),
                                                          ("generation", record.generation_ms)) if ms is not None]
        say(f"  time: {record.latency_ms:.0f} ms in the gateway" + (f" ({', '.join(parts)})" if parts else ""))
    if record.output_format:
        say(f"  output: {record.output_format}, schema satisfied: {record.schema_valid}")
    for report in record.attribution or ():
        say(f"  citations: {report['verified']} quotes verified, {report['unverified']} not")
    changed = [d for d in record.guards if d.action != "pass"]
    if record.guards:
        say(f"  guards: {len(record.guards)} decisions" + "".join(
            f"; {d.stage} {d.policy}/{d.guard} {d.action}" + (f" ({d.detail})" if d.detail else "") for d in changed))
