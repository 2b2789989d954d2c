"""Operations: `monitor` (drift and freshness) and `review list|show|resolve|export`.

Both read the home directory's logs, so they work with or without a running server.
"""

from __future__ import annotations

import getpass
import time
from argparse import Namespace
from pathlib import Path

from cluster.config import TunefetchConfig
from cluster.errors import UserError
from tunefetch.console import Console


def add_parsers(sub, command) -> None:
    p = command(sub, "monitor", "drift and freshness per knowledge store and adapter", handler=monitor,
                json="print the report as JSON")
    p.add_argument("--kb", default=None, help="only this knowledge store")
    p.add_argument("--adapter", default=None, help="only this adapter")
    p.add_argument("--since", default=None, help="look at answers from this date (YYYY-MM-DD) on; default: all")

    p = command(sub, "review", "the human review queue: abstained, ungrounded, low-scored, negative feedback")
    rv = p.add_subparsers(dest="review_command", required=True, metavar="ACTION")
    p = command(rv, "list", "answers waiting for review, oldest first", handler=review_list, json="print JSON")
    p.add_argument("--status", choices=("open", "resolved", "dismissed", "all"), default="open")
    p.add_argument("--limit", type=int, default=50, help="items to show (default: 50)")
    p = command(rv, "show", "one answer: question, answer, passages, feedback, decision", handler=review_show,
                json="print JSON")
    p.add_argument("id", help="a provenance id (prov-...)")
    p = command(rv, "resolve", "record the corrected answer (or dismiss the item)", handler=review_resolve)
    p.add_argument("id", help="a provenance id (prov-...)")
    p.add_argument("--correction", default=None, help="the answer it should have been (default: the one "
                                                      "correction posted as feedback)")
    p.add_argument("--gold", default=None, help="doc ids that answer the question, comma-separated (makes an "
                                                "eval case)")
    p.add_argument("--dismiss", action="store_true", help="nothing to correct")
    p.add_argument("--note", default=None, help="why")
    p.add_argument("--by", default=None, help="who decides (default: this user)")
    p = command(rv, "export", "resolved reviews -> eval cases (eval_cases.jsonl) and training rows (train.jsonl)",
                handler=review_export)
    p.add_argument("--out", required=True, type=Path, help="directory to write")


def monitor(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from serving.monitor import run
    from retrieval.freshness import store_freshness
    from serving.provenance import ProvenanceLog
    from tunefetch.stack import knowledge_stores

    if args.kb and args.adapter:
        raise UserError("give --kb or --adapter, not both")
    only = f"kb:{args.kb}" if args.kb else f"adapter:{args.adapter}" if args.adapter else None
    records = list(ProvenanceLog(config.paths.provenance).all(_date(args.since)))
    embedder = _lazy_embedder()
    with console.captured(config.paths.logs, "monitor"), knowledge_stores(config) as stores:
        if args.kb:
            stores.current(args.kb)  # an unknown store is an error, not an empty report
        freshness = [] if args.adapter else store_freshness(stores, args.kb)
        report = run(records, embedder, config.governance.monitor, freshness, only)
    if args.json:
        console.json(report.to_json())
        return 0
    console.info(f"{len(records)} answers; window {report.window}, alpha {report.alpha}; "
                 f"{report.embedded} questions embedded in {report.seconds:.1f} s")
    for group in report.groups:
        verdict = "DRIFT" if group.drifted else "ok"
        tests = "  ".join(_test_line(t) for t in group.tests)
        console.result(f"{group.id}\t{group.answers} answers\t{verdict}\t{tests or group.note}")
    for store in report.stores:
        console.result(f"store {store.kb}@v{store.version}\tage {_age(store.age_s)}\t{store.checked} sources "
                       f"checked, {len(store.changed)} changed, {len(store.missing)} missing")
        for source in store.changed + store.missing:
            console.result(f"  {'changed' if source in store.changed else 'missing'}: {source}")
    return 0


def _lazy_embedder():
    embedder = None

    def embed(texts):
        nonlocal embedder
        if embedder is None:
            from retrieval.embedding import Embedder

            embedder = Embedder()
        return embedder.encode(texts)

    return embed


def _test_line(test) -> str:
    extra = f", {test.reference:.2f}->{test.current:.2f}" if test.reference is not None else ""
    return f"{test.name} p={test.p_value:.3g}{extra}"


def _age(seconds: float) -> str:
    return f"{seconds / 86400:.1f} d" if seconds >= 86400 else f"{seconds / 3600:.1f} h"


def _date(value: str | None) -> float:
    if value is None:
        return 0.0
    try:
        return time.mktime(time.strptime(value, "%Y-%m-%d"))
    except ValueError:
        raise UserError(f"--since expects a date like 2026-12-01, got {value!r}") from None


def _queue(config: TunefetchConfig):
    from serving.review import ReviewQueue
    from serving.feedback import FeedbackLog
    from serving.provenance import ProvenanceLog

    paths = config.paths
    return ReviewQueue(ProvenanceLog(paths.provenance), FeedbackLog(paths.feedback), paths.reviews,
                       config.governance.monitor)


def review_list(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    if args.limit < 1:
        raise UserError("--limit must be at least 1")
    items = _queue(config).items(None if args.status == "all" else args.status)
    shown = items[:args.limit]
    if args.json:
        console.json([i.to_json() for i in shown])
        return 0
    if not items:
        console.info(f"no {args.status} reviews")
    for item in shown:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(item.record.time))
        question = _one_line(item.record.question or "(question not recorded)", 60)
        console.result(f"{item.id}\t{when}\t{item.status}\t{','.join(item.reasons)}\t{item.record.answered_by}\t"
                       f"{question}")
    if len(items) > len(shown):
        console.info(f"... {len(items) - len(shown)} more (--limit)")
    return 0


def review_show(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    item = _queue(config).get(args.id)
    if args.json:
        console.json(item.to_json())
        return 0
    record, say = item.record, console.result
    say(f"{item.id}  {item.status}  reasons: {', '.join(item.reasons) or 'none'}  model: {record.answered_by}")
    say(f"  question: {record.question or '(not recorded)'}")
    say(f"  answer:   {record.answer or '(not recorded)'}")
    if record.retrieval:
        r = record.retrieval
        say(f"  store {r.kb}@v{r.kb_version}: " + (", ".join(f"{c.doc_id} ({c.score:.3f})" for c in r.chunks)
                                                   or "nothing relevant"))
    for f in item.feedback:
        say(f"  feedback: score {f.score} label {f.label} correction {f.correction!r} comment {f.comment!r}")
    if item.decision:
        d = item.decision
        say(f"  decision: {d.status} by {d.by}; correction {d.correction!r}; gold {d.gold_doc_ids}")
    return 0


def review_resolve(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    if args.dismiss and (args.correction or args.gold):
        raise UserError("--dismiss takes no --correction or --gold")
    gold = [g.strip() for g in args.gold.split(",") if g.strip()] if args.gold else None
    decision = _queue(config).resolve(args.id, args.by or getpass.getuser(), args.correction, gold, args.note,
                                      args.dismiss)
    console.result(f"{decision.provenance_id} {decision.status}")
    return 0


def review_export(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    cases, rows = _queue(config).export(args.out)
    console.info(f"{cases} eval cases -> {args.out / 'eval_cases.jsonl'}; {rows} training rows -> "
                 f"{args.out / 'train.jsonl'}")
    console.result(str(args.out))
    return 0


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"
