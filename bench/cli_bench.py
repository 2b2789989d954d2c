"""How long the CLI takes to answer, per command: cold (the first run) and warm (median of runs).

    .venv/bin/python bench/cli_bench.py --home HOME [--runs 5] [--kb kestrel] [--out FILE]

HOME is a home after `make demo` (a store named --kb). Commands run as a user types them, each
a fresh process. When a `tunefetch serve` for HOME is running (HOME/server.json), `search` is
also timed through it; otherwise that row is left out. The one-file ingest writes versions of
a store named `clibench` (dropped at the end is not possible from the CLI: it stays, small).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNEFETCH = str(Path(sys.executable).parent / "tunefetch")


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - started


def measure(argv: list[str], runs: int) -> dict:
    cold = timed(argv)
    warm = [timed(argv) for _ in range(runs)]
    return {"cold_s": round(cold, 2), "warm_median_s": round(statistics.median(warm), 2)}


def main() -> None:
    from report import emit  # bench/report.py, beside this script

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--kb", default="kestrel")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    home = ["--home", str(args.home)]
    server = args.home / "server.json"
    hidden = args.home / "server.json.bench"
    docs = Path(tempfile.mkdtemp(prefix="cli-bench-"))
    (docs / "note.md").write_text("# Bench note\n\nThe bench note says the K-40 loves short benchmarks.\n")
    commands = {
        "--help": [TUNEFETCH, "--help"],
        "adapters list": [TUNEFETCH, "adapters", "list", *home],
        "kb list": [TUNEFETCH, "kb", "list", *home],
        "search": [TUNEFETCH, "search", "warranty DockStation", "--kb", args.kb, *home],
        "ingest (one file)": [TUNEFETCH, "ingest", str(docs), "--kb", "clibench", *home],
    }
    report = {"runs": args.runs, "no_server": {}}
    if server.exists():
        server.rename(hidden)  # "no server": the commands must not find it
    try:
        for name, argv in commands.items():
            report["no_server"][name] = measure(argv, args.runs)
            print(name, report["no_server"][name], file=sys.stderr)
    finally:
        if hidden.exists():
            hidden.rename(server)
    if server.exists():
        report["server_running"] = {"search": measure(commands["search"], args.runs)}
        print("search (server)", report["server_running"]["search"], file=sys.stderr)
    emit(report, args.out)


if __name__ == "__main__":
    main()
