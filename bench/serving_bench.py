"""Serving benchmark: tunefetch's HTTP path (Serve proxy -> gateway -> vLLM generator) vs a
direct vLLM AsyncLLM call: same model, prompts, engine arguments and machine, one run. A third
path, Ray Serve's floor, is the same shape with no model (HTTP -> proxy -> FastAPI ingress ->
handle -> deployment): what Ray Serve itself costs per request on this machine. A fourth,
direct vLLM with its engine core placed as our generator places it on a CPU host (alone on one
core, one thread), separates what the engine loses by sharing the machine with Serve from what
the Serve path costs.

    .venv/bin/python bench/serving_bench.py [--rounds 3] [--requests 96] [--max-tokens 64] [--out FILE]
                                            [--no-pin-cpu-cores]   (ours without engine core pinning)

Each path runs in its own process (none warms another), for `--rounds` rounds, the order
rotating each round so drift on a shared machine falls on all. HTTP requests come from an
aiohttp client in the benchmark process (as in vLLM's own serving benchmark). Per path: p50
latency at concurrency 1, output tokens/s at concurrency 16 for the base model and for a mix
of the base model and two LoRA adapters (greedy: both paths generate the same tokens), and
where the CPU went during the concurrency-16 run: the vLLM engine core process vs every other
process on the machine (for us: Ray, the Serve proxy, gateway, generator replica and the HTTP
client; for direct: the calling process), per request. For us, the provenance records of the
base-model runs also split their p50 into time in the gateway and in the generator replica.
The floor's deployment answers after FLOOR_ANSWER_S without using CPU (about our request rate
at concurrency 16), so its CPU per request is the Serve path alone; its reported p50 at
concurrency 1 has that wait taken off. The report gives every round and the medians of the
per-round comparisons.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastapi import Request  # noqa: E402  (module level: FastAPI resolves the floor's annotations here)
from report import emit  # noqa: E402  (bench/report.py, beside this script)

QUESTIONS = ["What does error E-17 mean?", "How do I return a K-40?", "Tell me about DockStation installs.",
             "How long is the K-200 warranty?", "Who approves travel expenses?", "How do I update firmware?"]
ADAPTERS = ("bench-a@v1", "bench-b@v1")
ENGINE_TITLE = "VLLM::EngineCore"  # vLLM's process title for the engine core
PHASES = ("direct", "ours", "floor", "direct_one_core")
FLOOR_ANSWER_S = 0.5


def prompts(n: int) -> list[str]:
    return [f"{QUESTIONS[i % len(QUESTIONS)]} (ticket {i})" for i in range(n)]


def _cpu_seconds() -> dict[int, tuple[float, bool]]:
    """CPU seconds used so far by every user-space process: {pid: (seconds, is engine core)}."""
    tick = os.sysconf("SC_CLK_TCK")
    usage = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if cmdline:  # kernel threads have none
            usage[int(pid)] = ((int(fields[11]) + int(fields[12])) / tick, cmdline.startswith(ENGINE_TITLE.encode()))
    return usage


def _cpu_split(before: dict, after: dict) -> tuple[float, float]:
    """(engine core, everything else) CPU seconds between two `_cpu_seconds` snapshots."""
    engine = other = 0.0
    for pid, (seconds, is_engine) in after.items():
        used = seconds - before.get(pid, (0.0, False))[0]
        engine, other = (engine + used, other) if is_engine else (engine, other + used)
    return engine, other


async def _measure(call, items, concurrency: int) -> dict:
    """Runs `call(item) -> completion tokens` over items with a concurrency limit."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(item):
        async with gate:
            t0 = time.perf_counter()
            tokens = await call(item)
            latencies.append(time.perf_counter() - t0)
            return tokens

    cpu_before, started, wall_start = _cpu_seconds(), time.perf_counter(), time.time()
    tokens = sum(await asyncio.gather(*(one(i) for i in items)))
    elapsed = time.perf_counter() - started
    engine_cpu, other_cpu = _cpu_split(cpu_before, _cpu_seconds())
    return {"p50_ms": statistics.median(latencies) * 1000, "tokens_per_s": tokens / elapsed, "requests": len(items),
            "engine_cpu_ms_per_request": engine_cpu * 1000 / len(items),
            "other_cpu_ms_per_request": other_cpu * 1000 / len(items), "window": [wall_start, time.time()]}


async def _suite(base, mix, n: int) -> dict:
    """The same warm-up and measurements for every path; `mix` (None for the floor) spreads
    requests over the base model and the adapters (its warm-up loads them)."""
    await _measure(base, prompts(8), 4)
    results = {"c1": await _measure(base, prompts(max(n // 6, 8)), 1), "c16": await _measure(base, prompts(n), 16)}
    if mix is not None:
        await _measure(mix, prompts(6), 6)
        results["c16_adapter_mix"] = await _measure(mix, prompts(n), 16)
    return results


def _pick(models: list, question: str):
    return models[sum(map(ord, question)) % len(models)]


def run_direct(home: Path, n: int, max_tokens: int, one_core: bool = False) -> dict:
    """one_core: the engine core placed as our generator places it on a CPU host (one thread,
    alone on a claimed core, this process on the others): the engine's share of the machine
    under Serve, without Serve."""
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"})
    if one_core:
        os.environ["OMP_NUM_THREADS"] = "1"  # as Ray sets it for a 1-CPU generator replica
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    from cluster.config import load_config
    from serving.cpu_cores import claim_cores, start_on
    from training.registry import AdapterRegistry

    engine_cfg = load_config(home=home).serving.engine
    claim = claim_cores(1) if one_core else None
    if one_core and claim is None:
        raise SystemExit("--phase direct_one_core needs 2 free CPU cores")
    with start_on(claim.cores) if claim else nullcontext():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(home / "models" / "tiny-llama"), max_model_len=engine_cfg.max_model_len, enable_lora=True,
            max_loras=engine_cfg.max_loras, max_lora_rank=engine_cfg.max_lora_rank,
            distributed_executor_backend="uni", max_num_seqs=engine_cfg.max_num_seqs, seed=0))
    registry = AdapterRegistry(home / "adapters")
    loras = [LoRARequest(ref, i, str(registry.local_dir(registry.get(ref)))) for i, ref in enumerate(ADAPTERS, 1)]
    tokenizer = engine.get_tokenizer()
    # min_tokens: every answer is max_tokens long (the local model would often stop after a few).
    sampling = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0)
    counter = iter(range(10**9))

    def caller(models):
        async def call(question: str) -> int:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                                add_generation_prompt=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            final = None
            async for out in engine.generate({"prompt_token_ids": ids}, sampling, f"r{next(counter)}",
                                             lora_request=_pick(models, question)):
                final = out
            return len(final.outputs[0].token_ids)
        return call

    try:
        return asyncio.run(_suite(caller([None]), caller([None, *loras]), n))
    finally:
        engine.shutdown()


def _http_suite(url: str, models: tuple[list, list | None], n: int, max_tokens: int) -> dict:
    """`_suite` over HTTP: OpenAI chat requests to `url`; models = (base, mix or None)."""
    import aiohttp

    async def main():
        async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=300)) as session:
            def caller(choices):
                async def call(question: str) -> int:
                    body = {"model": _pick(choices, question), "messages": [{"role": "user", "content": question}],
                            "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0}
                    async with session.post("/v1/chat/completions", json=body) as response:
                        response.raise_for_status()
                        return (await response.json())["usage"]["completion_tokens"]
                return call

            return await _suite(caller(models[0]), models[1] and caller(models[1]), n)

    return asyncio.run(main())


def run_ours(home: Path, n: int, max_tokens: int, port: int, pin: bool) -> dict:
    from ray import serve

    from cluster.config import load_config
    from cluster.runtime import configure_process, ray_runtime
    from retrieval.milvus_endpoint import milvus_endpoint
    from serving.app import run_app
    from serving.provenance import ProvenanceLog

    # The shipped defaults: the engine's kernel threads follow generator.num_cpus (1 of 2 cores).
    config = load_config(home=home)
    engine = config.serving.engine.model_copy(update={"pin_cpu_cores": pin})
    config = config.model_copy(update={"serving": config.serving.model_copy(update={"port": port, "engine": engine})})
    configure_process(config)
    with ray_runtime(config), milvus_endpoint(config) as milvus:
        try:
            results = _http_suite(run_app(config, milvus), (["tiny-llama"], ["tiny-llama", *ADAPTERS]), n, max_tokens)
        finally:
            serve.shutdown()
    log = ProvenanceLog(config.paths.provenance)
    for measurement in ("c1", "c16"):
        results[measurement].update(_time_inside(log, results[measurement]["window"]))
    return results


def _time_inside(log, window: list[float]) -> dict:
    """Where the time of a measurement's requests went, from their provenance records: p50 in
    the gateway and in the generator replica (the rest of the client's p50 is HTTP + proxy)."""
    records = [r for r in log.recent(10**6) if window[0] <= r["time"] <= window[1]]
    return {"gateway_p50_ms": statistics.median(r["latency_ms"] for r in records),
            "generator_p50_ms": statistics.median(r["generation_ms"] for r in records)}


def _floor_app():
    """Ray Serve with nothing in it: a FastAPI ingress calling a deployment by handle, which
    answers a fixed text after FLOOR_ANSWER_S of sleep (no CPU), like a generation would."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
    class Answerer:
        async def generate(self, messages: list, max_tokens: int) -> dict:
            await asyncio.sleep(FLOOR_ANSWER_S)
            return {"text": "word " * max_tokens, "completion_tokens": max_tokens}

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Ingress:
        def __init__(self, answerer):
            self.answerer = answerer

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> dict:
            body = await request.json()
            out = await self.answerer.generate.remote(body["messages"], body["max_tokens"])
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]}}],
                    "usage": {"completion_tokens": out["completion_tokens"]}}

    return Ingress.bind(Answerer.bind())


def run_floor(home: Path, n: int, max_tokens: int, port: int) -> dict:
    from ray import serve

    from cluster.config import load_config
    from cluster.runtime import configure_process, ray_runtime

    config = load_config(home=home)
    configure_process(config)
    with ray_runtime(config):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(_floor_app(), name="floor", route_prefix="/")
        try:
            return _http_suite(f"http://127.0.0.1:{port}", (["floor"], None), n, max_tokens)
        finally:
            serve.shutdown()


def prepare(home: Path) -> None:
    """The local model and two random-weight LoRA adapters in the registry."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cluster.config import load_config
    from tunefetch.stack import ensure_local_model
    from training.local_model import ModelIdentity
    from training.registry import AdapterRegistry, DatasetLineage, TrainingLineage

    model_dir = ensure_local_model(load_config(home=home))
    registry = AdapterRegistry(home / "adapters")
    for seed, ref in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            lineage = TrainingLineage(base_model=ModelIdentity(id="tiny-llama", sha256="-"), run_id="bench",
                                      dataset=DatasetLineage(sha256="-", rows=0))
            registry.register(ref.split("@")[0], Path(tmp), lineage)


def _phase(phase: str, home: Path, args) -> dict:
    pinning = ["--no-pin-cpu-cores"] if args.no_pin_cpu_cores else []
    out = subprocess.run([sys.executable, __file__, "--phase", phase, "--home", str(home), "--requests",
                          str(args.requests), "--max-tokens", str(args.max_tokens), *pinning],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(direct: dict, ours: dict, floor: dict, direct_one_core: dict) -> dict:
    """One round's comparisons."""
    return {
        "added_p50_ms_c1": ours["c1"]["p50_ms"] - direct["c1"]["p50_ms"],
        "added_p50_ms_c1_vs_direct_one_core": ours["c1"]["p50_ms"] - direct_one_core["c1"]["p50_ms"],
        "p50_ms_c1_ours_in_gateway": ours["c1"]["gateway_p50_ms"],
        "p50_ms_c1_ours_in_generator": ours["c1"]["generator_p50_ms"],
        "serve_floor_p50_ms_c1": floor["c1"]["p50_ms"] - FLOOR_ANSWER_S * 1000,
        "throughput_ratio_c16": ours["c16"]["tokens_per_s"] / direct["c16"]["tokens_per_s"],
        "throughput_ratio_c16_vs_direct_one_core": ours["c16"]["tokens_per_s"] / direct_one_core["c16"]["tokens_per_s"],
        "direct_one_core_vs_direct_c16": direct_one_core["c16"]["tokens_per_s"] / direct["c16"]["tokens_per_s"],
        "p50_ms_c16_ours": ours["c16"]["p50_ms"],
        "p50_ms_c16_ours_in_gateway": ours["c16"]["gateway_p50_ms"],
        "p50_ms_c16_ours_in_generator": ours["c16"]["generator_p50_ms"],
        "p50_ms_c16_direct": direct["c16"]["p50_ms"],
        "p50_ms_c16_direct_one_core": direct_one_core["c16"]["p50_ms"],
        "adapter_mix_vs_base_c16_ours": ours["c16_adapter_mix"]["tokens_per_s"] / ours["c16"]["tokens_per_s"],
        "adapter_mix_vs_base_c16_direct": direct["c16_adapter_mix"]["tokens_per_s"] / direct["c16"]["tokens_per_s"],
        "other_cpu_ms_per_request_c16_ours": ours["c16"]["other_cpu_ms_per_request"],
        "other_cpu_ms_per_request_c16_direct": direct["c16"]["other_cpu_ms_per_request"],
        "other_cpu_ms_per_request_c16_serve_floor": floor["c16"]["other_cpu_ms_per_request"],
        "engine_cpu_ms_per_request_c16_ours": ours["c16"]["engine_cpu_ms_per_request"],
        "engine_cpu_ms_per_request_c16_direct": direct["c16"]["engine_cpu_ms_per_request"],
    }


def summarize(rounds: list[dict]) -> dict:
    """Median and range of each comparison over the rounds."""
    keys = rounds[0]["compared"].keys()
    return {k: {"median": statistics.median(r["compared"][k] for r in rounds),
                "min": min(r["compared"][k] for r in rounds), "max": max(r["compared"][k] for r in rounds)}
            for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency-16 measurement")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-pin-cpu-cores", action="store_true", help="ours: serving.engine.pin_cpu_cores off")
    parser.add_argument("--phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase in ("direct", "direct_one_core"):
        print(json.dumps(run_direct(args.home, args.requests, args.max_tokens, args.phase == "direct_one_core")))
        return
    if args.phase == "ours":
        print(json.dumps(run_ours(args.home, args.requests, args.max_tokens, 18123, not args.no_pin_cpu_cores)))
        return
    if args.phase == "floor":
        print(json.dumps(run_floor(args.home, args.requests, args.max_tokens, 18124)))
        return
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        prepare(home)
        for i in range(args.rounds):
            order = PHASES[i % len(PHASES):] + PHASES[:i % len(PHASES)]
            result = {phase: _phase(phase, home, args) for phase in order}
            rounds.append({**result, "compared": compare(**result)})
    emit({"machine": {"cpus": os.cpu_count()}, "pin_cpu_cores": not args.no_pin_cpu_cores, "summary": summarize(rounds), "rounds": rounds}, args.out)


if __name__ == "__main__":
    main()
