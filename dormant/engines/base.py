"""The Engine protocol every engine implements, and the registry that finds engines by name.

The worker talks to engines only through what is here; it never names an engine's modules.
An engine package (``dormant.engines.native``, later ``vllm``, ``llamacpp``) exposes one
``ENGINE: EngineSpec`` at its top level, and importing that top level must not import torch:
the gateway validates ``engine_args`` at config load through ``EngineSpec.check_args``.

    spec = get_engine("native")            # EngineSpec; UnknownEngine for a bad name
    spec.check_args({"dtype": "flaot16"})  # EngineArgsError naming the key (no torch)
    spec.prepare(args)                     # worker, first: start what can run early
    spec.context_error()                   # standby: the prepared context's failure, or None
    loaded = spec.load(model_dir, args)    # worker: LoadedModel(engine, tokenizer, max_model_len)

Exceptions:
    ValueError
     ├── UnknownEngine     no engine by that name
     └── EngineArgsError   an engine_args key or value the engine refuses; `.key` names it
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

# name -> the package whose top level holds `ENGINE`; a lazy import keeps torch out of the gateway
_PACKAGES = {"native": "dormant.engines.native", "llamacpp": "dormant.engines.llamacpp",
             "vllm": "dormant.engines.vllm"}


class UnknownEngine(ValueError):
    pass


class EngineArgsError(ValueError):
    """An engine setting the engine refuses; the message names the key and the fix."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Guidance:
    """A constraint on what may be generated (structured output, forced tool calls): the
    sampler masks every token that would leave it. `value` by kind: "json_schema" a schema
    dict, "json_object" None (any JSON object), "regex" a pattern, "choice" a list of strings,
    "grammar" a grammar in llguidance's Lark syntax (which may embed `%json{...}` schemas)."""

    kind: Literal["json_schema", "json_object", "regex", "choice", "grammar"]
    value: Any = None


@dataclass
class SamplingParams:
    """How one request samples. Penalties and logit_bias change the logits every row samples
    from (greedy too); top_k, min_p and top_p narrow a sampled row's distribution."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: until EOS or max_model_len
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    guidance: Guidance | None = None
    presence_penalty: float = 0.0  # minus this for every token the output already holds
    frequency_penalty: float = 0.0  # minus this times the count of the token in the output
    repetition_penalty: float = 1.0  # vLLM's: logits of prompt and output tokens divided (> 0) or multiplied by it
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    top_k: int = 0  # 0: every token
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    logprobs: int | None = None  # per output token: its logprob and this many top alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token but the first (no prefix cache)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def changes_logits(self) -> bool:
        """Whether the logits are processed before the argmax or the draw (penalties, bias)."""
        return self.has_penalties or bool(self.logit_bias)


@dataclass(frozen=True)
class TokenLogprob:
    """One position's token with its log-probability under the model (the raw logits' log
    softmax, before penalties and temperature, as vLLM reports them), and the `top` most likely
    tokens there, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """What `generate` yields: the new tokens since the last output."""

    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per new token, when params.logprobs is set
    # with params.prompt_logprobs, in the first output: one per prompt token, None for the first
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def then(self, later: RequestOutput) -> RequestOutput:
        """This output and the next one of the same request, as one."""
        logprobs = None if self.logprobs is None and later.logprobs is None else [
            *(self.logprobs or ()), *(later.logprobs or ())]
        return RequestOutput(self.new_token_ids + later.new_token_ids, later.finished, later.finish_reason,
                             logprobs, self.prompt_logprobs or later.prompt_logprobs)


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do beyond generating; the worker answers 400 for what it cannot."""

    sleep_levels: tuple[int, ...] = ()  # (1,): weights kept in host memory; 2: weights dropped
    engine_image: bool = False  # can write an image that a later start restores from
    logprobs: bool = True  # SamplingParams.logprobs / prompt_logprobs
    guidance: bool = True  # SamplingParams.guidance (structured output, forced tool calls)


@dataclass
class StartupReport:
    """An engine's own account of its load, folded into the worker's cold-start profile."""

    phases: dict[str, float] = field(default_factory=dict)  # inside the worker's model_init
    overlapped: dict[str, float] = field(default_factory=dict)  # ran beside the phases
    weights_source: str | None = None  # "image", "safetensors", ... (where the weights came from)


@dataclass
class EngineStats:
    """Memory and load figures for /stats (worker_api.WorkerStats carries them on)."""

    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    is_sleeping: bool = False
    num_running: int = 0
    num_waiting: int = 0
    weights_source: str | None = None
    image_dir: str | None = None  # where this engine's image is (or will be) written
    # the most requests one step batches (vLLM's name): the worker's capacity, which the gateway
    # admits at once unless the model's max_concurrent_requests says otherwise; None: unknown
    max_num_seqs: int | None = None
    # the loop's work since the start, for a burst's figures (bench/bench_burst.py): steps run and
    # the seconds inside them; of those, the decode graphs' seconds on the GPU (CUDA; 0 elsewhere)
    num_steps: int = 0
    step_seconds: float = 0.0
    num_decode_graph_steps: int = 0
    decode_graph_gpu_seconds: float = 0.0


class Engine(Protocol):
    """A loaded model that generates; one per worker. All methods are called from the
    worker's event loop."""

    capabilities: Capabilities

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Tokens as they come; closing the iterator early aborts the request."""

    async def check_guidance(self, guidance: Guidance) -> str | None:
        """Why the engine cannot follow `guidance` (an invalid schema, regex or grammar), or
        None; the worker asks before it admits a guided request, to answer a 400."""

    async def sleep(self, level: int) -> None:
        """Wait for in-flight requests, then release the accelerator (one of capabilities.sleep_levels)."""

    async def wake_up(self) -> None: ...

    @property
    def is_sleeping(self) -> bool: ...

    async def save_image(self) -> str | None:
        """Make sure the engine image is on disk; its folder (None without the capability)."""

    def stats(self) -> EngineStats: ...

    def startup_report(self) -> StartupReport: ...

    def shutdown(self) -> None: ...


@dataclass
class LoadedModel:
    engine: Engine
    tokenizer: Any  # a transformers tokenizer: encode, decode, apply_chat_template, eos_token_id
    max_model_len: int


def _no_context_error() -> str | None:
    return None


def _no_preload(sources: list[str]) -> None:
    return None


def _always() -> bool:
    return True


def _no_image_dir(model_dir: Path, engine_args: dict[str, Any]) -> Path | None:
    return None


@dataclass(frozen=True)
class EngineSpec:
    """One engine, as the registry knows it. Only `load` and `prepare` may import torch."""

    name: str
    # validate and normalise engine_args at config load (torch-free); raises EngineArgsError
    check_args: Callable[[dict[str, Any]], dict[str, Any]]
    # whether a model with these args may run on a GPU (the standby worker is kept for those)
    may_use_gpu: Callable[[dict[str, Any]], bool]
    # the worker's first step: start, in the background, what the load can overlap (a CUDA context)
    prepare: Callable[[dict[str, Any]], None]
    # load the model from its folder; the worker's slow step
    load: Callable[[Path, dict[str, Any]], LoadedModel]
    # modules a worker imports in its import phase, before `prepare` (the engine's core)
    import_modules: tuple[str, ...] = ()
    # further modules a zygote imports before it forks workers (none may touch CUDA at import)
    preload_modules: tuple[str, ...] = ()
    # after `prepare`: waits for what it started and says why it failed (None: it did not, or
    # nothing was started); a standby worker that cannot run exits instead of being handed out
    context_error: Callable[[], str | None] = _no_context_error
    # a standby worker's idle time: start loading, in the background, what of these model
    # sources it can before it knows which one it serves (the native engine: tokenizers)
    preload_tokenizers: Callable[[list[str]], None] = _no_preload
    # where this model's engine image is written (None: the engine writes none); may import torch
    image_dir: Callable[[Path, dict[str, Any]], Path | None] = _no_image_dir
    # the engine reads a GGUF as it is: the worker hands `load` the .gguf file or a folder
    # holding one (store/models.py materialize_gguf), never a dequantized copy
    reads_gguf: bool = False
    # a model's context is capped at this where engine_args.max_model_len is not set (what the
    # gateway says before a start: /v1/models, /api/ps)
    default_max_model_len: int = 8192
    # whether it can run here (its library is installed); `engine: auto` asks (torch-free)
    is_available: Callable[[], bool] = _always
    # an engine that is its own OpenAI server (vLLM): (command, model_dir, served names, Unix
    # socket, engine_args) -> its argv; the worker runs it and relays to it instead of `load`
    server_command: Callable[[list[str], Path, list[str], Path, dict[str, Any]], list[str]] | None = None
    # (bytes held while running, while asleep) for the model at this path with these args, read
    # from its files before it has run (torch-free; the placement policy sizes with it). None:
    # the lifecycle's own estimate from a Hugging Face folder (lifecycle/budgets.py)
    memory_footprint: Callable[[Path, dict[str, Any]], tuple[int, int]] | None = None
    # it computes on the CPU whatever the machine has (the placement policy charges host RAM)
    cpu_only: bool = False

    @property
    def writes_image(self) -> bool:
        """Whether it writes engine images (the placer makes room on disk before its cold starts)."""
        return self.image_dir is not _no_image_dir


def engine_names() -> list[str]:
    return sorted(_PACKAGES)


def get_engine(name: str) -> EngineSpec:
    """The engine registered as `name`; UnknownEngine names the known ones."""
    if name not in _PACKAGES:
        raise UnknownEngine(f"unknown engine {name!r}; known engines: {', '.join(engine_names())}")
    return importlib.import_module(_PACKAGES[name]).ENGINE
