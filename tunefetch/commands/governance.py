"""Governance: `canary`, `approve` / `approvals list`, `card`.

Canary and approval commands change the records in the home directory (a running server
picks a change up on its next request); `card` asks the running server, because the card
describes what is deployed, not what is on disk.
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
    p = command(sub, "canary", "traffic splits between versions of one adapter, judged from their answers")
    cv = p.add_subparsers(dest="canary_command", required=True, metavar="ACTION")
    p = command(cv, "start", "send a fraction of NAME's traffic to a candidate version (again: a new weight)",
                handler=canary_start)
    p.add_argument("name", help="adapter name")
    p.add_argument("--to", required=True, help="candidate version, e.g. v2")
    p.add_argument("--weight", type=float, required=True, help="fraction of callers sent to it, 0 < W < 1")
    p.add_argument("--steps", default=None, help="weights to move through after each passed analysis step, "
                                                 "e.g. 0.5 (default: governance.canary.steps)")
    p.add_argument("--shadow", action="store_true",
                   help="the candidate answers a copy of its callers' requests, recorded and analysed; they get stable's")
    p.add_argument("--manual", action="store_true", help="no automatic rollback or promotion (status still analyses)")
    p.add_argument("--promote-after", type=int, default=None,
                   help="canary answers without harm that pass a step (default: governance.canary.promote_after)")
    p.add_argument("--by", default=None, help="who starts it (default: this user)")
    p = command(cv, "status", "weights, counts, the analysis and every decision", handler=canary_status,
                json="print JSON")
    p.add_argument("name", nargs="?", help="adapter name (default: all)")
    for action, help in (("promote", "make the candidate the stable version"),
                         ("rollback", "end the canary, stable keeps all traffic (--to vN: make vN stable)")):
        p = command(cv, action, help, handler=canary_end)
        p.add_argument("name", help="adapter name")
        p.add_argument("--by", default=None, help="who decides (default: this user)")
        if action == "rollback":
            p.add_argument("--to", default=None, help="the version to serve as stable from now on, e.g. v1")

    p = command(sub, "approve", "approve an adapter version, bound to the hashes of its evidence", handler=approve)
    p.add_argument("ref", help="NAME@vN")
    p.add_argument("--eval", type=Path, default=None, help="an `eval compare --adapter NAME@vN --out DIR` directory")
    p.add_argument("--by", default=None, help="who approves (default: this user; never the run's author)")
    p.add_argument("--note", default="", help="why")
    p = command(sub, "approvals", "approval records")
    av = p.add_subparsers(dest="approvals_command", required=True, metavar="ACTION")
    command(av, "list", "every approval and whether its evidence still holds", handler=approvals_list,
            json="print JSON")

    p = command(sub, "card", "the running deployment's system card", handler=system_card)
    p.add_argument("--format", choices=("markdown", "cyclonedx"), default="markdown",
                   help="markdown, or a CycloneDX 1.6 ML-BOM (JSON)")
    p.add_argument("--out", type=Path, default=None, help="write to FILE instead of stdout")
    p.add_argument("--url", default=None, help="server URL (default: from serving.host/port)")


def _releases(config: TunefetchConfig):
    from serving.releases import ReleaseBook
    from training.approvals import ApprovalStore
    from training.registry import open_registry

    approvals = ApprovalStore(config.paths.approvals, config.governance)
    return ReleaseBook(config.paths.releases, open_registry(config.registry_settings()), approvals, config.governance)


def _steps(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--steps: expected weights like 0.5,0.8, not {text!r}") from None


def canary_start(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    release = _releases(config).start(args.name, args.to, args.weight, args.by or getpass.getuser(),
                                      _steps(args.steps), not args.manual, args.promote_after, args.shadow)
    canary = release.canary
    console.result(f"{args.name}: {canary.weight:g} of callers -> {canary.candidate} "
                   f"({'manual, ' if not canary.automatic else ''}{'shadow, ' if canary.shadow else ''}"
                   f"stable {release.stable})")
    return 0


def canary_end(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    book = _releases(config)
    by = args.by or getpass.getuser()
    release = (book.promote(args.name, by) if args.canary_command == "promote"
               else book.rollback(args.name, by, to=args.to))
    action = args.canary_command
    console.result(f"{args.name}: {action} -> stable {release.stable}")
    return 0


def canary_status(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    book = _releases(config)
    names = [args.name] if args.name else book.names()
    if args.name and args.name not in book.names():
        book.registry.get(args.name)  # unknown adapter: a clear error; known: simply no canary yet
    statuses = []
    for name in names:
        verdict = book.analysis(name)
        statuses.append({**book.get(name).model_dump(mode="json"), "analysis": None if verdict is None else {
            "action": verdict.action, "reason": verdict.reason, "metrics": [c.to_json() for c in verdict.comparisons]}})
    if args.json:
        console.json(statuses if not args.name else statuses[0])
        return 0
    for status in statuses:
        _print_status(status, console)
    return 0


def _print_status(status: dict, console: Console) -> None:
    say = console.result
    canary = status["canary"]
    say(f"{status['name']}: stable {status['stable'] or '(newest)'}" +
        (f", canary {canary['candidate']} at weight {canary['weight']:g}" + ("" if canary["automatic"] else " (manual)") + (" (shadow)" if canary["shadow"] else "")
         if canary else ", no canary"))
    if status["analysis"]:
        say(f"  analysis: {status['analysis']['reason']}")
        for m in status["analysis"]["metrics"]:
            say(f"    {m['metric']:<13} stable {_num(m['stable'])} (n={m['n_stable']})  canary {_num(m['canary'])} "
                f"(n={m['n_canary']})  p={_num(m['p_value'])}")
    for d in status["decisions"][-8:]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["at"]))
        weight = f" at {d['weight']:g}" if d["weight"] is not None else ""
        what = d["candidate"] or d["stable"] or ""
        say(f"  {when}  {d['action']:<8} {what}{weight} by {d['by']}" + (f": {d['reason']}" if d["reason"] else ""))


def _num(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def approve(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from training.registry import parse_ref

    if parse_ref(args.ref)[1] is None:
        raise UserError(f"approve needs an exact version NAME@vN, not {args.ref!r}")
    book = _releases(config)
    version = book.registry.get(args.ref)
    approval = book.approvals.approve(version, book.registry.local_dir(version), config.base_model_dir,
                                      args.by or getpass.getuser(), args.eval, args.note)
    console.result(approval.approval_id)
    return 0


def approvals_list(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    book = _releases(config)
    rows = []
    for approval in reversed(book.approvals.all()):
        try:
            version = book.registry.get(approval.ref)
            verdict = book.approvals.verify(approval, book.registry.local_dir(version))
        except UserError as exc:
            verdict = type("V", (), {"valid": False, "reason": str(exc)})()
        rows.append({**approval.model_dump(mode="json"), "valid": verdict.valid, "reason": verdict.reason})
    if args.json:
        console.json(rows)
        return 0
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["approved_at"]))
        state = "valid" if r["valid"] else f"INVALID: {r['reason']}"
        console.result(f"{r['approval_id']}\t{r['ref']}\tby {r['approved_by']}\t{when}\t{state}")
    return 0


def system_card(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    import json

    from serving import card
    from tunefetch.client import Client

    live = Client.for_config(config, args.url).system_card()
    facts = live["facts"]
    text = (card.render_markdown(facts) if args.format == "markdown"
            else json.dumps(card.render_cyclonedx(facts), indent=2))
    if args.out:
        args.out.write_text(text + "\n")
        console.info(f"wrote {args.out} (card {live['card_hash'][:16]})")
    else:
        console.result(text)
    return 0
