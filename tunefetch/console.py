"""The terminal of one CLI run: results on stdout, progress on stderr, framework noise in a file.

Ray, vLLM, DeepSpeed, gRPC and their worker processes write to this process's stdout/stderr
(Ray forwards every worker's output to the driver). While `captured(...)` is active, file
descriptors 1 and 2 point into a pipe whose reader writes everything to a log file under
HOME/logs; lines carrying the progress marker (our own training workers' progress) are still
shown. Our own output goes to the saved terminal descriptors, so `REF=$(tunefetch train x.yaml)`
captures exactly the result. `--verbose` turns the capture off.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from cluster.runtime import PROGRESS_MARKER


class Console:
    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.out = sys.stdout
        self.err = sys.stderr
        self.log_path: Path | None = None
        self.on_marker: Callable[[str], None] | None = None  # shows worker progress lines

    # -- output ---------------------------------------------------------------------------
    def result(self, text: str) -> None:
        """What the command produced (an id, a table, JSON): stdout."""
        print(text, file=self.out, flush=True)

    def info(self, text: str) -> None:
        """Progress and context for a person: stderr."""
        print(text, file=self.err, flush=True)

    def note(self, text: str) -> None:
        """A line inside the current stage (indented under its '==>' title): stderr."""
        self.info(f"    {text}")

    def json(self, data) -> None:
        self.result(json.dumps(data, indent=2, sort_keys=True, default=str))

    def table(self, rows: list[list[str]]) -> None:
        """Rows as tab-separated lines on stdout (easy to cut/awk)."""
        for row in rows:
            self.result("\t".join(row))

    @property
    def interactive(self) -> bool:
        return self.err.isatty()

    @contextmanager
    def stage(self, title: str, started: float | None = None) -> Iterator[None]:
        """'==> title', then its duration once it is done."""
        self.info(f"==> {title}")
        t0 = time.perf_counter()
        yield
        total = f", {time.perf_counter() - started:.0f} s total" if started is not None else ""
        self.note(f"({time.perf_counter() - t0:.1f} s{total})")

    @contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        """A progress bar on a terminal, plain lines (at most one per 2 s) otherwise. Yields
        update(done, total=None, note='')."""
        if self.interactive:
            from rich.console import Console as RichConsole
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (TextColumn("    {task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TextColumn("{task.fields[note]}"))
            with Progress(*columns, console=RichConsole(file=self.err)) as bar:
                task = bar.add_task(description, total=total, note="")

                def update(done: int, total: int | None = None, note: str = "") -> None:
                    bar.update(task, completed=done, total=total or bar.tasks[0].total, note=note)

                yield update
            return
        last = [0.0]

        def update(done: int, total_: int | None = None, note: str = "") -> None:
            total_ = total_ or total
            final = total_ is not None and done >= total_
            if final or time.monotonic() - last[0] >= 2.0:
                last[0] = time.monotonic()
                self.note(f"{description}: {done}{f'/{total_}' if total_ else ''}{f'  {note}' if note else ''}")

        yield update

    # -- framework output -----------------------------------------------------------------
    @contextmanager
    def captured(self, logs_dir: Path, name: str) -> Iterator[None]:
        """Sends everything written to fds 1 and 2 (by us, libraries and child processes) to
        logs_dir/NAME-TIME.log, showing only marked progress lines."""
        if self.verbose:
            yield
            return
        logs_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = logs_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        self.out = io.TextIOWrapper(os.fdopen(os.dup(saved[0]), "wb", buffering=0), write_through=True)
        self.err = io.TextIOWrapper(os.fdopen(os.dup(saved[1]), "wb", buffering=0), write_through=True)
        read_end, write_end = os.pipe()
        reader = threading.Thread(target=self._drain, args=(read_end, self.log_path), daemon=True)
        reader.start()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)  # the pipe's last write end closes with this: the reader sees EOF
            os.dup2(saved[1], 2)
            reader.join(timeout=5)
            for fd in saved:
                os.close(fd)

    def _drain(self, read_end: int, log_path: Path) -> None:
        with open(read_end, "rb", buffering=0) as pipe, open(log_path, "ab") as log:
            pending = b""
            while chunk := pipe.read(65536):
                log.write(chunk)
                log.flush()
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._show_if_marked(line.decode(errors="replace"))
            if pending:
                self._show_if_marked(pending.decode(errors="replace"))

    def _show_if_marked(self, line: str) -> None:
        at = line.find(PROGRESS_MARKER)
        if at < 0:
            return
        text = line[at + len(PROGRESS_MARKER):].strip()
        try:
            (self.on_marker or self.note)(text)
        except Exception:  # noqa: BLE001 - a display problem must never stop the run
            pass
