"""Sustained load: mixed requests (base model, adapter, retrieval, streaming, completions) at a
fixed concurrency against `tunefetch serve`; what fails, how slow, whether memory stays flat,
whether every answer has its provenance record.

    .venv/bin/python bench/load_bench.py --home HOME [--requests 2000] [--concurrency 32]
                                         [--adapter support] [--kb kestrel] [--out FILE]
    .venv/bin/python bench/load_bench.py --url http://127.0.0.1:8000 --home HOME ...   (a running server)

Without --url it starts `tunefetch serve --home HOME` on a free port and stops it afterwards
(HOME needs the local model, the adapter and the store: `tunefetch demo` makes them).
Reported: status counts (only 429/503 with Retry-After may be non-200), throughput, latency
p50/p95/p99 (whole answers; streams: to the last byte), per-process RSS of the serving
processes sampled every second, with the slope after warm-up (MB per 1,000 requests; flat is
about 0), and the answered requests whose provenance id is missing from the log (0).
tests/reliability/test_load.py runs a bounded smoke of the same function.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = ["What is the payload capacity of the K-40?", "How do I return a DockStation?",
             "What does error E-17 mean?", "How long is the K-200 warranty?", "Who approves travel?"]
# Serving processes by command line: Ray Serve replicas, the vLLM engine core, Ray's own, Milvus.
PROCESS_KINDS = {"ServeReplica:": "replica", "ServeController": "serve controller", "ProxyActor": "serve proxy",
                 "VLLM::EngineCore": "vllm engine core", "raylet": "raylet", "gcs_server": "gcs",
                 "milvus_lite": "milvus lite", "tunefetch serve": "tunefetch cli"}
# Errors a client should retry: overload, a replica or the store backend down, the record log down.
RETRYABLE_CODES = {"server_overloaded", "service_unavailable", "retrieval_unavailable", "provenance_unavailable"}
WARM_UP = 0.2  # share of the run left out of the RSS slope


@dataclass
class LoadReport:
    requests: int
    concurrency: int
    statuses: dict[str, int] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)  # non-200 without a retryable status + Retry-After, or a hang
    latencies_ms: list[float] = field(default_factory=list)
    provenance_ids: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None

        return {"requests": self.requests, "concurrency": self.concurrency, "statuses": self.statuses,
                "bad": self.bad[:20], "bad_count": len(self.bad), "wall_s": round(self.wall_s, 1),
                "throughput_rps": round(self.requests / self.wall_s, 2) if self.wall_s else None,
                "latency_ms": {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99),
                               "mean": round(statistics.fmean(lat), 1) if lat else None}}


def request_mix(i: int, base: str, adapter: str, kb: str) -> tuple[str, dict]:
    """The i-th request of the mix: (path, body)."""
    question = f"{QUESTIONS[i % len(QUESTIONS)]} (ticket {i})"
    chat = {"messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0}
    kind = i % 5
    if kind == 0:
        return "/v1/chat/completions", {"model": base, **chat}
    if kind == 1:
        return "/v1/chat/completions", {"model": adapter, **chat}
    if kind == 2:
        return "/v1/chat/completions", {"model": adapter, **chat, "retrieval": {"kb": kb, "top_k": 3}}
    if kind == 3:
        return "/v1/chat/completions", {"model": base, **chat, "stream": True, "retrieval": {"kb": kb}}
    return "/v1/completions", {"model": base, "prompt": question, "max_tokens": 16, "temperature": 0}


async def run_load(url: str, requests: int, concurrency: int, base: str, adapter: str, kb: str,
                   timeout_s: float = 120.0, on_done=None) -> LoadReport:
    """Sends `requests` mixed requests, `concurrency` at a time; `on_done(n)` after each."""
    import httpx

    report = LoadReport(requests, concurrency)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                path, body = request_mix(i, base, adapter, kb)
                await _one(client, path, body, report)
                if on_done:
                    on_done(len(report.latencies_ms) + len(report.bad))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        report.wall_s = time.perf_counter() - started
    return report


async def _one(client, path: str, body: dict, report: LoadReport) -> None:
    started = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as response:
            raw = await response.aread()
    except Exception as exc:  # noqa: BLE001 - a timeout or a dropped connection is a finding, not a crash
        report.bad.append(f"{body['model']}: {exc.__class__.__name__}")
        report.statuses["no answer"] = report.statuses.get("no answer", 0) + 1
        return
    status = str(response.status_code)
    if response.status_code == 200 and body.get("stream") and b"data: [DONE]" not in raw:
        # A stream that failed after its first bytes ends with an error event instead of [DONE]:
        # counted as that, not as a 200 (each request lands in exactly one bucket).
        error = _error_event(raw)
        status = "stream error event" if error and error.get("code") in RETRYABLE_CODES else "stream broken"
        report.statuses[status] = report.statuses.get(status, 0) + 1
        if status == "stream broken":
            report.bad.append(f"{body['model']}: stream ended without [DONE] or a retryable error: {raw[-200:]!r}")
        return
    report.statuses[status] = report.statuses.get(status, 0) + 1
    if response.status_code == 200:
        ids = _provenance_ids(raw, body.get("stream", False))
        if len(ids) != 1:
            report.bad.append(f"{body['model']}: 200 without one provenance id")
            return
        report.provenance_ids.append(ids.pop())
        report.latencies_ms.append((time.perf_counter() - started) * 1000)
    elif response.status_code in (429, 503) and response.headers.get("retry-after"):
        report.latencies_ms.append((time.perf_counter() - started) * 1000)
    else:
        report.bad.append(f"{body['model']}: {status} {raw[:200]!r}")


def _error_event(raw: bytes) -> dict | None:
    for line in reversed(raw.decode(errors="replace").splitlines()):
        if line.startswith("data: {"):
            return json.loads(line[6:]).get("error")
    return None


def _provenance_ids(raw: bytes, stream: bool) -> set[str]:
    if not stream:
        return {json.loads(raw)["provenance_id"]}
    ids = set()
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            if "provenance_id" in chunk:
                ids.add(chunk["provenance_id"])
    return ids


def missing_records(home: Path, provenance_ids: list[str]) -> list[str]:
    """Answered requests whose provenance record is not in HOME/provenance."""
    logged = set()
    for path in (home / "provenance").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                logged.add(json.loads(line)["provenance_id"])
    return [pid for pid in provenance_ids if pid not in logged]


# -- memory ------------------------------------------------------------------------------------
def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def serving_processes(home: Path) -> dict[int, str]:
    """{pid: "kind pid"} of the processes serving HOME: everything in the session of its
    `tunefetch serve` (Ray, Serve replicas, vLLM engine cores) and its Milvus Lite server."""
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    home_arg = str(home.resolve())
    sessions = set()
    for pid in pids:
        cmdline = _cmdline(pid)
        if "tunefetch serve" in cmdline and home_arg in cmdline:
            try:
                sessions.add(os.getsid(int(pid)))
            except OSError:
                pass
    found = {}
    for pid in pids:
        cmdline = _cmdline(pid)
        try:
            ours = os.getsid(int(pid)) in sessions or ("milvus" in cmdline and home_arg in cmdline)
        except OSError:
            continue
        kind = next((k for needle, k in PROCESS_KINDS.items() if needle in cmdline), None)
        if ours and kind:
            label = cmdline.split("ServeReplica:", 1)[1].split()[0] if kind == "replica" else kind
            found[int(pid)] = f"{label} {pid}"
    return found


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class MemorySampler:
    """RSS of every serving process against requests done, sampled every `every_s`."""

    def __init__(self, home: Path, every_s: float = 1.0):
        self.every_s = every_s
        self.processes = serving_processes(home)
        self.samples: list[tuple[int, dict[int, float]]] = []  # (requests done, {pid: MB})
        self.done = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.samples.append((self.done, {pid: mb for pid in self.processes if (mb := rss_mb(pid)) is not None}))
            try:
                await asyncio.wait_for(stop.wait(), self.every_s)
            except TimeoutError:
                pass

    def slopes(self, total: int) -> dict[str, dict]:
        """Per process: RSS at the end and the least-squares slope after warm-up (MB / 1,000 requests)."""
        out = {}
        for pid, label in self.processes.items():
            points = [(done, mbs[pid]) for done, mbs in self.samples if pid in mbs and done >= WARM_UP * total]
            if len(points) < 3:
                continue
            xs, ys = zip(*points)
            mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
            var = sum((x - mean_x) ** 2 for x in xs)
            slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0
            out[label] = {"rss_mb_end": round(ys[-1], 1), "slope_mb_per_1k_requests": round(slope * 1000, 2)}
        return out


# -- the run -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(home: Path) -> tuple[subprocess.Popen, str]:
    import httpx
    import yaml

    port = _free_port()
    config = home / f"load-bench-{port}.yaml"
    config.write_text(yaml.safe_dump({"serving": {"port": port}}))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "tunefetch"), "serve", "--home", str(home),
                             "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"tunefetch serve did not come up (exit {proc.poll()})")


async def measure(url: str, home: Path, requests: int, concurrency: int, adapter: str, kb: str) -> dict:
    import httpx

    base = next(m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"] if m["parent"] is None)
    await run_load(url, 2 * concurrency, concurrency, base, adapter, kb)  # warm: adapters loaded, caches filled
    sampler, stop = MemorySampler(home), asyncio.Event()
    sampling = asyncio.create_task(sampler.run(stop))

    def done(n: int) -> None:
        sampler.done = n

    report = await run_load(url, requests, concurrency, base, adapter, kb, on_done=done)
    stop.set()
    await sampling
    return {**report.summary(), "answered": len(report.provenance_ids),
            "records_missing": len(missing_records(home, report.provenance_ids)),
            "memory": sampler.slopes(requests)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--url", default=None, help="a running server for HOME (default: start one)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--adapter", default="support")
    parser.add_argument("--kb", default="kestrel")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from report import emit  # bench/report.py, beside this script

    proc, url = (None, args.url) if args.url else _start_server(args.home)
    try:
        result = asyncio.run(measure(url, args.home, args.requests, args.concurrency, args.adapter, args.kb))
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)
    emit({"bench": "load", **result}, args.out)


if __name__ == "__main__":
    main()
