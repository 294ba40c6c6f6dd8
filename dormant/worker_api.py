"""The worker contract, spelled once: how a worker is launched, the routes it serves, what its
/stats says, and the one client the lifecycle (control) and the gateway (requests) speak it with.

    LaunchSpec  <->  argv of `python -m dormant.worker` (the zygote and the standby get the argv)
    Route.*          the paths: OpenAI routes plus `vllm serve` dev-mode control routes
    WorkerStats      the body of GET /stats
    WorkerClient     control calls (health, sleep, wake_up, hibernate, stats) and the request relay
    TOKEN_ENV        the environment variable that hands a worker its secret (new_token makes one)

No torch and no FastAPI here: the gateway imports this.

Exceptions:
    RuntimeError
     └── WorkerControlError   a control route answered with an error status
          └── SleepUnsupported   POST /sleep answered 400: the engine cannot sleep at that level
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from dormant.worker_link import WorkerLink, WorkerResponse


class Route:
    HEALTH = "/health"  # 200 once the model is loaded and warmed up; 503 before
    MODELS = "/v1/models"
    CHAT_COMPLETIONS = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    SLEEP = "/sleep"  # ?level=1|2: waits for in-flight requests, then frees the accelerator
    WAKE_UP = "/wake_up"
    IS_SLEEPING = "/is_sleeping"  # {"is_sleeping": bool}
    HIBERNATE = "/hibernate"  # makes sure the engine image is written; {"image": folder or null}
    STATS = "/stats"  # WorkerStats
    TOKENIZE = "/tokenize"  # vLLM's: a prompt or messages -> token ids, through the model's tokenizer
    DETOKENIZE = "/detokenize"  # vLLM's: token ids -> text


# the OpenAI routes a worker serves, as the gateway forwards them
GENERATE_ROUTES = (Route.CHAT_COMPLETIONS, Route.COMPLETIONS)
# A worker listens on a loopback TCP port any local user can reach, so every route but /health
# wants the secret its launcher made for this one start (issue 15, item 3), as
# `Authorization: Bearer`. It travels in the worker's environment, never its argv: any local
# user reads argv in `ps`; /proc/PID/environ only the owner. A worker started without one (by
# hand, like `vllm serve` without --api-key) answers anyone, and says so in its log.
TOKEN_ENV = "DORMANT_WORKER_TOKEN"


# The reply formats a worker can parse (worker/tool_parsers, worker/reasoning.py), named here so
# the config checks `tool_call_parser` / `reasoning_parser` without importing the worker.
TOOL_CALL_PARSERS = ("hermes", "qwen3_coder", "llama3_json", "mistral")
REASONING_PARSERS = ("qwen3", "deepseek_r1")


def new_token() -> str:
    """A fresh worker secret (256 random bits)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a worker process is started with; `to_argv` / `from_argv` are the only
    places its command line is spelled."""

    source: str  # builtin:smollm2, a folder, a .gguf, org/name
    model_id: str
    port: int
    host: str = "127.0.0.1"
    engine: str = "native"
    engine_args: dict[str, Any] = field(default_factory=dict)
    served_model_names: tuple[str, ...] = ()  # default: (model_id,)
    log_level: str = "info"
    tool_call_parser: str | None = None  # one of TOOL_CALL_PARSERS; None: from the chat template
    reasoning_parser: str | None = None  # one of REASONING_PARSERS; None: from the chat template
    # an engine that is its own server (vllm): the command that starts it; (): the engine's default
    engine_command: tuple[str, ...] = ()

    def to_argv(self) -> list[str]:
        argv = ["--source", self.source, "--model-id", self.model_id, "--host", self.host,
                "--port", str(self.port), "--engine", self.engine,
                "--engine-args", json.dumps(self.engine_args), "--log-level", self.log_level]
        for name in self.served_model_names:
            argv += ["--served-model-name", name]
        if self.tool_call_parser:
            argv += ["--tool-call-parser", self.tool_call_parser]
        if self.reasoning_parser:
            argv += ["--reasoning-parser", self.reasoning_parser]
        if self.engine_command:
            argv += ["--engine-command", json.dumps(list(self.engine_command))]
        return argv

    @classmethod
    def from_argv(cls, argv: list[str]) -> "LaunchSpec":
        """Parse a worker command line; ValueError names what is wrong with it."""
        p = _ArgParser(prog="python -m dormant.worker", add_help=False)
        p.add_argument("--source", required=True)
        p.add_argument("--model-id", required=True)
        p.add_argument("--served-model-name", action="append", default=[])
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--engine", default="native")
        p.add_argument("--engine-args", default="{}")
        p.add_argument("--log-level", default="info")
        p.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS)
        p.add_argument("--reasoning-parser", choices=REASONING_PARSERS)
        p.add_argument("--engine-command", default="[]")
        args = p.parse_args(list(argv))
        try:
            command = json.loads(args.engine_command)
        except ValueError as e:
            raise ValueError(f"--engine-command: not JSON ({e})") from None
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            raise ValueError("--engine-command: must be a JSON list of strings")
        try:
            engine_args = json.loads(args.engine_args)
        except ValueError as e:
            raise ValueError(f"--engine-args: not JSON ({e})") from None
        if not isinstance(engine_args, dict):
            raise ValueError("--engine-args: must be a JSON object")
        return cls(source=args.source, model_id=args.model_id, port=args.port, host=args.host,
                   engine=args.engine, engine_args=engine_args,
                   served_model_names=tuple(args.served_model_name), log_level=args.log_level,
                   tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                   engine_command=tuple(command))

    @property
    def model_names(self) -> list[str]:
        return list(self.served_model_names or (self.model_id,))

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str):  # raise instead of printing usage and exiting
        raise ValueError(message)


# the phases of a worker's start, in order, as /stats reports them under cold_start.phases
# (worker/profile.py measures them; a phase that did not happen is absent)
COLD_START_PHASES = ("process_start", "import", "cuda_context", "model_init", "weight_load", "compile",
                     "graph_capture", "warm_up", "server_start", "first_token")


@dataclass
class WorkerStats:
    """GET /stats. The engine's figures (engines.base.EngineStats) plus the process's own."""

    pid: int
    rss_bytes: int
    loading: bool = False  # the model is still loading: the engine's figures are absent
    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    is_sleeping: bool = False
    num_running: int = 0
    num_waiting: int = 0
    weights_source: str | None = None
    image_dir: str | None = None
    max_num_seqs: int | None = None  # the requests the engine batches at once: its capacity, once loaded
    num_steps: int = 0  # engines.base.EngineStats: the engine loop's steps and seconds since the start
    step_seconds: float = 0.0
    num_decode_graph_steps: int = 0
    decode_graph_gpu_seconds: float = 0.0
    max_model_len: int | None = None  # the context the engine serves, once loaded
    cold_start: dict[str, Any] = field(default_factory=dict)  # worker/profile.py: phases, path...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorkerStats":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class WorkerControlError(RuntimeError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SleepUnsupported(WorkerControlError):
    """POST /sleep answered 400: the engine cannot sleep at that level (vLLM without sleep
    mode, as on the CPU; a level the engine lacks)."""


CONTROL_TIMEOUT_SECONDS = 120.0
HIBERNATE_TIMEOUT_SECONDS = 600.0  # may write a whole image: 16 GB at ~1 GB/s with checksums
# A generation may run for minutes; what bounds a request is this long without a byte from the
# worker (a non-streamed answer sends none until done; the openai SDK gives up at 600 s too).
REQUEST_READ_TIMEOUT_SECONDS = 600.0
# An idle pooled connection is dropped before the worker's uvicorn drops it (timeout_keep_alive,
# 5 s): at equal timeouts the gateway could send on a socket the worker is closing (issue 15, 4).
POOL_KEEPALIVE_SECONDS = 2.0
class WorkerClient:
    """One worker's address, its secret and the calls the contract has. Control calls go
    through `http`, the gateway's shared httpx client; requests through the worker's own
    WorkerLink (worker_link.py: kept-alive connections, a fraction of httpx's cost per request).
    The secret goes on each call, not on the shared client."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, token: str | None = None,
                 read_timeout: float | None = REQUEST_READ_TIMEOUT_SECONDS) -> None:
        self.http = http
        self.base_url = base_url
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        url = httpx.URL(base_url)
        self.link = WorkerLink(url.host, url.port or 80, read_timeout, POOL_KEEPALIVE_SECONDS)

    # -- control (the lifecycle) --

    async def is_healthy(self, timeout: float = 2.0) -> bool:
        try:
            r = await self.http.get(self.base_url + Route.HEALTH, headers=self._headers, timeout=timeout)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def sleep(self, level: int = 1) -> None:
        """SleepUnsupported when the engine refuses the level (a 400)."""
        try:
            await self._control("POST", Route.SLEEP, params={"level": str(level)})
        except WorkerControlError as e:
            if e.status == 400:
                raise SleepUnsupported(str(e), e.status) from None
            raise

    async def wake_up(self) -> None:
        await self._control("POST", Route.WAKE_UP)

    async def hibernate(self) -> str | None:
        """The worker makes sure its engine image is on disk; its folder, or None."""
        r = await self._control("POST", Route.HIBERNATE, timeout=HIBERNATE_TIMEOUT_SECONDS)
        try:
            return r.json().get("image")
        except (ValueError, AttributeError):
            return None

    async def stats(self, timeout: float = 10.0) -> WorkerStats:
        r = await self._control("GET", Route.STATS, timeout=timeout)
        try:
            return WorkerStats.from_dict(r.json())
        except (ValueError, TypeError) as e:
            raise WorkerControlError(f"GET {Route.STATS}: not a stats body ({e})") from None

    async def _control(self, method: str, path: str, timeout: float = CONTROL_TIMEOUT_SECONDS,
                       **kw: Any) -> httpx.Response:
        r = await self.http.request(method, self.base_url + path, headers=self._headers, timeout=timeout, **kw)
        if r.status_code >= 300:
            raise WorkerControlError(f"{method} {path} answered {r.status_code}: {r.text[:200]}", r.status_code)
        return r

    # -- requests (the gateway) --

    async def post(self, path: str, payload: dict[str, Any]) -> WorkerResponse:
        """One non-streamed request, its body read; httpx.HTTPError when the worker fails."""
        return await self.link.send(path, _json_bytes(payload), self._headers, stream=False)

    @contextlib.asynccontextmanager
    async def stream(self, path: str, payload: dict[str, Any]):
        """`async with client.stream(path, payload) as response:` for a streamed request."""
        response = await self.link.send(path, _json_bytes(payload), self._headers, stream=True)
        try:
            yield response
        finally:
            await response.aclose()  # unread (an error, a client gone): its connection is closed, not pooled

    def close_idle(self) -> None:
        """Close the kept-alive request connections (the worker is gone)."""
        self.link.close_idle()


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()  # ASCII: a lone surrogate a client sent stays valid
