"""The generator deployment: one vLLM engine serving the base model and many LoRA adapters.

Requests name an immutable registry version (`NAME@vN`) as their Serve multiplexed model id.
The replica loads it on demand (from a remote registry: a hash-verified local copy) and Serve
routes later requests for it to replicas that already hold it. vLLM keeps `max_loras` on the
device and `max_cpu_loras` in memory, least-recently-used first; Serve's per-replica adapter
list has the same size and policy, so the router's view matches the engine's. Each version gets
its own LoRA id for the life of the replica, so an id never points at other weights.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from ray import serve

from cluster.config import DeploymentOptions, EngineConfig, RegistryConfig, TelemetryConfig
from cluster.errors import UserError
from cluster.telemetry import extract_context, ms_since, setup_tracing, tracer
from serving.cpu_cores import CoreClaim, claim_cores, start_on
from serving.protocol import APIError
from training.registry import open_registry

logger = logging.getLogger("ray.serve")
# Raw control characters are not allowed inside JSON strings, yet xgrammar (0.2.8) lets a
# byte-fallback token put one there. Compact structured output has no whitespace outside
# strings, so escaping every control character keeps the value and makes the JSON valid (with
# serving.engine.json_whitespace on, whitespace between tokens is left as the model wrote it).
_CONTROL = re.compile(r"[\x00-\x1f]")


def json_escaped(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


@dataclass
class Generation:
    texts: list[str]
    finish_reasons: list[str | None]
    prompt_tokens: int
    completion_tokens: int
    replica: str | None = None  # the generator replica that produced it
    elapsed_ms: float | None = None  # time in that replica: prompt rendering to the last token


def engine_args(engine: EngineConfig, model_path: str, served_model_name: str) -> dict:
    """vLLM AsyncEngineArgs keyword arguments: the config section's vLLM fields as they are, plus
    what tunefetch always needs (LoRA on, the served name, the executor)."""
    args = engine.vllm_args()
    # In-process engine core ("uni") on one device: on a few cores the replica, engine core and
    # worker processes would otherwise fight for CPUs. Tensor parallelism needs worker processes.
    args.setdefault("distributed_executor_backend", "uni" if engine.tensor_parallel_size == 1 else "mp")
    return {**args, "model": model_path, "served_model_name": served_model_name, "enable_lora": True}


def _claim_engine_cores(engine: EngineConfig, options: DeploymentOptions) -> CoreClaim | None:
    """On CPU hosts, cores of its own for the engine core (serving/cpu_cores.py)."""
    count = int(options.num_cpus)  # the engine's kernel threads: Ray sets OMP_NUM_THREADS from num_cpus
    if not engine.pin_cpu_cores or options.num_gpus > 0 or count < 1:
        return None
    claim = claim_cores(count)
    if claim is None:
        logger.warning("engine core not pinned: no %d free core(s) on this node with one left over", count)
    else:
        logger.info("engine core pinned to CPU core(s) %s", sorted(claim.cores))
    return claim


def check_adapter_files(path: Path) -> None:
    """Reads what vLLM will load (the config, every tensor) so a truncated or corrupt version is
    refused with the reason before it reaches the engine."""
    from safetensors import safe_open

    config = json.loads((path / "adapter_config.json").read_text())
    if not isinstance(config, dict) or "r" not in config:
        raise ValueError("adapter_config.json is not a LoRA config")
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as weights:
        for name in weights.keys():
            weights.get_tensor(name)


@serve.deployment
class Generator:
    def __init__(self, engine: EngineConfig, options: DeploymentOptions, registry: RegistryConfig,
                 telemetry: TelemetryConfig, model_path: str, served_model_name: str):
        setup_tracing(telemetry, "generator")
        self.model_name = served_model_name
        self.cores = _claim_engine_cores(engine, options)
        with start_on(self.cores.cores) if self.cores else nullcontext():
            self.engine = self._start_engine(engine_args(engine, model_path, served_model_name))
        self.tokenizer = self.engine.get_tokenizer()
        self.max_model_len = engine.max_model_len
        self.json_whitespace = engine.json_whitespace
        self.registry = open_registry(registry)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._lora_ids: dict[str, int] = {}

        async def load(ref: str):
            return await self._load_adapter(ref)

        self._adapter = serve.multiplexed(max_num_models_per_replica=engine.max_cpu_loras or engine.max_loras)(load)

    @staticmethod
    def _start_engine(args: dict):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            parsed = AsyncEngineArgs(**args)
        except TypeError as exc:  # an unknown key of serving.engine.extra_args
            raise UserError(f"serving.engine: {exc}") from None
        return AsyncLLM.from_engine_args(parsed)

    async def _load_adapter(self, ref: str):
        from vllm.lora.request import LoRARequest

        version = await asyncio.to_thread(self.registry.get, ref)
        path = await asyncio.to_thread(self.registry.local_dir, version)
        request = LoRARequest(ref, self._lora_ids.setdefault(ref, len(self._lora_ids) + 1), str(path))
        try:
            await asyncio.to_thread(check_adapter_files, path)
            await self.engine.add_lora(request)
        except Exception as exc:  # noqa: BLE001 - a broken version fails its requests, never the engine
            reason = str(exc).splitlines()[0][:300] if str(exc) else exc.__class__.__name__
            raise APIError(400, f"adapter {ref} cannot be loaded: {reason}", code="adapter_unloadable") from None
        return request

    def metrics_text(self) -> str:
        """This replica's process registry, where the engine keeps its Prometheus series (vllm:*)."""
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(REGISTRY).decode()

    async def _lora_request(self):
        """The adapter this request was routed for (its multiplexed model id), loaded."""
        ref = serve.get_multiplexed_model_id()
        return await self._adapter(ref) if ref else None

    def render_chat(self, messages: list[dict]) -> list[int]:
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)

    def _prepare(self, prompt: dict, params: dict, output_kind):
        """Token ids + sampling params; rejects prompts that cannot fit the context."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        ids = self.render_chat(prompt["messages"]) if "messages" in prompt else self.tokenizer.encode(prompt["text"])
        max_tokens = params["max_tokens"]
        if len(ids) + max_tokens > self.max_model_len:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                f"model's context length {self.max_model_len}", code="context_length_exceeded")
        sampling = SamplingParams(
            n=params["n"], max_tokens=max_tokens, min_tokens=min(params["min_tokens"], max_tokens),
            temperature=params["temperature"], top_p=params["top_p"], stop=params["stop"], seed=params["seed"],
            presence_penalty=params.get("presence_penalty", 0.0), frequency_penalty=params.get("frequency_penalty", 0.0),
            output_kind=output_kind,
            structured_outputs=StructuredOutputsParams(**params["structured_outputs"])
            if params.get("structured_outputs") else None,
        )
        return ids, sampling

    def _escape(self, sampling):
        return json_escaped if sampling.structured_outputs and not self.json_whitespace else str

    async def _outputs(self, ids: list[int], sampling, lora):
        """The engine's outputs for one request. What vLLM refuses as the client's fault when the
        request is added (a schema feature the grammar backend lacks) is the caller's 400."""
        from vllm.exceptions import VLLMClientError

        outputs = self.engine.generate({"prompt_token_ids": ids}, sampling, uuid.uuid4().hex, lora_request=lora)
        try:
            first = await outputs.__anext__()
        except StopAsyncIteration:
            return
        except (VLLMClientError, ValueError) as exc:
            reason = str(exc).splitlines()[0][:300]
            if sampling.structured_outputs is not None:
                raise APIError(400, f"response_format: the schema cannot be enforced ({reason})",
                               code="invalid_response_format") from None
            raise APIError(400, f"the engine refused the request ({reason})") from None
        yield first
        async for output in outputs:
            yield output

    @staticmethod
    def _span(trace: dict):
        return tracer("tunefetch.generator").start_as_current_span("generate", context=extract_context(trace))

    def _describe(self, span, prompt: dict, lora, params: dict, usage: tuple[int, int]) -> None:
        span.set_attribute("gen_ai.operation.name", "chat" if "messages" in prompt else "text_completion")
        span.set_attribute("gen_ai.request.model", lora.lora_name if lora else self.model_name)
        span.set_attribute("tunefetch.generator.replica", self.replica)
        span.set_attribute("gen_ai.request.max_tokens", params["max_tokens"])
        span.set_attribute("gen_ai.usage.input_tokens", usage[0])
        span.set_attribute("gen_ai.usage.output_tokens", usage[1])

    async def generate(self, prompt: dict, params: dict, trace: dict) -> Generation:
        """prompt: {"messages": [...]} (chat template applied here) or {"text": "..."}."""
        from vllm.sampling_params import RequestOutputKind

        started = time.perf_counter()
        with self._span(trace) as span:
            ids, sampling = self._prepare(prompt, params, RequestOutputKind.FINAL_ONLY)
            lora = await self._lora_request()
            final = None
            async for output in self._outputs(ids, sampling, lora):
                final = output
            completions = sorted(final.outputs, key=lambda o: o.index)
            escape = self._escape(sampling)
            result = Generation(
                texts=[escape(o.text) for o in completions],
                finish_reasons=[o.finish_reason for o in completions],
                prompt_tokens=len(ids),
                completion_tokens=sum(len(o.token_ids) for o in completions),
                replica=self.replica,
                elapsed_ms=ms_since(started),
            )
            self._describe(span, prompt, lora, params, (result.prompt_tokens, result.completion_tokens))
            return result

    async def generate_stream(self, prompt: dict, params: dict, trace: dict):
        """Yields {"index", "text", "finish_reason"} deltas, then one {"usage", "replica", "elapsed_ms"}
        item."""
        from vllm.sampling_params import RequestOutputKind

        started = time.perf_counter()
        with self._span(trace) as span:
            # Cumulative outputs, diffed here: vLLM coalesces steps under load, and the running
            # totals keep text and token counts exact however the steps arrive.
            ids, sampling = self._prepare(prompt, params, RequestOutputKind.CUMULATIVE)
            lora = await self._lora_request()
            sent: dict[int, int] = {}
            tokens: dict[int, int] = {}
            escape = self._escape(sampling)
            async for output in self._outputs(ids, sampling, lora):
                for o in output.outputs:
                    delta = escape(o.text[sent.get(o.index, 0):])
                    sent[o.index], tokens[o.index] = len(o.text), len(o.token_ids)
                    if delta or o.finish_reason:
                        yield {"index": o.index, "text": delta, "finish_reason": o.finish_reason}
            usage = (len(ids), sum(tokens.values()))
            self._describe(span, prompt, lora, params, usage)
            yield {"usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}, "replica": self.replica,
                   "elapsed_ms": ms_since(started)}

    def check_health(self) -> None:
        if self.engine.errored:
            raise RuntimeError("vLLM engine errored")

    def __del__(self):  # Serve tears the replica down: stop the engine's threads with it
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        if getattr(self, "cores", None):
            self.cores.release()
