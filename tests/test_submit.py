"""`tunefetch submit train` (and cluster.jobs underneath) against a real, private single-node Ray
head on 127.0.0.1.

No real training: the jobs fail fast inside `tunefetch train` on the cluster (a bad dataset row,
a home without a base model), which proves the project, the staged config and its datasets
reached the job. Two cheap stand-in entrypoints cover success and Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest
import yaml

from cluster import jobs
from cluster.errors import UserError
from cluster.jobs import STAGE_DIR
from conftest import ROOT, SAMPLE
from tunefetch.commands.training import submit_training

pytestmark = [pytest.mark.timeout(300),
              # Ray's own log-tail client (sdk.py); nothing tunefetch passes.
              pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")]

RAY = str(Path(sys.executable).parent / "ray")


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together, so no two are the same)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A private Ray head; yields its job server URL.

    Own temp dir and ports, so it never meets another Ray on this host. Stopped by SIGTERM to
    `ray start --block` (which takes its node down), then SIGKILL to any survivor among the
    processes it started. Not `ray stop`: that stops every Ray of the user on the host.
    """
    temp_dir = tmp_path_factory.mktemp("ray")
    gcs, dashboard, client_server, agent = free_ports(4)
    argv = [RAY, "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
            "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
            "--include-dashboard", "true", "--ray-client-server-port", str(client_server),
            "--dashboard-agent-listen-port", str(agent), "--min-worker-port", "0", "--max-worker-port", "0",
            "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    # Job entrypoints run the `python` on the cluster's PATH: here this venv's, as on a cluster image.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log_path = temp_dir.parent / "ray-head.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{dashboard}"
            _wait_for_job_server(url, proc, log_path)
            yield url
        finally:
            _stop(proc)


def _wait_for_job_server(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            jobs._connect(url).list_jobs()
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"no Ray job server at {url} after {timeout_s} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)


def _stop(proc: subprocess.Popen) -> None:
    try:
        root = psutil.Process(proc.pid)
        started = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        started = []
    proc.terminate()
    _, alive = psutil.wait_procs(started, timeout=60)
    for p in alive:
        p.kill()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group is ours alone (start_new_session)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(ray_head):
    return jobs._connect(ray_head)  # a RAY_ADDRESS in the environment cannot redirect it


@pytest.fixture
def valid_config(tmp_path) -> Path:
    config = yaml.safe_load((ROOT / "examples" / "train.yaml").read_text())
    config["datasets"] = [{"path": str(SAMPLE / "adapter_qa.jsonl")}]
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _job_ids(client) -> set[str]:
    return {job.submission_id for job in client.list_jobs()}


def test_bad_row_fails_on_the_cluster_with_the_one_line_error(ray_head, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n{"prompt": "missing fields"}\n')
    config = tmp_path / "train.yaml"
    config.write_text("name: support\ndatasets: [{path: rows.jsonl}]\n")  # relative: rewritten when staged
    lines: list[str] = []
    assert submit_training(ray_head, config, tmp_path / "home", lines.append) == 1
    errors = [line for line in lines if line.startswith("tunefetch: error:")]
    assert len(errors) == 1, "\n".join(lines)
    # The job read the staged copy of the dataset, from the uploaded working_dir.
    assert "rows.jsonl:2" in errors[0] and f"{STAGE_DIR}/datasets/0/rows.jsonl" in errors[0], errors[0]
    assert "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith("job tunefetch-train-support-") and "FAILED" in lines[-1], lines[-1]


def test_home_without_base_model_fails_on_the_cluster(ray_head, valid_config, tmp_path):
    home = tmp_path / "empty-home"
    lines: list[str] = []
    assert submit_training(ray_head, valid_config, home, lines.append) == 1
    errors = [line for line in lines if "base model not found" in line]
    assert len(errors) == 1, "\n".join(lines)
    assert str(home.resolve()) in errors[0], errors[0]  # --home reached the job


def test_unreachable_address_is_a_user_error(ray_head, valid_config, monkeypatch):
    # RAY_ADDRESS naming a live cluster must not redirect an explicit address.
    monkeypatch.setenv("RAY_ADDRESS", ray_head)
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    with pytest.raises(UserError, match=f"no Ray cluster at {dead} "):
        submit_training(dead, valid_config, None, print)
    assert os.environ["RAY_ADDRESS"] == ray_head


def test_invalid_config_is_rejected_before_submission(ray_head, client, tmp_path):
    before = _job_ids(client)
    bad = tmp_path / "train.yaml"
    bad.write_text("name: support\ndatasets: [{path: x.jsonl}]\nlora: {rank: 8}\n")
    with pytest.raises(UserError, match="lora.rank"):
        submit_training(ray_head, bad, None, print)
    bad.write_text("name: support\ndatasets: [{path: nothere.jsonl}]\n")
    with pytest.raises(UserError, match="nothere.jsonl"):
        submit_training(ray_head, bad, None, print)
    assert _job_ids(client) == before


def test_succeeded_job_returns_0(ray_head):
    # Stand-in entrypoint (no training): the job imports the uploaded copy of the project (not
    # this checkout, which the venv's editable install also points at) and exits 0.
    script = "import cluster; print('code from', cluster.__file__)"
    entrypoint = ["bash", "-c", f'python -c "{script}" && python -m tunefetch --help']
    lines: list[str] = []
    assert jobs.submit(ray_head, entrypoint, lambda stage: None, name="ok", progress=lines.append) == 0
    origin = next(line for line in lines if line.startswith("code from"))
    assert "working_dir_files" in origin and str(ROOT) not in origin, origin
    assert any(line.startswith("usage: tunefetch") for line in lines), "\n".join(lines)


def test_ctrl_c_while_streaming_stops_the_job(ray_head, client):
    entrypoint = ["python", "-c", "import time; print('ready'); time.sleep(300)"]
    before = _job_ids(client)

    def progress(line: str) -> None:
        if line == "ready":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jobs.submit(ray_head, entrypoint, lambda stage: None, name="sleeper", progress=progress)
    (submission_id,) = _job_ids(client) - before
    deadline = time.monotonic() + 60
    while not (status := client.get_job_status(submission_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status.value == "STOPPED"


def test_the_submit_verb_streams_the_job_and_exits_with_its_status(ray_head, valid_config, tmp_path):
    from conftest import CLI

    proc = CLI(tmp_path / "empty-home")("submit", "train", str(valid_config), "--address", ray_head, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "base model not found" in proc.stderr and "FAILED" in proc.stderr.strip().splitlines()[-1]
    assert proc.stdout == ""  # results only on stdout, and a failed job has none
