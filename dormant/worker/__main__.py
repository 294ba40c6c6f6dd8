"""`python -m dormant.worker --source SOURCE --model-id ID --port P [--engine native --engine-args JSON]`

The command line is worker_api.LaunchSpec's (`to_argv` / `from_argv`); the engine is found by
name in the registry (engines/base.py) and spoken to only through its protocol.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import importlib
import logging
import os
import sys
import threading
import time

from dormant._proc import set_pdeathsig
from dormant.engines.base import Engine, SamplingParams, UnknownEngine, get_engine
from dormant.worker_api import TOKEN_ENV, LaunchSpec


def log_long_gc_pauses(log: logging.Logger, threshold_s: float = 0.05) -> None:
    """One log line for each garbage collection that stops the worker for `threshold_s`."""
    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            paused = time.perf_counter() - started.pop()
            if paused >= threshold_s:
                log.info("garbage collection of generation %d paused the worker %.0f ms",
                         info.get("generation", -1), 1000 * paused)

    gc.callbacks.append(callback)


def process_started_at() -> float:
    """Wall-clock time this process was created (fork or exec), for the process_start phase:
    its start in clock ticks since boot (/proc/self/stat field 22) against CLOCK_BOOTTIME.
    (psutil's create_time adds the boot time, which /proc gives in whole seconds.)"""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def main(argv: list[str] | None = None, started_at: float | None = None) -> int:
    started_at = started_at or process_started_at()
    set_pdeathsig()  # die with the parent (the gateway or the zygote): a guard beside its own
    try:
        spec = LaunchSpec.from_argv(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"python -m dormant.worker: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=spec.log_level.upper(),
        format=f"[worker {spec.model_id}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("dormant.worker")
    # popped: nothing this worker starts inherits the secret
    token = os.environ.pop(TOKEN_ENV, "") or None
    if token is None:
        log.warning("no %s in the environment: this worker answers every local user", TOKEN_ENV)
    try:
        engine = get_engine(spec.engine)
    except UnknownEngine as e:
        log.error("%s", e)
        return 2
    if engine.server_command is not None:  # an engine that is its own server (vllm): no torch here
        from dormant.worker import external

        return external.main(spec, engine, token, started_at)

    log_long_gc_pauses(log)
    from dormant.worker.profile import StartupProfile

    profile = StartupProfile(started_at)
    profile.lap("process_start")
    # 4096-aligned host arenas (torch's allocator aligns big blocks only with this set), so
    # O_DIRECT reads of an engine image land in the arena itself instead of a bounce buffer.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # the engine's core, timed as the import phase (native: torch and transformers' modeling
    # code, ~3 s; llamacpp: the binding, without torch)
    for module in engine.import_modules:
        importlib.import_module(module)
    profile.lap("import")
    engine.prepare(spec.engine_args)  # on a GPU: the CUDA context, beside what follows
    import uvicorn

    from dormant.worker.server import WorkerState, build_app

    # The HTTP server starts first and answers /health with 503 while the model loads beside
    # it (a daemon thread), so its start-up is off the cold start's path.
    state = WorkerState(None, None, spec.model_names, None, startup=profile,
                        parsers=(spec.tool_call_parser, spec.reasoning_parser))
    server = uvicorn.Server(uvicorn.Config(build_app(state, token), host=spec.host, port=spec.port, log_level="warning",
                                           access_log=False, ws="none", lifespan="on"))
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(serve_while_loading(server, state, spec, profile))


def event_loop_factory():
    """uvloop's loop where it is installed (a dependency on Linux), else asyncio's. The worker's
    event loop carries every stream's tokens beside the engine thread, which waits for the GIL
    while the loop holds it: on the H200 a step of 64 streams took 10.6 ms, 6.8 ms of it the
    decode graph (issue 12)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def load_engine(spec: LaunchSpec, profile) -> tuple | int:
    """(engine, tokenizer, max_model_len, model_dir), or an exit code for a bad model or
    settings (logged)."""
    from dormant.store.models import SourceNotFound, materialize, materialize_gguf

    log = logging.getLogger("dormant.worker")
    started = time.perf_counter()
    try:
        model_dir = (materialize_gguf if get_engine(spec.engine).reads_gguf else materialize)(spec.source)
    except SourceNotFound as e:
        log.error("%s", e)
        return 2
    try:
        loaded = get_engine(spec.engine).load(model_dir, spec.engine_args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    profile.lap("model_init")
    report = loaded.engine.startup_report()
    profile.add(report.phases, inside="model_init")
    profile.overlapped.update(report.overlapped)
    profile.weights_source = report.weights_source
    log.info("loaded %s from %s in %.2f s (weights from %s)", spec.model_id, model_dir,
             time.perf_counter() - started, profile.weights_source)
    return loaded.engine, loaded.tokenizer, loaded.max_model_len, model_dir


async def serve_while_loading(server, state, spec: LaunchSpec, profile) -> int:
    """Serve while the model loads; once loaded and warmed up, /health says 200. Returns the
    exit code: the server stopping (a signal) before the load ends exits at once."""
    from dormant.worker.serving import sampling_defaults

    serving = asyncio.create_task(server.serve())
    loaded: concurrent.futures.Future = concurrent.futures.Future()

    def load() -> None:
        loaded.set_running_or_notify_cancel()  # from now on the event loop cannot cancel it
        try:
            loaded.set_result(load_engine(spec, profile))
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the main thread
            loaded.set_exception(e)

    threading.Thread(target=load, name="dormant-load", daemon=True).start()
    loading = asyncio.wrap_future(loaded)
    await asyncio.wait({serving, loading}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():  # the server stopped (a signal) while the model loads
        return 0
    error = loading.exception()
    if error is not None or isinstance(loading.result(), int):
        server.should_exit = True
        await serving
        if error is not None:
            raise error
        return loading.result()
    engine, tokenizer, max_model_len, model_dir = loading.result()
    await warm_up(engine, tokenizer)
    profile.lap("warm_up")
    while not state.server_up and not serving.done():  # nearly always up long before
        await asyncio.sleep(0.005)
    profile.lap("server_start")
    state.attach(engine, tokenizer, max_model_len, sampling_defaults(model_dir))
    # what the load built lives as long as the worker: out of the collector's way, so no
    # request pays for a full collection that walks the model and the tokenizer
    gc.freeze()
    await serving
    engine.shutdown()
    return 0


async def warm_up(engine: Engine, tokenizer) -> None:
    """One short generation before /health answers: the first request must not pay for
    first-call allocations and kernel selection."""
    prompt = list(tokenizer.encode("Hello"))[:8] or [0]
    async for _ in engine.generate("warm-up", prompt, SamplingParams(temperature=0, max_tokens=1)):
        pass


if __name__ == "__main__":
    sys.exit(main())
