"""A worker whose engine is its own OpenAI server (EngineSpec.server_command: vLLM). This
process starts the server on a Unix socket in a 0700 runtime folder of the store, serves the
worker contract in front of it (worker/external_app.py) and lives exactly as long as it: the
server exiting ends this worker with its exit code, so the lifecycle sees a crash as for the
native engine; this worker stopping (SIGTERM from the lifecycle) stops the server.

The server runs in this worker's process group (the lifecycle signals the group) with
PR_SET_PDEATHSIG, and without the worker's secret in its environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time

import httpx
import psutil

from dormant._proc import set_pdeathsig
from dormant.engines.base import EngineSpec
from dormant.worker_api import LaunchSpec

log = logging.getLogger("dormant.worker")
SOCKET_NAME = "vllm.sock"
SERVER_STOP_GRACE_SECONDS = 8.0


def main(spec: LaunchSpec, engine: EngineSpec, token: str | None, started: float) -> int:
    from dormant.store.models import SourceNotFound, materialize
    from dormant.store.paths import runtime_folder
    from dormant.worker.external_app import ExternalState, build_external_app

    try:
        model_dir = materialize(spec.source)
    except SourceNotFound as e:
        log.error("%s", e)
        return 2
    folder = runtime_folder(spec.engine, longest_name=SOCKET_NAME)
    socket = folder / SOCKET_NAME
    argv = engine.server_command(list(spec.engine_command), model_dir, spec.model_names, socket,
                                 dict(spec.engine_args))
    upstream = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(socket)), base_url="http://engine")
    state = ExternalState(upstream, sleep_mode="--enable-sleep-mode" in argv, started=started)
    import uvicorn

    server = _server_class()(uvicorn.Config(build_external_app(state, token), host=spec.host, port=spec.port,
                                           log_level="warning", access_log=False, ws="none", lifespan="off"))
    try:
        return asyncio.run(_serve(server, state, argv))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's, but a SIGTERM only ends serve(): uvicorn raises the signal again once it
        has stopped, which would kill this process before it stops the engine's server."""

        @contextlib.contextmanager
        def capture_signals(self):
            def stop(_sig, _frame) -> None:
                self.should_exit = True

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


async def _serve(server, state, argv: list[str]) -> int:
    """Serve the contract while the engine's server starts and runs; the exit code."""
    # the dev routes (/sleep, /wake_up, /collective_rpc) exist only in dev mode; the socket's
    # folder keeps them ours
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    log.info("starting the engine's server: %s", " ".join(argv))
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, env=env,
                                                    preexec_fn=set_pdeathsig)
    except OSError as e:
        log.error("cannot start the engine's server %r: %s", argv[0], e)
        return 2
    state.server_pid = proc.pid
    serving = asyncio.create_task(server.serve())
    exited = asyncio.create_task(proc.wait())
    up = asyncio.create_task(_wait_up(state, exited))
    prepin: asyncio.Task | None = None
    try:
        await asyncio.wait({serving, exited, up}, return_when=asyncio.FIRST_COMPLETED)
        if up.done() and not up.cancelled() and up.result():
            state.cold_start["phases"] = {"engine_server_start": time.time() - state.started}
            state.ready = True
            log.info("the engine's server is up after %.1f s", time.time() - state.started)
            if state.sleep_mode:
                prepin = asyncio.create_task(state.prepin())
            await asyncio.wait({serving, exited}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            code = exited.result()
            log.error("the engine's server exited with code %s", code)
            server.should_exit = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(serving, 5.0)
            return code if code else 1
        return 0  # this worker was told to stop (SIGTERM): the server goes with it below
    finally:
        for task in (up, prepin):
            if task is not None:
                task.cancel()
        await _stop_server(proc, exited)
        await state.upstream.aclose()


async def _wait_up(state, exited: asyncio.Task) -> bool:
    """Poll the server's /health until 200 (after its own warm-up); False if it exits first."""
    while not exited.done():
        with contextlib.suppress(httpx.HTTPError):
            r = await state.upstream.get("/health", timeout=2.0)
            if r.status_code == 200:
                return True
        await asyncio.sleep(0.1)
    return False


async def _stop_server(proc, exited: asyncio.Task) -> None:
    """SIGTERM the server, SIGKILL it after a grace; then whatever of its children is left
    (vLLM's engine core is its child, not ours)."""
    children = []
    with contextlib.suppress(psutil.Error):
        children = psutil.Process(proc.pid).children(recursive=True)
    if not exited.done():
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), SERVER_STOP_GRACE_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await exited
    for child in children + _rest_of_my_group():
        with contextlib.suppress(psutil.Error):
            child.kill()


def _rest_of_my_group() -> list[psutil.Process]:
    """The processes left in this worker's process group (the lifecycle starts it as a group
    leader): a server killed outright leaves its children (vLLM's engine core, holding its
    memory) to init, where `children` no longer finds them."""
    me = os.getpid()
    if os.getpgrp() != me:
        return []
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if p.pid != me and os.getpgid(p.pid) == me:
                found.append(p)
    return found
