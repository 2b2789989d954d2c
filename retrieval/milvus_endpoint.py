"""Which Milvus a process talks to: a configured server, or the home's Milvus Lite.

Milvus Lite locks its data directory to one process, yet the CLI, the demo and every Serve
replica must share one store. So embedded mode always runs Milvus Lite as a small gRPC server
on 127.0.0.1 (up in < 1 s) and every process is a client of it: the same client code then runs
against Milvus Lite and a real Milvus server. The first tunefetch process that needs the
server starts it and owns it (stops it on exit); the others find it through `server.json`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from cluster.config import TunefetchConfig
from cluster.errors import UserError

_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class MilvusAddress:
    uri: str
    token: SecretStr | None = None  # prints as ********** wherever the address is logged


@contextmanager
def milvus_endpoint(config: TunefetchConfig):
    """Yields the MilvusAddress to use; starts (and later stops) Milvus Lite if none runs."""
    if config.retrieval.milvus_uri:
        yield MilvusAddress(config.retrieval.milvus_uri, config.retrieval.milvus_token)
        return
    root = config.paths.milvus
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".server.lock"):
        running = _running_server(root / "server.json")
        process = None if running else _start_lite_server(root)
    try:
        yield running or MilvusAddress(_read_state(root / "server.json")["uri"])
    finally:
        if process is not None:
            _stop(process, root / "server.json")


@contextmanager
def _locked(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _running_server(state_file: Path) -> MilvusAddress | None:
    state = _read_state(state_file)
    if state and pid_alive(state.get("pid", -1)) and _port_open(state.get("port", 0)):
        return MilvusAddress(state["uri"])
    return None


def _start_lite_server(root: Path) -> subprocess.Popen:
    port = _free_port()
    log = open(root / "server.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite.cmdline", "server", "--data-dir", str(root / "store.db"),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not _port_open(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            tail = (root / "server.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise UserError(f"Milvus Lite server for {root} did not start: {' '.join(tail) or 'no output'}")
        time.sleep(0.05)
    state = {"pid": process.pid, "port": port, "uri": f"http://127.0.0.1:{port}"}
    (root / "server.json").write_text(json.dumps(state))
    return process


def _stop(process: subprocess.Popen, state_file: Path) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    state_file.unlink(missing_ok=True)


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
