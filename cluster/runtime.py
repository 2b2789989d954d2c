"""Starting or joining the Ray cluster every tunefetch job runs on."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from cluster.config import TunefetchConfig

# Lines worker processes print for the user (training progress): the CLI shows them and sends
# the rest of the frameworks' output to a log file.
PROGRESS_MARKER = "[tunefetch]"

# Process-level switches Ray reads at start-up, before any of its processes exist:
# - a single-node Ray binds and advertises 127.0.0.1 instead of the host's interface, so all
#   traffic of the demo and tests stays on loopback;
# - no auth token file is written into the user's home directory;
# - Ray Train's controller collects reported metrics every 0.2 s instead of 2 s: a worker's
#   next `report` waits until the previous one is collected, and we report at every log step.
_LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                  "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def configure_process(config: TunefetchConfig) -> None:
    """Sets Ray's start-up switches for a local Ray; call before anything imports `ray`
    (Ray reads some of them at import time)."""
    if not config.ray.address:
        for key, value in _LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)


@contextmanager
def ray_runtime(config: TunefetchConfig):
    """Connects to `ray.address` or starts a local Ray; shuts down only what it started."""
    configure_process(config)
    import ray

    if ray.is_initialized():
        yield
        return
    sigterm = signal.getsignal(signal.SIGTERM)
    if config.ray.address:
        ray.init(address=config.ray.address, log_to_driver=True)
    else:
        ray.init(num_cpus=config.ray.num_cpus, _node_ip_address="127.0.0.1",
                 configure_logging=True, logging_level="WARNING", log_to_driver=True)
    if callable(sigterm):
        # ray.init replaces it (with sys.exit, behind a C++ handler that dumps a stack): a
        # command that handles SIGTERM (`serve`: a graceful stop) keeps its own handler.
        signal.signal(signal.SIGTERM, sigterm)
    watchdog = None if config.ray.address else _start_watchdog(config.paths.logs)
    try:
        yield
    finally:
        ray.shutdown()
        if watchdog:
            watchdog.stdin.close()  # done: it sweeps what is left and exits
            watchdog.wait()


# -- the watchdog of a local Ray --
# Ray ties the processes this one starts (GCS, raylet, dashboard) to it with PR_SET_PDEATHSIG,
# but not those the raylet starts: if this process is killed with SIGKILL, workers and replicas
# exit on their own, yet the dashboard and runtime-env agents first report the raylet's death
# to the dead GCS and hang there for its 60 s timeout. The watchdog (own session, so a Ctrl-C
# reaches only the driver) waits for this process to end and kills what is left of the raylet's
# processes: its children, and theirs (RAY_RAYLET_PID in their environment).

_SWEEP_GRACE_S = 1.0  # then SIGKILL


def _start_watchdog(logs: Path) -> subprocess.Popen | None:
    raylet = next((pid for pid in _pids() if _stat(pid)[:2] == ("raylet", os.getpid())), None)
    if raylet is None:
        return None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                       os.environ.get("PYTHONPATH")]))}
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "ray-watchdog.log", "ab") as log:  # not our stdout/stderr: they may be a pipe that dies with us
        return subprocess.Popen([sys.executable, "-m", "cluster.runtime", "watch", str(os.getpid()), str(raylet)],
                                stdin=subprocess.PIPE, stdout=log, stderr=log, env=env, start_new_session=True)


def watch(driver: int, raylet: int) -> None:
    """Until the driver closes our stdin or dies, then sweeps the raylet's processes."""
    children: set[tuple[int, int]] = set()  # (pid, start): the agents' environment may be overwritten by their title
    while _stat(driver)[2] not in "ZX":
        children |= {(pid, s[3]) for pid in _pids() if (s := _stat(pid))[1] == raylet}
        if select.select([sys.stdin], [], [], 0.5)[0] and not sys.stdin.buffer.read1(1024):
            break
    _sweep(raylet, children)


def _sweep(raylet: int, children: set[tuple[int, int]]) -> None:
    """Gives the raylet's processes _SWEEP_GRACE_S to exit on their own, then kills the rest."""
    marker = f"RAY_RAYLET_PID={raylet}".encode()
    started_before = _uptime_ticks()  # a later process with the same RAY_RAYLET_PID is another Ray's
    deadline = time.monotonic() + _SWEEP_GRACE_S
    while left := [pid for pid in _pids() if pid != os.getpid() and (s := _stat(pid))[2] not in "ZX"
                   and ((pid, s[3]) in children or (s[3] < started_before and _environ_has(pid, marker)))]:
        if time.monotonic() > deadline:
            print(f"killing what is left of the raylet {raylet}'s processes: {left}", flush=True)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.2)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat(pid: int) -> tuple[str, int, str, int]:
    """(name, parent pid, state, start time in clock ticks) of a process; state "X" if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ("", 0, "X", 0)
    fields = stat.rsplit(")", 1)[1].split()
    return stat[stat.index("(") + 1:stat.rindex(")")], int(fields[1]), fields[0], int(fields[19])


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _uptime_ticks() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


if __name__ == "__main__" and sys.argv[1:2] == ["watch"]:
    watch(int(sys.argv[2]), int(sys.argv[3]))
