"""The home's Milvus Lite server lives exactly as long as some process uses it.

Each client is a real process holding `milvus_endpoint` open (the way `tunefetch ingest` and
`tunefetch serve` do); the tests watch the server and its supervisor through server.json and
/proc. The user's case: a `serve` started during a long `ingest` keeps its store when the ingest
ends, and nothing is left running once the last client is gone, however it ended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

from retrieval.milvus_endpoint import GRACE_S

COLLECTION = "lease_probe"
GONE_WITHIN_S = GRACE_S + 8  # grace + a prune interval + a graceful stop, with room for a slow machine

# A client: holds milvus_endpoint open and answers one line per command on stdin
# ("write N": add N rows, "count": just count); exits at EOF.
CLIENT = """
import json, sys
from pymilvus import MilvusClient
from cluster.config import load_config
from retrieval.milvus_endpoint import milvus_endpoint

with milvus_endpoint(load_config(home=sys.argv[1])) as address:
    client = MilvusClient(uri=address.uri)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "write":
            if not client.has_collection("%(c)s"):
                client.create_collection("%(c)s", dimension=2)
            client.insert("%(c)s", [{"id": i, "vector": [0.1, 0.2]} for i in range(int(command[1]))])
            client.flush("%(c)s")
        rows = 0
        if client.has_collection("%(c)s"):
            client.load_collection("%(c)s")
            rows = client.query("%(c)s", filter="", output_fields=["count(*)"])[0]["count(*)"]
        print(json.dumps({"uri": address.uri, "rows": rows}), flush=True)
""" % {"c": COLLECTION}


class Client:
    """A client process; `ask` sends one command and returns its answer."""

    def __init__(self, home: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(home)], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"client exited {self.proc.wait()}"
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def running(pid: int) -> bool:
    """A live process (not a zombie) with this pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in "ZX"


def server_state(home: Path) -> dict:
    return json.loads((home / "milvus" / "server.json").read_text())


def wait_stopped(home: Path, state: dict, within_s: float = GONE_WITHIN_S) -> float:
    """Seconds until the server and its supervisor are gone and server.json is removed."""
    start = time.monotonic()
    while running(state["pid"]) or running(state["supervisor"]) or (home / "milvus" / "server.json").exists():
        assert time.monotonic() - start < within_s, f"Milvus Lite still up {within_s:.0f} s after its last client"
        time.sleep(0.2)
    return time.monotonic() - start


@pytest.fixture
def lite_home(tmp_path: Path):
    yield tmp_path
    state_file = tmp_path / "milvus" / "server.json"
    if state_file.exists():  # a failed test: leave nothing running
        wait_stopped(tmp_path, json.loads(state_file.read_text()), within_s=60)


def test_server_outlives_the_client_that_started_it_and_stops_after_the_last(lite_home: Path):
    home = lite_home
    a = Client(home)
    first = a.ask("write 3")
    state = server_state(home)
    assert running(state["pid"]) and running(state["supervisor"])

    b = Client(home)
    assert b.ask("count") == first  # same server, same store
    a.close()
    time.sleep(GRACE_S + 1.5)  # longer than the grace: only B's lease keeps the server up
    assert b.ask("count") == {"uri": first["uri"], "rows": 3}
    assert server_state(home) == state and running(state["pid"])

    b.close()
    wait_stopped(home, state)
    assert not list((home / "milvus" / "leases").iterdir())


def test_a_client_killed_with_sigkill_leaves_no_server(lite_home: Path):
    home = lite_home
    client = Client(home)
    client.ask("count")
    state = server_state(home)
    client.kill()
    wait_stopped(home, state)
    assert not list((home / "milvus" / "leases").iterdir())  # the dead client's lease was dropped


def test_a_server_that_dies_is_restarted_at_the_same_address(lite_home: Path):
    client = Client(lite_home)
    before = client.ask("write 4")
    old = server_state(lite_home)
    os.kill(old["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server_state_or_none(lite_home) in (None, old) or not running(server_state(lite_home)["pid"]):
        assert time.monotonic() < deadline, "the server was not restarted"
        time.sleep(0.2)
    new = server_state(lite_home)
    assert new["uri"] == old["uri"] and new["pid"] != old["pid"] and new["supervisor"] == old["supervisor"]
    assert client.ask("count") == before  # the client's connection to the same address works again
    client.close()
    wait_stopped(lite_home, new)


def server_state_or_none(home: Path) -> dict | None:
    try:
        return server_state(home)
    except (OSError, ValueError):
        return None


def test_a_client_after_shutdown_starts_a_fresh_server_on_the_same_data(lite_home: Path):
    home = lite_home
    writer = Client(home)
    writer.ask("write 5")
    old = server_state(home)
    writer.close()
    wait_stopped(home, old)

    reader = Client(home)
    assert reader.ask("count")["rows"] == 5
    new = server_state(home)
    assert new["pid"] != old["pid"] and running(new["pid"])
    reader.close()
    wait_stopped(home, new)


def test_a_client_joining_while_the_server_stops_gets_a_working_one(lite_home: Path):
    """Joins around the moment the supervisor gives up (grace + up to one prune interval):
    each join gets either the old server, kept up by the new lease, or a fresh one."""
    from pymilvus import MilvusClient

    from cluster.config import load_config
    from retrieval.milvus_endpoint import milvus_endpoint

    config = load_config(home=lite_home)
    for delay in (GRACE_S - 0.1 + 0.2 * i for i in range(6)):
        with milvus_endpoint(config) as address:
            assert MilvusClient(uri=address.uri).list_collections() == []
        time.sleep(delay)
    with milvus_endpoint(config) as address:
        assert MilvusClient(uri=address.uri).list_collections() == []
        state = server_state(lite_home)
    wait_stopped(lite_home, state)
