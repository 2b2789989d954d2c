"""Guards and structured output benchmark: what they cost on the serving path, in one run.

One `tunefetch serve` stack (in this process: Ray, Serve, the vLLM generator) and two API keys:
one bound to a guard policy with every check on (prompt and output limits, three denied topics,
PII redaction, a source allow-list), one bound to none. Each round, in rotating order:

- guards off vs on, whole answers and streams (streams run the hold-back window);
- free text vs `response_format` json_schema (xgrammar-constrained decoding);

at concurrency 8 with greedy decoding. Guard rows and free text force every answer to
`max_tokens` (min_tokens), so both sides generate the same token counts; schema answers end
where the grammar closes the JSON (budget: twice max_tokens), and free text then runs forced to
their mean length: the schema row compares output tokens/s at equal answer lengths, and reports
the share of outputs valid against the schema. A last row times the guard code alone
(microseconds per prompt check and per answer check, in this process), the part of the overhead
that is ours rather than the machine's noise.

    .venv/bin/python bench/guards_bench.py [--home HOME] [--rounds 2] [--requests 48] [--max-tokens 48] [--out FILE]

--home reuses a home whose local model is built (its keys file gets two more keys); by default
a new one is made, which builds the model first (minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jsonschema import Draft202012Validator  # noqa: E402

QUESTIONS = ["What does error E-17 mean?", "How do I return a K-40?", "Tell me about DockStation installs.",
             "How long is the K-200 warranty?", "Who approves travel expenses?", "How do I update firmware?"]
POLICY = {"max_prompt_chars": 4000, "max_output_tokens": 512, "pii": "redact", "sources": ["*"],
          "denied_topics": {"weapons": ["weapons?", "explosives?", "firearms?", "ammunition", "detonators?"],
                            "medical": ["diagnos[ie]s", "prescriptions?", "dosage"],
                            "legal": ["lawsuits?", "legal advice", "sue"]}}
TICKET = {"type": "object", "additionalProperties": False, "required": ["product", "answer", "escalate"],
          "properties": {"product": {"type": "string", "maxLength": 16}, "answer": {"type": "string", "maxLength": 48},
                         "escalate": {"type": "boolean"}}}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "ticket", "strict": True, "schema": TICKET}}
ANSWER = ("The K-40 dock charges in two hours. Contact support@example.com or +44 20 7946 0958 for a "
          "replacement; warranty cases quote order 2026-12-03-1234. ") * 4


async def _measure(session, key: str, n: int, concurrency: int, **extra) -> dict:
    """n chat requests; returns p50 latency, output tokens/s and ms per output token."""
    gate, latencies, tokens, valid = asyncio.Semaphore(concurrency), [], [], []
    stream = extra.pop("stream", False)
    checker = Draft202012Validator(TICKET) if "response_format" in extra else None

    async def one(i: int):
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": f"{QUESTIONS[i % 6]} (ticket {i})"}],
                "temperature": 0, **extra}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        async with gate:
            t0 = time.perf_counter()
            async with session.post("/v1/chat/completions", json=body,
                                    headers={"Authorization": f"Bearer {key}"}) as response:
                response.raise_for_status()
                if stream:
                    used = 0
                    async for line in response.content:
                        if line.startswith(b"data: {") and b'"usage"' in line:
                            used = json.loads(line[6:]).get("usage", {}).get("completion_tokens", used)
                else:
                    answer = await response.json()
                    used = answer["usage"]["completion_tokens"]
                    if checker is not None:
                        valid.append(_valid(checker, answer["choices"][0]["message"]["content"]))
            latencies.append(time.perf_counter() - t0)
            tokens.append(used)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - started
    return {"p50_ms": round(statistics.median(latencies) * 1000, 1), "tokens_per_s": round(sum(tokens) / elapsed, 1),
            "ms_per_output_token": round(elapsed * 1000 / max(sum(tokens), 1), 2),
            "mean_output_tokens": round(sum(tokens) / n, 1),
            **({"schema_valid_share": sum(valid) / len(valid)} if valid else {})}


def _valid(checker, text: str) -> bool:
    try:
        return checker.is_valid(json.loads(text))
    except ValueError:
        return False


async def _round(url: str, keys: dict, n: int, max_tokens: int, order: list[str]) -> dict:
    import aiohttp

    fixed = {"max_tokens": max_tokens, "min_tokens": max_tokens}
    cases = {
        "guards_off": (keys["off"], fixed), "guards_on": (keys["on"], fixed),
        "guards_off_stream": (keys["off"], {**fixed, "stream": True}),
        "guards_on_stream": (keys["on"], {**fixed, "stream": True}),
        "json_schema": (keys["off"], {"max_tokens": 2 * max_tokens, "response_format": SCHEMA}),
    }
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await _measure(session, keys["off"], 8, 4, max_tokens=8)  # warm-up
        await _measure(session, keys["off"], 4, 4, max_tokens=8, response_format=SCHEMA)  # grammar compile cache
        results = {name: await _measure(session, cases[name][0], n, 8, **cases[name][1]) for name in order}
        # Free text as long as the schema answers were, so per-request costs weigh the same on both.
        length = round(results["json_schema"]["mean_output_tokens"])
        results["free_text"] = await _measure(session, keys["off"], n, 8, max_tokens=length, min_tokens=length)
        return results


def guard_code_cost(reps: int = 2000) -> dict:
    """Microseconds of our guard code per prompt check and per answer check (no server)."""
    from cluster.config import GuardsConfig
    from serving import pii
    from serving.guards import GuardBook

    guarded = GuardBook(GuardsConfig(policies={"all": POLICY}, default="all")).for_request(None, None)
    prompt = QUESTIONS[0] + " My email is jane@example.com."

    def per_call(check) -> float:
        return round(timeit.timeit(check, number=reps) / reps * 1e6, 1)

    return {"answer_chars": len(ANSWER), "us_per_answer_check": per_call(lambda: guarded.scan(ANSWER)),
            "us_per_prompt_check": per_call(lambda: (guarded.topics["all"].match(prompt), pii.redact(prompt)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--home", type=Path, help="a home with the local model built (default: a new one)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from ray import serve
    from report import emit  # bench/report.py, beside this script (tests import the functions above)

    from cluster.config import GuardsConfig, load_config
    from cluster.runtime import configure_process, ray_runtime
    from retrieval.milvus_endpoint import milvus_endpoint
    from serving.app import run_app
    from serving.keys import KeyRing
    from tunefetch.stack import ensure_local_model

    home = args.home or Path(tempfile.mkdtemp(prefix="guards-bench-"))
    config = load_config(home=home)
    ensure_local_model(config)
    guards = GuardsConfig(policies={"all": POLICY})
    config = config.model_copy(update={"governance": config.governance.model_copy(update={"guards": guards})})
    ring = KeyRing(config.paths.keys)
    keys = {"off": ring.create("bench")[1], "on": ring.create("bench", policy="all")[1]}
    configure_process(config)
    names = ["guards_off", "guards_on", "guards_off_stream", "guards_on_stream", "json_schema"]
    rounds = []
    with ray_runtime(config), milvus_endpoint(config) as milvus:
        try:
            url = run_app(config, milvus)
            for r in range(args.rounds):
                pairs = names[:4]
                order = pairs[r % 2::2] + pairs[(r + 1) % 2::2] + names[4:]  # alternate which of a pair runs first
                rounds.append(asyncio.run(_round(url, keys, args.requests, args.max_tokens, order)))
        finally:
            serve.shutdown()

    def median(case: str, field: str) -> float:
        return statistics.median(r[case][field] for r in rounds)

    summary = {
        "guards_on_vs_off_tokens_per_s": round(median("guards_on", "tokens_per_s") / median("guards_off", "tokens_per_s"), 3),
        "guards_on_vs_off_stream_tokens_per_s": round(median("guards_on_stream", "tokens_per_s")
                                                      / median("guards_off_stream", "tokens_per_s"), 3),
        "schema_vs_free_tokens_per_s": round(median("json_schema", "tokens_per_s") / median("free_text", "tokens_per_s"), 3),
        "schema_vs_free_ms_per_output_token": round(median("json_schema", "ms_per_output_token")
                                                    / median("free_text", "ms_per_output_token"), 3),
    }
    emit({"requests": args.requests, "max_tokens": args.max_tokens, "concurrency": 8, "summary": summary,
          "guard_code": guard_code_cost(), "rounds": rounds}, args.out)


if __name__ == "__main__":
    main()
