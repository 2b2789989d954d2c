"""Which Milvus a process talks to: a configured server, or the home's Milvus Lite.

Milvus Lite locks its data directory to one process, yet the CLI, the demo and every Serve
replica must share one store. So embedded mode always runs Milvus Lite as a small gRPC server
on 127.0.0.1 (up in < 1 s) and every process is a client of it: the same client code then runs
against Milvus Lite and a real Milvus server.

No client owns the server: a `serve` started during an `ingest` must keep its store when the
ingest ends, and a client killed with SIGKILL must not leave the server behind. So each client
holds a lease (ROOT/leases/PID.STARTTIME.ID, removed on exit; the start time tells a reused pid
apart) and a detached supervisor process runs the server: it drops leases of dead processes and
stops the server once no lease is left for GRACE_S. Clients look up or start the server and
write their lease under ROOT/.server.lock; the supervisor decides to stop under the same lock,
so a client never joins a server that is shutting down.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from cluster.config import TunefetchConfig
from cluster.errors import UserError

_START_TIMEOUT_S = 30.0
GRACE_S = 2.0  # the server outlives its last client this long (a CLI command right after another reuses it)
_POLL_S = 0.5  # how often the supervisor prunes leases
MAX_RESTARTS = 5  # a server that dies more often than this in a minute is left down
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # for `python -m retrieval.milvus_endpoint`


@dataclass(frozen=True)
class MilvusAddress:
    uri: str
    token: SecretStr | None = None  # prints as ********** wherever the address is logged


@contextmanager
def milvus_endpoint(config: TunefetchConfig):
    """Yields the MilvusAddress to use; holds a lease on the home's Milvus Lite (started if none
    runs) until the block ends."""
    if config.retrieval.milvus_uri:
        yield MilvusAddress(config.retrieval.milvus_uri, config.retrieval.milvus_token)
        return
    root = config.paths.milvus
    (root / "leases").mkdir(parents=True, exist_ok=True)
    lease = _lease_path(root)
    with _locked(root):
        lease.touch()
        try:
            address = _running_server(root) or _start_supervisor(root)
        except BaseException:
            lease.unlink(missing_ok=True)
            raise
    try:
        yield address
    finally:
        lease.unlink(missing_ok=True)


# -- shared by clients and the supervisor --

@contextmanager
def _locked(root: Path):
    with open(root / ".server.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_state(root: Path) -> dict:
    try:
        return json.loads((root / "server.json").read_text())
    except (OSError, ValueError):
        return {}


def _running_server(root: Path) -> MilvusAddress | None:
    state = _read_state(root)
    if state and _alive(state.get("supervisor", -1)) and _alive(state.get("pid", -1)) \
            and _port_open(state.get("port", 0)):
        return MilvusAddress(state["uri"])
    return None


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks); None for no process or a zombie."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name (field 2) may hold spaces and ')'
    return None if fields[0] in "ZX" else int(fields[19])


def _alive(pid: int) -> bool:
    return _start_time(pid) is not None


def _lease_path(root: Path) -> Path:
    pid = os.getpid()
    return root / "leases" / f"{pid}.{_start_time(pid)}.{uuid.uuid4().hex[:8]}"


def _lease_live(lease: Path) -> bool:
    pid, start, _ = (lease.name.split(".") + ["", "", ""])[:3]
    return pid.isdigit() and str(_start_time(int(pid))) == start


# -- client side: starting the supervisor --

def _start_supervisor(root: Path) -> MilvusAddress:
    """Starts the supervisor (its own session: it outlives this process) and waits for its server."""
    log = open(root / "server.log", "ab")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-m", "retrieval.milvus_endpoint", "supervise", str(root)],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    log.close()
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not (address := _running_server(root)):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            tail = (root / "server.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise UserError(f"Milvus Lite server for {root} did not start: {' '.join(tail) or 'no output'}")
        time.sleep(0.05)
    threading.Thread(target=process.wait, daemon=True).start()  # reaps it should it exit before us
    return address


# -- the supervisor process --

def supervise(root: Path) -> int:
    """Runs Milvus Lite until no client holds a lease (for GRACE_S) or SIGTERM. A server that
    dies is restarted on the same port (clients reconnect to the address they hold), at most
    MAX_RESTARTS times a minute."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    port, restarts = _free_port(), []
    server = _start_server(root, port)
    try:
        if not _wait_listening(server, port, stop):
            return 1  # never published: the starting client sees us exit and reports server.log
        _publish(root, server, port)
        while not _watch(root, server, stop):
            restarts = [t for t in restarts if time.monotonic() - t < 60] + [time.monotonic()]
            print(f"milvus lite server exited ({server.returncode}); restart {len(restarts)} this minute", flush=True)
            if len(restarts) > MAX_RESTARTS:
                _unpublish(root)
                return 1
            with _locked(root):  # clients wait for the new server instead of starting a second one
                server = _start_server(root, port)
                if not _wait_listening(server, port, stop):
                    _unpublish(root)
                    return 1
                _publish(root, server, port)
    finally:
        _stop(server)
    return 0


def _start_server(root: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "milvus_lite.cmdline", "server", "--data-dir", str(root / "store.db"),
         "--host", "127.0.0.1", "--port", str(port)],
        stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
    )


def _publish(root: Path, server: subprocess.Popen, port: int) -> None:
    state = {"pid": server.pid, "supervisor": os.getpid(), "port": port, "uri": f"http://127.0.0.1:{port}"}
    (root / "server.json").write_text(json.dumps(state))


def _die_with_parent() -> None:
    """In the server child: SIGTERM it when the supervisor dies, even by SIGKILL (Linux)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_listening(server: subprocess.Popen, port: int, stop: threading.Event) -> bool:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not _port_open(port):
        if server.poll() is not None or stop.is_set() or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _watch(root: Path, server: subprocess.Popen, stop: threading.Event) -> bool:
    """True (with server.json removed) once the server should stop; stops it under the lock
    when no lease is left, so a client joining at that moment starts a fresh server instead.
    False when the server died on its own."""
    last_client = time.monotonic()
    while not stop.wait(_POLL_S):
        if server.poll() is not None:
            return False
        if _prune_leases(root):
            last_client = time.monotonic()
        elif time.monotonic() - last_client >= GRACE_S:
            with _locked(root):
                if not _prune_leases(root):
                    _unpublish(root)
                    _stop(server)  # before the lock is released: the data directory is free for the next server
                    return True
            last_client = time.monotonic()
    _unpublish(root)
    return True


def _prune_leases(root: Path) -> int:
    """Removes leases of processes that are gone; returns how many live ones remain."""
    live = 0
    for lease in (root / "leases").iterdir():
        if _lease_live(lease):
            live += 1
        else:
            lease.unlink(missing_ok=True)
    return live


def _unpublish(root: Path) -> None:
    if _read_state(root).get("supervisor") == os.getpid():
        (root / "server.json").unlink(missing_ok=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, TypeError):
        return False
    return True


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", int(port))) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__" and sys.argv[1:2] == ["supervise"]:
    sys.exit(supervise(Path(sys.argv[2])))
