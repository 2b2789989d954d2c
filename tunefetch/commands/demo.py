"""`tunefetch demo`: the main job (tunefetch/demo.py)."""

from __future__ import annotations

from argparse import Namespace

from cluster.config import TunefetchConfig
from tunefetch.commands.serving import with_port
from tunefetch.console import Console


def add_parsers(sub, command) -> None:
    p = command(sub, "demo", "build, ingest, train, serve and query the sample domain end to end", handler=demo)
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: serving.port)")


def demo(args: Namespace, config: TunefetchConfig, console: Console) -> int:
    from tunefetch.demo import run_demo

    return run_demo(with_port(config, args.port), console)
