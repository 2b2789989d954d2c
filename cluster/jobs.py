"""Running `tunefetch train` as a Ray job on a (remote) Ray cluster, via its job server.

The job runs the uploaded copy of this project with the cluster's own Python, reads a staged
copy of the train config and its datasets, and writes adapters into the cluster-side home.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import yaml

from cluster.config import read_yaml
from cluster.errors import UserError
from training.config import TrainConfig, load_train_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STAGE_DIR = ".tunefetch-submit"
# Never uploaded: environments, local state, VCS data, tests, benchmarks and build leftovers.
EXCLUDES = (".venv", ".tunefetch", ".git", "__pycache__", "tests", "bench", "*.egg-info",
            ".pytest_cache", "build", "dist")
# Ray lets these silently replace the address a client is given (as ray.init does).
_ADDRESS_OVERRIDES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# Ray's job client loggers: "ray" covers packaging; the two SDK modules pin their own INFO level.
_RAY_CLIENT_LOGGERS = ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk")


def submit_training(address: str, train_config: Path, home: Path | None,
                    progress: Callable[[str], None] = print) -> int:
    """Submits `tunefetch train TRAIN_CONFIG` to the job server at `address` (e.g.
    http://127.0.0.1:8265), streams its logs to `progress` until it ends; 0 if it succeeded.

    `home` is a directory on the cluster (the adapters land there); None leaves the cluster's
    default (its TUNEFETCH_HOME). Ctrl-C stops the job and re-raises.
    """
    train_config = Path(train_config)
    train = load_train_config(train_config)  # a bad config never reaches the cluster
    with _quiet_ray_client():
        client = _connect(address)
        submission_id = _submit(client, train_config, train, home)
        progress(f"submitted {submission_id} to {address} (Ctrl-C stops it)")
        return _follow(client, submission_id, progress)


@contextmanager
def _quiet_ray_client():
    """Ray's job client logs every packaging step at INFO; the user wants the job's own log."""
    loggers = [logging.getLogger(name) for name in _RAY_CLIENT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _submit(client, train_config: Path, train: TrainConfig, home: Path | None) -> str:
    submission_id = f"tunefetch-train-{train.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="tunefetch-submit-") as tmp:
        snapshot = _snapshot(Path(tmp), train_config, train)
        # submit_job zips and uploads the working_dir before it returns: the temp copy can go.
        client.submit_job(entrypoint=_entrypoint(train_config.name, home), submission_id=submission_id,
                          runtime_env={"working_dir": str(snapshot)},
                          metadata={"adapter": train.name, "train_config": str(train_config)})
    return submission_id


def _follow(client, submission_id: str, progress: Callable[[str], None]) -> int:
    """Streams the job's logs until it ends; 0 if it succeeded, else reports why and 1."""
    from ray.job_submission import JobStatus

    try:
        _stream_logs(client, submission_id, progress)
        info = _wait_for_end(client, submission_id)
    except KeyboardInterrupt:
        client.stop_job(submission_id)  # the job would otherwise train on, unwatched
        progress(f"stopped {submission_id}")
        raise
    if info.status == JobStatus.SUCCEEDED:
        return 0
    # A failed entrypoint's message goes on with the log tail just streamed: keep its head.
    summary = (info.message or "").partition("\n")[0].split(", last available logs")[0]
    progress(f"job {submission_id} {info.status.value}: {summary}")
    return 1


def _connect(address: str):
    from ray.job_submission import JobSubmissionClient

    with _explicit_address():
        try:
            return JobSubmissionClient(address)
        except (OSError, RuntimeError):  # refused / timed out / answers but is no Ray job server
            raise UserError(f"no Ray cluster at {address} (is the dashboard/job server up?)") from None


@contextmanager
def _explicit_address():
    """Hides RAY_ADDRESS-style overrides while the client connects: `submit --address X` must
    talk to X, not to whatever cluster the shell happens to point at."""
    saved = {key: os.environ.pop(key) for key in _ADDRESS_OVERRIDES if key in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _snapshot(tmp: Path, train_config: Path, train: TrainConfig) -> Path:
    """One directory holding the project and, under .tunefetch-submit/, the train YAML with its
    datasets (paths rewritten relative to the YAML); it becomes the job's working_dir.

    Why a copy: Ray uploads exactly one working_dir, and the job must find code and inputs at
    known relative paths in it. Writing the inputs into the checkout instead would leave files
    behind after a crash and race concurrent submits; the copy is source only (EXCLUDES) and
    lives only until the upload is done. Staging via py_modules would hide the files at a path
    the entrypoint cannot name.
    """
    if not (PROJECT_ROOT / "pyproject.toml").is_file():
        raise UserError(f"submit uploads the tunefetch source tree, but {PROJECT_ROOT} is not one "
                        "(install tunefetch from a checkout: pip install -e .)")
    snapshot = tmp / "project"
    shutil.copytree(PROJECT_ROOT, snapshot, ignore=shutil.ignore_patterns(*EXCLUDES))
    stage = snapshot / STAGE_DIR
    data = read_yaml(train_config)  # the user's own keys, not every default, so the job validates the same input
    for i, (raw, spec) in enumerate(zip(data["datasets"], train.datasets)):
        # One folder per entry keeps the file name (errors name the user's file) without clashes.
        target = stage / "datasets" / str(i) / spec.path.name
        target.parent.mkdir(parents=True)
        shutil.copy2(spec.path, target)
        raw["path"] = target.relative_to(stage).as_posix()
    (stage / train_config.name).write_text(yaml.safe_dump(data, sort_keys=False))
    return snapshot


def _entrypoint(config_name: str, home: Path | None) -> str:
    """`python -m` in the working_dir runs the uploaded code with the cluster's Python (the
    `python` on its PATH, as for any Ray job), so the cluster needs no tunefetch console script.
    `--address auto` joins the cluster the job runs on instead of starting a private Ray."""
    argv = ["python", "-m", "cluster.cli", "train", f"{STAGE_DIR}/{config_name}", "--address", "auto"]
    if home is not None:
        # Absolute, like every verb's --home: relative to the job it would be its throw-away working_dir.
        argv += ["--home", str(Path(home).expanduser().resolve())]
    return shlex.join(argv)


def _stream_logs(client, submission_id: str, progress: Callable[[str], None]) -> None:
    """Follows the job's output line by line until the job ends (the server then closes the stream)."""
    import aiohttp

    async def tail() -> None:
        pending = ""
        async for chunk in client.tail_job_logs(submission_id):
            *lines, pending = (pending + chunk).split("\n")
            for line in lines:
                progress(line)
        if pending:
            progress(pending)

    try:
        asyncio.run(tail())
    except (RuntimeError, aiohttp.ClientError) as exc:  # the stream broke, not necessarily the job
        progress(f"lost the log stream of {submission_id} ({exc}); waiting for the job to end")


def _wait_for_end(client, submission_id: str, poll_s: float = 0.5):
    while True:
        info = client.get_job_info(submission_id)
        if info.status.is_terminal():
            return info
        time.sleep(poll_s)
