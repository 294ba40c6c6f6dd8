"""Typed settings: the server and one `ModelSpec` per served model.

Defaults live here and nowhere else. `load_config` reads `dormant.yaml`, applies
command-line overrides and fails with `ConfigError` naming the key and the fix;
it never asserts. What a worker would refuse is refused here, before anything starts: the
engine (engines/base.py registry), its `engine_args` (the engine's own torch-free check) and
the model source (store/models.py, offline; an HF repo id is taken on its syntax). No torch.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import shlex
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from dormant.durations import NEVER, DurationError, parse_duration
from dormant.engines.base import EngineArgsError, UnknownEngine, engine_names, get_engine
from dormant.sizes import SizeError, parse_bytes, parse_share, parse_tokens
from dormant.store.models import SourceNotFound, check_source, is_gguf_source
from dormant.store.paths import store_root
from dormant.worker_api import REASONING_PARSERS, TOOL_CALL_PARSERS

DEFAULT_MODEL_ID = "smollm2"
DEFAULT_MODEL_SOURCE = "builtin:smollm2"
DEFAULT_PORT = 8000


class ConfigError(ValueError):
    """Bad configuration; the message names the key and how to fix it."""


def _duration(value: Any, key: str) -> float:
    """durations.parse_duration, its error a ConfigError."""
    try:
        return parse_duration(value, key)
    except DurationError as exc:
        raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class ModelSpec:
    """How one model is served. `id` is the name clients put in `model`."""

    id: str
    source: str
    engine: str = "native"  # a config that names none (or "auto") gets auto_engine's pick
    engine_args: dict[str, Any] = field(default_factory=dict)
    # Idle tiers (DESIGN.md section 3), each counted from the end of the last request; a tier
    # at or after a later one is skipped. -1 never, 0 at once.
    sleep_after: float = 300.0  # weights leave the accelerator; the process stays
    # after sleep, the process's whole GPU state goes to host memory (the driver's checkpoint
    # API): 0 GPU bytes, the process stays. Off by default until measured on more drivers
    suspend_after: float = NEVER
    hibernate_after: float = 1800.0  # the worker exits; its engine image stays on disk
    stop_after: float = NEVER  # the worker exits and its engine image is deleted
    # in flight inside one replica; None: as many as its engine batches (the worker reports its
    # max_num_seqs: 256 for the native engine on a GPU), so a burst is not cut to 8 (issue 12)
    max_concurrent_requests: int | None = None
    max_queue: int = 64  # held requests beyond that; more get 429
    min_replicas: int = 0  # replicas kept ready (keep-warm)
    max_replicas: int = 1  # 1 only for now: several replicas per model are not built yet
    start_timeout: float | None = None  # None: scaled from the model's size on disk
    max_queue_wait: float = 120.0  # a request held longer gets 503 + Retry-After; -1 never
    aliases: tuple[str, ...] = ()
    # how replies are parsed into tool_calls / reasoning_content; None: from the chat template
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # Placement (issue 10, lifecycle/placement.py). The KV allotment: bytes, or tokens; None:
    # the fleet's default (a share that lets several models live on one GPU; the engine's own
    # gpu_memory_utilization sizing when the model is alone on its device).
    kv_cache_memory: int | None = None
    kv_cache_tokens: int | None = None  # `kv_cache_memory: "32768 tokens"`
    pin: bool = False  # never evicted to make room for another model
    preload: bool = False  # started with the server (subject to the budgets)
    device: str | None = None  # "cpu", "cuda:N"; None: the engine's choice, placed on cuda:0
    # the asleep tier's level: 1 keeps the weights in host memory, 2 drops them (a wake reloads)
    sleep_level: int = 1
    # engine vllm: the command that starts its OpenAI server (the model and flags are appended);
    # () -> `python3 -m vllm.entrypoints.openai.api_server` (python3 on PATH). In dormant.yaml:
    # `vllm_command` (a list, or a string split as a shell would), or `vllm_python` (a path)
    vllm_command: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)


@dataclass(frozen=True)
class Size:
    """A budget: `bytes`, or a `share` of the whole (device memory, RAM, the store's disk);
    neither: the default share (lifecycle/budgets.py)."""

    bytes: int | None = None
    share: float | None = None


@dataclass(frozen=True)
class Budgets:
    """`budgets:` in dormant.yaml (issue 10). gpu_memory applies to each GPU unless
    `gpu_memory_per_device` names it (`gpu_memory: {cuda:0: 60GiB, cuda:1: 80%}`)."""

    gpu_memory: Size = Size()
    gpu_memory_per_device: dict[str, Size] = field(default_factory=dict)
    host_memory: Size = Size()  # asleep weights (and, on a CPU-only machine, running models)
    disk: Size = Size()  # engine images in the store


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_keys: tuple[str, ...] = ()
    api_key_file: Path | None = None
    allow_insecure_bind: bool = False  # serve a non-loopback address with no API key
    store: Path | None = None  # None: $DORMANT_HOME or ~/.dormant
    zygote: bool = True  # fork workers from a template that has imported torch (DESIGN.md 4e)
    # on a GPU, the zygote keeps one worker forked ahead with its CUDA context (worker/standby.py)
    standby_worker: bool = True
    max_request_body_bytes: int = 16 * 1024 * 1024  # larger bodies get 413 at the gateway (issue 15)
    shutdown_grace: float = 10.0  # on SIGTERM, in-flight requests get this long before they are ended
    # the watchdog probes each worker's /health this often (each probe given as long); this many
    # unanswered in a row and the worker is killed and restarted (issue 15). -1: no watchdog
    worker_health_interval: float = 5.0
    worker_health_failures: int = 3
    # a request waits this long for a byte from its worker, then is a 504; -1: forever (issue 15)
    worker_read_timeout: float = 600.0
    # browser origins allowed to call the API (CORS); none by default. Requests still need the key
    allowed_origins: tuple[str, ...] = ()
    # clients (issue 15): a request head must be in within client_header_timeout of the
    # connection's opening or of its first byte (slowloris), a body within client_body_timeout of
    # its head (a 16 MiB body at 280 KB/s), else 408; a keep-alive connection idle for
    # client_idle_timeout is closed: above the pools of httpx and the openai SDK (5 s) and aiohttp
    # (15 s), so a client retires an idle connection before we close it. -1: no bound
    client_header_timeout: float = 10.0
    client_body_timeout: float = 60.0
    client_idle_timeout: float = 30.0
    budgets: Budgets = field(default_factory=lambda: Budgets())
    preload: tuple[str, ...] = ()  # model ids started with the server, beside each `preload: true`
    models: tuple[ModelSpec, ...] = ()

    def model(self, name: str) -> ModelSpec | None:
        for spec in self.models:
            if name in spec.names:
                return spec
        return None

    def store_path(self) -> Path:
        return store_root(self.store)


_SERVER_KEYS = {"host", "port", "api_key_file", "allow_insecure_bind", "store", "zygote", "standby_worker", "models",
               "max_request_body_bytes", "shutdown_grace", "worker_health_interval", "worker_health_failures",
               "worker_read_timeout", "allowed_origins", "client_header_timeout", "client_body_timeout",
               "client_idle_timeout", "budgets", "preload"}
_MODEL_KEYS = {f.name for f in fields(ModelSpec)} - {"id", "kv_cache_tokens"} | {"vllm_python"}
_BUDGET_KEYS = ("gpu_memory", "host_memory", "disk")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
# the engine_args that size the KV cache some other way than kv_cache_memory
_KV_ENGINE_ARGS = ("kv_cache_memory", "kv_cache_tokens", "num_kv_blocks")
# model keys that only the native engine takes (_placed_engine_args refuses them for another)
_NATIVE_ONLY_KEYS = ("kv_cache_memory", "device")


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


AUTO_ENGINE = "auto"  # a model's `engine` when its config names none


def auto_engine(source: str, engine_args: dict[str, Any] | None = None, native_keys: tuple[str, ...] = ()) -> str:
    """`engine: auto`: llama.cpp for a GGUF source (a .gguf file, a folder holding one, the
    embedded SmolLM2) on a machine without an NVIDIA GPU, where the binding is installed (issue
    14: the same file decodes at ~4.8x the native engine's speed on 2 cores, with no dequantized
    copy); the native engine for everything else. Torch-free: the GPU is looked for in /dev, as
    the driver makes it.

    Auto never picks an engine that would refuse the model's config: `native_keys` (model keys
    that only the native engine takes: kv_cache_memory, device) or engine_args that the llama.cpp
    engine does not have keep the native engine."""
    if not is_gguf_source(source) or _has_nvidia_gpu() or native_keys:
        return "native"
    llamacpp = get_engine("llamacpp")
    if not llamacpp.is_available():
        return "native"
    try:
        llamacpp.check_args(dict(engine_args or {}))
    except EngineArgsError:
        return "native"
    return "llamacpp"


def _has_nvidia_gpu() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


def _int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _optional_int(value: Any, key: str, minimum: int) -> int | None:
    return None if value is None else _int(value, key, minimum)


def parse_model_spec(model_id: str, raw: Any, defaults: dict[str, Any] | None = None) -> ModelSpec:
    """One entry of the `models:` map; `defaults` are command-line flags for every model."""
    where = f"models.{model_id}"
    if raw is None:
        raw = {}
    if isinstance(raw, str):
        raw = {"source": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with at least `source`, got {raw!r}")
    unknown = set(raw) - _MODEL_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)}; known keys are {sorted(_MODEL_KEYS)}"
        )
    merged = {**(defaults or {}), **raw}
    source = merged.get("source") or (DEFAULT_MODEL_SOURCE if model_id == DEFAULT_MODEL_ID else None)
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{where}.source: required (a local folder, a .gguf file or an HF repo id)")
    engine_args = merged.get("engine_args") or {}
    if not isinstance(engine_args, dict):
        raise ConfigError(f"{where}.engine_args: expected a mapping, got {engine_args!r}")
    engine = merged.get("engine", AUTO_ENGINE)
    if engine == AUTO_ENGINE:
        native_keys = tuple(k for k in _NATIVE_ONLY_KEYS if merged.get(k) is not None)
        engine = auto_engine(source, engine_args, native_keys)
    engine_args = _checked_engine_args(where, engine, engine_args)
    aliases = merged.get("aliases") or ()
    if isinstance(aliases, str):
        aliases = (aliases,)
    if not all(isinstance(a, str) and a for a in aliases):
        raise ConfigError(f"{where}.aliases: expected a list of names, got {aliases!r}")
    start_timeout = merged.get("start_timeout")
    kv_bytes, kv_tokens = _kv_allotment(merged.get("kv_cache_memory"), f"{where}.kv_cache_memory")
    device = _device(merged.get("device"), f"{where}.device")
    engine_args = _placed_engine_args(where, engine, engine_args, kv_bytes, kv_tokens, device)
    spec = ModelSpec(
        id=model_id,
        source=source,
        engine=engine,
        engine_args=engine_args,
        sleep_after=_duration(merged.get("sleep_after", ModelSpec.sleep_after), f"{where}.sleep_after"),
        suspend_after=_duration(merged.get("suspend_after", ModelSpec.suspend_after), f"{where}.suspend_after"),
        hibernate_after=_duration(merged.get("hibernate_after", ModelSpec.hibernate_after),
                                  f"{where}.hibernate_after"),
        stop_after=_duration(merged.get("stop_after", ModelSpec.stop_after), f"{where}.stop_after"),
        max_concurrent_requests=_optional_int(merged.get("max_concurrent_requests"),
                                              f"{where}.max_concurrent_requests", 1),
        max_queue=_int(merged.get("max_queue", ModelSpec.max_queue), f"{where}.max_queue", 0),
        min_replicas=_int(merged.get("min_replicas", ModelSpec.min_replicas), f"{where}.min_replicas", 0),
        max_replicas=_int(merged.get("max_replicas", ModelSpec.max_replicas), f"{where}.max_replicas", 1),
        start_timeout=None if start_timeout is None else _duration(start_timeout, f"{where}.start_timeout"),
        max_queue_wait=_duration(merged.get("max_queue_wait", ModelSpec.max_queue_wait), f"{where}.max_queue_wait"),
        aliases=tuple(aliases),
        tool_call_parser=_one_of(merged.get("tool_call_parser"), TOOL_CALL_PARSERS, f"{where}.tool_call_parser"),
        reasoning_parser=_one_of(merged.get("reasoning_parser"), REASONING_PARSERS, f"{where}.reasoning_parser"),
        kv_cache_memory=kv_bytes,
        kv_cache_tokens=kv_tokens,
        pin=_bool(merged.get("pin", False), f"{where}.pin"),
        preload=_bool(merged.get("preload", False), f"{where}.preload"),
        device=device,
        sleep_level=_one_of_levels(merged.get("sleep_level", ModelSpec.sleep_level), f"{where}.sleep_level"),
        vllm_command=_vllm_command(where, engine, merged),
    )
    if spec.min_replicas > spec.max_replicas:
        raise ConfigError(f"{where}.min_replicas: {spec.min_replicas} exceeds max_replicas {spec.max_replicas}")
    if spec.max_replicas > 1:  # refused rather than ignored: the fleet runs one replica a model
        raise ConfigError(f"{where}.max_replicas: {spec.max_replicas}: more than one replica per model "
                          "(scale-up under load) is not built yet; use 1")
    return spec


def _one_of_levels(value: Any, key: str) -> int:
    if value not in (1, 2) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected 1 (weights kept in host memory) or 2 (weights dropped), got {value!r}")
    return value


def _vllm_command(where: str, engine: Any, merged: dict[str, Any]) -> tuple[str, ...]:
    command, python = merged.get("vllm_command"), merged.get("vllm_python")
    if command is None and python is None:
        return ()
    if engine != "vllm":
        raise ConfigError(f"{where}.{'vllm_command' if command is not None else 'vllm_python'}: "
                          f"only for engine: vllm (this model's engine is {engine!r})")
    if command is not None and python is not None:
        raise ConfigError(f"{where}.vllm_python: give vllm_command or vllm_python, not both")
    if python is not None:
        if not isinstance(python, str) or not python:
            raise ConfigError(f"{where}.vllm_python: expected the path of a Python, got {python!r}")
        return (python, "-m", "vllm.entrypoints.openai.api_server")
    if isinstance(command, str):
        command = shlex.split(command)
    if not isinstance(command, list) or not command or not all(isinstance(c, str) and c for c in command):
        raise ConfigError(f"{where}.vllm_command: expected a command (a string or a list), got {command!r}")
    return tuple(command)


def _one_of(value: Any, names: tuple[str, ...], key: str) -> str | None:
    if value is None or value in names:
        return value
    close = difflib.get_close_matches(str(value), names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"{key}: unknown parser {value!r}; {hint}known: {', '.join(names)} "
                      "(or leave it out: it is detected from the chat template)")


def _checked_engine_args(where: str, engine: Any, engine_args: dict[str, Any]) -> dict[str, Any]:
    """The engine's own check of its settings (torch-free), its error named by the config key."""
    try:
        spec = get_engine(engine if isinstance(engine, str) else repr(engine))
    except UnknownEngine:
        close = difflib.get_close_matches(str(engine), engine_names(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{where}.engine: unknown engine {engine!r}; {hint}"
                          f"known engines: {', '.join(engine_names())}") from None
    try:
        return dict(spec.check_args(dict(engine_args)))
    except EngineArgsError as exc:
        key = f"{where}.engine_args" + (f".{exc.key}" if exc.key else "")
        message = str(exc).removeprefix(f"{exc.key}: ") if exc.key else str(exc)
        raise ConfigError(f"{key}: {message}") from None


def _kv_allotment(value: Any, key: str) -> tuple[int | None, int | None]:
    """(bytes, tokens) from `8GiB` or `32768 tokens`; (None, None) when absent."""
    if value is None:
        return None, None
    tokens = parse_tokens(value)
    if tokens is not None:
        if tokens <= 0:
            raise ConfigError(f"{key}: expected a positive number of tokens, got {value!r}")
        return None, tokens
    try:
        return parse_bytes(value, key), None
    except SizeError as exc:
        raise ConfigError(f"{exc}, or tokens like '32768 tokens'") from None


def _device(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise ConfigError(f"{key}: expected cpu or cuda:N (cuda:0, cuda:1...), got {value!r}")
    return "cuda:0" if value == "cuda" else value


def _placed_engine_args(where: str, engine: str, engine_args: dict[str, Any], kv_bytes: int | None,
                        kv_tokens: int | None, device: str | None) -> dict[str, Any]:
    """The engine's own settings for `kv_cache_memory` and `device` (only the native engine
    takes them; another would ignore them, so they are refused)."""
    if kv_bytes is None and kv_tokens is None and device is None:
        return engine_args
    if engine != "native":
        raise ConfigError(f"{where}: kv_cache_memory and device are taken by the native engine only; "
                          f"set the {engine} engine's own engine_args instead")
    args = dict(engine_args)
    if kv_bytes is not None or kv_tokens is not None:
        clash = [k for k in _KV_ENGINE_ARGS if k in args]
        if clash:
            raise ConfigError(f"{where}.kv_cache_memory: engine_args.{clash[0]} sizes the KV cache too; keep one")
        args["kv_cache_memory" if kv_bytes is not None else "kv_cache_tokens"] = kv_bytes or kv_tokens
    if device is not None:
        wanted = "cpu" if device == "cpu" else "cuda"
        if args.get("device", wanted) not in (wanted, "auto"):
            raise ConfigError(f"{where}.device: {device!r} contradicts engine_args.device {args['device']!r}; keep one")
        args["device"] = wanted
    return args


def _size(value: Any, key: str) -> Size:
    if value is None or value == "auto":
        return Size()
    share = parse_share(value)
    if share is not None:
        if not 0 < share <= 1:
            raise ConfigError(f"{key}: expected a share in (0%, 100%], got {value!r}")
        return Size(share=share)
    try:
        return Size(bytes=parse_bytes(value, key))
    except SizeError as exc:
        raise ConfigError(f"{exc}, a share like 80%, or auto") from None


def parse_budgets(raw: Any) -> Budgets:
    """The `budgets:` mapping; ConfigError names the key (budgets.gpu_memory...)."""
    if raw is None:
        return Budgets()
    if not isinstance(raw, dict):
        raise ConfigError(f"budgets: expected a mapping with {', '.join(_BUDGET_KEYS)}, got {raw!r}")
    unknown = set(raw) - set(_BUDGET_KEYS)
    if unknown:
        raise ConfigError(f"budgets: unknown key(s) {sorted(unknown)}; known keys are {list(_BUDGET_KEYS)}")
    gpu = raw.get("gpu_memory")
    per_device: dict[str, Size] = {}
    if isinstance(gpu, dict):
        for dev, value in gpu.items():
            key = f"budgets.gpu_memory.{dev}"
            if not isinstance(dev, str) or not re.match(r"^cuda:\d+$", dev):
                raise ConfigError(f"{key}: expected a device named cuda:N, got {dev!r}")
            per_device[dev] = _size(value, key)
        gpu = None
    return Budgets(gpu_memory=_size(gpu, "budgets.gpu_memory"), gpu_memory_per_device=per_device,
                   host_memory=_size(raw.get("host_memory"), "budgets.host_memory"),
                   disk=_size(raw.get("disk"), "budgets.disk"))


def _preload(raw: Any, specs: dict[str, ModelSpec]) -> tuple[str, ...]:
    """Server-level `preload:` (model ids or aliases) plus every model's `preload: true`."""
    names = [raw] if isinstance(raw, str) else raw or []
    if not isinstance(names, list):
        raise ConfigError(f"preload: expected a list of model ids, got {raw!r}")
    ids: list[str] = []
    for name in names:
        spec = next((s for s in specs.values() if name in s.names), None)
        if spec is None:
            raise ConfigError(f"preload: {name!r} is not a configured model; known: {', '.join(specs)}")
        ids.append(spec.id)
    ids += [s.id for s in specs.values() if s.preload]
    return tuple(dict.fromkeys(ids))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_keys(path: Path | None) -> tuple[str, ...]:
    """Keys from `DORMANT_API_KEY` (comma-separated) and the key file (one per line, # comments)."""
    keys = [k.strip() for k in os.environ.get("DORMANT_API_KEY", "").split(",") if k.strip()]
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"api_key_file: cannot read {path}: {exc.strerror}") from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return tuple(dict.fromkeys(keys))


def load_config(
    path: Path | None = None,
    *,
    models: list[str] | None = None,
    host: str | None = None,
    port: int | None = None,
    api_key_file: Path | None = None,
    allow_insecure_bind: bool | None = None,
    store: Path | None = None,
    shutdown_grace: str | float | None = None,
    model_defaults: dict[str, Any] | None = None,
) -> ServerConfig:
    """The server config: file first, command-line values over it.

    `models` are extra model sources from the command line (`dormant serve MODEL ...`); each
    is a configured id, or a source served under a derived id. With no model anywhere the
    embedded default `smollm2` is served. `model_defaults` (sleep_after, suspend_after, hibernate_after,
    stop_after from flags) apply to every model, overriding the file.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config: {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config: {path} must hold a mapping at the top level")
    unknown = set(raw) - _SERVER_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)}; known keys are {sorted(_SERVER_KEYS)}")

    raw_models = raw.get("models") or {}
    if not isinstance(raw_models, dict):
        raise ConfigError("models: expected a mapping of model id -> settings")
    defaults = {k: v for k, v in (model_defaults or {}).items() if v is not None}
    specs: dict[str, ModelSpec] = {}
    for model_id, entry in raw_models.items():
        spec = parse_model_spec(str(model_id), entry)
        specs[spec.id] = replace(spec, **_parsed_defaults(defaults, spec.id))
    wanted = list(models or [])
    if not specs and not wanted:
        wanted = [DEFAULT_MODEL_ID]
    from_args: dict[str, str] = {}  # model id -> the command-line source that named it
    for name in wanted:
        if name in specs or any(name in s.aliases for s in specs.values()):
            continue
        model_id = DEFAULT_MODEL_ID if name in (DEFAULT_MODEL_ID, DEFAULT_MODEL_SOURCE) else _derive_id(name)
        source = DEFAULT_MODEL_SOURCE if model_id == DEFAULT_MODEL_ID else name
        specs[model_id] = parse_model_spec(model_id, {"source": source}, defaults)
        if models:
            from_args[model_id] = name
    _check_unique_names(specs.values())
    store_dir = store or (Path(raw["store"]).expanduser() if raw.get("store") else None)
    for spec in specs.values():
        try:
            check_source(spec.source, store_root(store_dir))
        except SourceNotFound as exc:
            key = f"MODEL argument {from_args[spec.id]!r}" if spec.id in from_args else f"models.{spec.id}.source"
            raise ConfigError(f"{key}: {exc}") from None

    key_file = api_key_file or (Path(raw["api_key_file"]).expanduser() if raw.get("api_key_file") else None)
    cfg = ServerConfig(
        host=host or str(raw.get("host", ServerConfig.host)),
        port=_int(port if port is not None else raw.get("port", DEFAULT_PORT), "port", 0),
        api_key_file=key_file,
        api_keys=read_api_keys(key_file),
        allow_insecure_bind=bool(
            allow_insecure_bind if allow_insecure_bind is not None else raw.get("allow_insecure_bind", False)
        ),
        store=store_dir,
        zygote=_bool(raw.get("zygote", ServerConfig.zygote), "zygote"),
        standby_worker=_bool(raw.get("standby_worker", ServerConfig.standby_worker), "standby_worker"),
        max_request_body_bytes=_int(raw.get("max_request_body_bytes", ServerConfig.max_request_body_bytes),
                                    "max_request_body_bytes", 1),
        shutdown_grace=_duration(shutdown_grace if shutdown_grace is not None
                                 else raw.get("shutdown_grace", ServerConfig.shutdown_grace), "shutdown_grace"),
        worker_health_interval=_positive_duration(raw.get("worker_health_interval", ServerConfig.worker_health_interval),
                                                  "worker_health_interval"),
        worker_read_timeout=_positive_duration(raw.get("worker_read_timeout", ServerConfig.worker_read_timeout),
                                               "worker_read_timeout"),
        worker_health_failures=_int(raw.get("worker_health_failures", ServerConfig.worker_health_failures),
                                    "worker_health_failures", 1),
        allowed_origins=_origins(raw.get("allowed_origins")),
        **{key: _positive_duration(raw.get(key, getattr(ServerConfig, key)), key)
           for key in ("client_header_timeout", "client_body_timeout", "client_idle_timeout")},
        budgets=parse_budgets(raw.get("budgets")),
        preload=_preload(raw.get("preload"), specs),
        models=tuple(specs.values()),
    )
    if cfg.shutdown_grace < 0:
        raise ConfigError("shutdown_grace: expected a duration like 10s or 0 (end requests at once), "
                          f"got {shutdown_grace if shutdown_grace is not None else raw.get('shutdown_grace')!r}")
    if cfg.port > 65535:
        raise ConfigError(f"port: {cfg.port} is not a TCP port (0-65535)")
    if not is_loopback(cfg.host) and not cfg.api_keys and not cfg.allow_insecure_bind:
        raise ConfigError(
            f"host: refusing to serve {cfg.host} (not loopback) without an API key; set "
            "DORMANT_API_KEY or --api-key-file, or pass --allow-insecure-bind if you mean it"
        )
    return cfg


def _origins(value: Any) -> tuple[str, ...]:
    """`allowed_origins`: a list of origins (scheme://host[:port]) or "*"."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(o, str) and o for o in value):
        raise ConfigError(f"allowed_origins: expected a list of origins like https://app.example.com, got {value!r}")
    for origin in value:
        if origin != "*" and ("://" not in origin or origin.endswith("/")):
            raise ConfigError(f"allowed_origins: {origin!r} is not an origin; write scheme://host[:port], "
                              "with no path or trailing slash, or \"*\"")
    return tuple(value)


def _positive_duration(value: Any, key: str) -> float:
    """A duration where 0 makes no sense (a probe given 0 s, a request given 0 s); -1: never."""
    seconds = _duration(value, key)
    if seconds == 0:
        raise ConfigError(f"{key}: expected a duration above 0 (or -1: never), got 0")
    return seconds


def _parsed_defaults(defaults: dict[str, Any], model_id: str) -> dict[str, Any]:
    return {k: _duration(v, f"--{k.replace('_', '-')}") for k, v in defaults.items()}


def _derive_id(source: str) -> str:
    """`Qwen/Qwen3-0.6B` -> `Qwen/Qwen3-0.6B`; `/models/foo/` -> `foo`; `x.gguf` -> `x`."""
    p = Path(source)
    if source.startswith(("/", ".", "~")) or p.suffix == ".gguf":
        return p.stem if p.suffix == ".gguf" else p.name
    return source


def _check_unique_names(specs) -> None:
    seen: dict[str, str] = {}
    for spec in specs:
        for name in spec.names:
            if name in seen:
                raise ConfigError(f"models.{spec.id}.aliases: name {name!r} is already used by {seen[name]!r}")
            seen[name] = spec.id
