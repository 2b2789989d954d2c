"""Cores of its own for the vLLM engine core on CPU hosts.

On a CPU host the engine core process is the bottleneck, and the threads of the Serve proxy,
the gateway and the replica itself wake up on whatever core it runs on and preempt it. Pinned
to cores of its own, with the replica's other threads kept off them, the kernel moves the rest
of the work to the other cores (vLLM's advice for CPU serving: dedicated cores for the engine,
the others for the API server). On 2 cores this raised concurrency-16 throughput by about a
quarter and cut concurrency-1 latency in A/B runs (README, Performance).

Cores are claimed node-wide with flock'd files, so generator replicas of any app on the node
never share a core; a claim always leaves one core unclaimed, and a lock ends with its process.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

CLAIMS_DIR = Path(tempfile.gettempdir()) / "tunefetch-cpu-claims"


class CoreClaim:
    """Cores this process holds; they are free again when it exits or calls `release`."""

    def __init__(self, cores: set[int], fds: list[int]):
        self.cores = cores
        self._fds = fds

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def claim_cores(count: int, allowed: set[int] | None = None, claims_dir: Path = CLAIMS_DIR) -> CoreClaim | None:
    """Claims `count` cores (highest first) of `allowed` (default: this process's CPUs) that no
    other process holds, or None when that would leave no core unclaimed."""
    allowed = set(os.sched_getaffinity(0) if allowed is None else allowed)
    if count < 1:
        return None
    claims_dir.mkdir(parents=True, exist_ok=True)
    held: dict[int, int] = {}
    for core in sorted(allowed, reverse=True):
        fd = _try_lock(claims_dir / f"cpu{core}")
        if fd is None:
            continue
        if len(held) < count:
            held[core] = fd
            continue
        os.close(fd)  # a core nobody holds is left for everything else: the claim stands
        return CoreClaim(set(held), list(held.values()))
    for fd in held.values():
        os.close(fd)
    return None


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


@contextmanager
def start_on(cores: set[int]):
    """Processes started inside this block run on `cores`; when it ends, every thread of this
    process runs on the other cores."""
    everything = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)  # this thread only: children forked from it inherit the mask
    try:
        yield
    finally:
        rest = everything - cores or everything
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), rest)
            except OSError:  # the thread ended meanwhile
                pass
