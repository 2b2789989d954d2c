"""No process outlives a stopped `tunefetch serve`: not Ray's (GCS, raylet, agents, workers,
replicas), not vLLM's engine core, not Milvus Lite or its supervisor.

A graceful stop (SIGTERM) shuts everything down; a SIGKILL of the CLI leaves the cleanup to the
kernel (Ray's PR_SET_PDEATHSIG), Ray's own parent checks, the Ray watchdog (cluster/runtime.py)
and the Milvus Lite supervisor (retrieval/milvus_endpoint.py). Each case starts its own short-lived
server on its own home and port, and watches the server's process tree.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ROOT, TUNEFETCH, free_port, wait_healthy

GONE_WITHIN_S = 30


def proc_stat(pid: int) -> tuple[str, int, str, int] | None:
    """(name, parent pid, state, start time) of a live process; None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in "ZX":
        return None
    return stat[stat.index("(") + 1:stat.rindex(")")], int(fields[1]), fields[0], int(fields[19])


def process_tree(root: int) -> dict[tuple[int, int], str]:
    """The live descendants of `root` (and root), keyed by (pid, start time): name and command."""
    stats = {pid: s for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if (s := proc_stat(pid))}
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, s in stats.items() if s[1] in tree} - tree
        tree |= children
        grew = bool(children)
    return {(pid, stats[pid][3]): f"{stats[pid][0]}: {cmdline(pid)[:120]}" for pid in tree if pid in stats}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def survivors(processes: dict[tuple[int, int], str]) -> dict[tuple[int, int], str]:
    return {key: what for key, what in processes.items() if (s := proc_stat(key[0])) and s[3] == key[1]}


@pytest.fixture
def serve_home(local_model: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A fresh home holding the suite's local model, and a config with a port of its own."""
    home = tmp_path / "home"
    shutil.copytree(local_model, home / "models" / local_model.name)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"serving": {"port": free_port(), "engine": {"max_model_len": 2048}}}))
    return home, config


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_no_process_outlives_a_stopped_server(stop: signal.Signals, serve_home: tuple[Path, Path]):
    home, config = serve_home
    port = yaml.safe_load(config.read_text())["serving"]["port"]
    log = home.parent / "serve.log"
    with open(log, "w") as out:
        cli = subprocess.Popen([TUNEFETCH, "serve", "--home", str(home), "--config", str(config)], cwd=ROOT,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = wait_healthy(cli, f"http://127.0.0.1:{port}", log)
        answer = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        processes = process_tree(cli.pid)
        milvus = json.loads((home / "milvus" / "server.json").read_text())
        names = " | ".join(processes.values())
        for part in ("raylet", "gcs_server", "ray::ServeReplica", "milvus_lite.cmdline server", "supervise"):
            assert part in names, f"no {part} among the server's processes:\n" + "\n".join(processes.values())
        assert {milvus["pid"], milvus["supervisor"]} <= {pid for pid, _ in processes}
    except BaseException:
        os.killpg(cli.pid, signal.SIGKILL)
        raise

    stopped = time.monotonic()
    cli.send_signal(stop)
    code = cli.wait(timeout=60)
    if stop == signal.SIGTERM:
        assert code == 0, f"a graceful stop exited {code}:\n{log.read_text()[-3000:]}"
    left = survivors(processes)
    while left and time.monotonic() - stopped < GONE_WITHIN_S:
        time.sleep(0.5)
        left = survivors(processes)
    for pid, _ in left:  # a failure leaves nothing behind either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running {GONE_WITHIN_S} s after {stop.name}:\n" + "\n".join(left.values())
    assert not (home / "milvus" / "server.json").exists()
