"""Running a tunefetch command as a Ray job on a (remote) Ray cluster, via its job server.

The job runs an uploaded copy of this project with the cluster's own Python; the inputs it
needs (a config, its datasets) are staged beside the code by the caller.
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

from cluster.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STAGE_DIR = ".tunefetch-submit"
# Never uploaded: environments, local state, VCS data, tests, benchmarks and build leftovers.
EXCLUDES = (".venv", ".tunefetch", ".git", "__pycache__", "tests", "bench", "*.egg-info",
            ".pytest_cache", "build", "dist")
# Ray lets these silently replace the address a client is given (as ray.init does).
_ADDRESS_OVERRIDES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# Ray's job client loggers: "ray" covers packaging; the two SDK modules pin their own INFO level.
_RAY_CLIENT_LOGGERS = ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk")


def submit(address: str, entrypoint: list[str], stage: Callable[[Path], None], name: str,
           metadata: dict | None = None, progress: Callable[[str], None] = print) -> int:
    """Submits `entrypoint` (argv, run in the uploaded project; paths under STAGE_DIR are what
    `stage(dir)` wrote there) to the job server at `address` (e.g. http://127.0.0.1:8265) and
    streams its logs to `progress` until it ends; 0 if it succeeded. Ctrl-C stops the job."""
    with _quiet_ray_client():
        client = _connect(address)
        submission_id = f"tunefetch-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        with tempfile.TemporaryDirectory(prefix="tunefetch-submit-") as tmp:
            snapshot = _snapshot(Path(tmp))
            stage(snapshot / STAGE_DIR)
            # submit_job zips and uploads the working_dir before it returns: the temp copy can go.
            client.submit_job(entrypoint=shlex.join(entrypoint), submission_id=submission_id,
                              runtime_env={"working_dir": str(snapshot)}, metadata=metadata or {})
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


def _snapshot(tmp: Path) -> Path:
    """A copy of the project's source (EXCLUDES left out) that becomes the job's working_dir.

    Why a copy: Ray uploads exactly one working_dir, and the job must find code and inputs at
    known relative paths in it. Writing the inputs into the checkout instead would leave files
    behind after a crash and race concurrent submits; the copy lives only until the upload.
    """
    if not (PROJECT_ROOT / "pyproject.toml").is_file():
        raise UserError(f"submit uploads the tunefetch source tree, but {PROJECT_ROOT} is not one "
                        "(install tunefetch from a checkout: pip install -e .)")
    snapshot = tmp / "project"
    shutil.copytree(PROJECT_ROOT, snapshot, ignore=shutil.ignore_patterns(*EXCLUDES))
    return snapshot


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
