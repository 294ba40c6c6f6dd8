"""The engine loop in one background thread, fed from asyncio: the native engine as the
worker sees it (engines.base.Engine).

All engine state is owned by the loop thread; callers send commands (add, abort, sleep, wake)
through a queue and await the result. Tokens go back to each request's asyncio.Queue through
``loop.call_soon_threadsafe``.

Sleep waits until no request is in flight (the gateway drains first). A request that arrives
while asleep wakes the engine before it is scheduled: it is never lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Callable

from dormant.engines.base import (
    Capabilities,
    EngineStats,
    Guidance,
    RequestOutput,
    SamplingParams,
    StartupReport,
)
from dormant.engines.command_loop import NOT_YET, CommandLoop, outputs_of
from dormant.engines.native.core.llm_engine import LLMEngine

log = logging.getLogger("dormant.engine")

# The engine thread gives up the GIL while it waits on the device (a step's token read-back);
# taking it back from the event loop's thread, busy streaming the last step's tokens, waits up
# to the interpreter's switch interval (5 ms by default: a third of a 64-stream decode step of
# an 8B model on the H200; 0.5 ms gave 3,231 tok/s against 2,908 in a second burst of 64
# streams, bench/README.md "Bursts beside vLLM"). GPU runners only: on the CPU the A/B was within
# its noise. DORMANT_GIL_SWITCH_S overrides it (bench_burst's A/B).
GIL_SWITCH_S = float(os.environ.get("DORMANT_GIL_SWITCH_S", "0.0005"))


class AsyncLLMEngine(CommandLoop):
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        runner = engine.model_runner
        self.capabilities = Capabilities(sleep_levels=runner.sleep_levels, engine_image=runner.image_dir is not None)
        self._commands: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.Queue()
        self._deferred: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []  # sleeps waiting for a drain
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._num_steps = 0
        self._step_seconds = 0.0
        if getattr(getattr(runner, "device", None), "type", None) == "cuda":
            sys.setswitchinterval(GIL_SWITCH_S)
        self._thread = threading.Thread(target=self._run_loop, name="dormant-engine", daemon=True)
        self._thread.start()

    # -- public, called from asyncio ----------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yield a RequestOutput as tokens come; abort if the consumer stops early (client
        disconnect)."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, out)
        finished = False
        try:
            await self._call(lambda: self._add(request_id, prompt_token_ids, params))
            async for item in outputs_of(out):
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(lambda: self.engine.abort_request(request_id))

    async def check_guidance(self, guidance: Guidance) -> str | None:
        """Why this guidance cannot be followed, or None; off the loop thread and the event
        loop (the first one builds llguidance's token tables, ~0.5 s)."""
        return await asyncio.to_thread(self.engine.guided.check, guidance)

    async def sleep(self, level: int = 1) -> None:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((lambda: self._sleep_when_idle(level), fut))
        await asyncio.wrap_future(fut)

    async def wake_up(self) -> None:
        await self._call(self.engine.wake_up)

    @property
    def is_sleeping(self) -> bool:
        return self.engine.is_sleeping

    async def save_image(self) -> str | None:
        """Make sure the engine image is on disk (before the worker exits to hibernate);
        its folder, or None for a runner without images."""
        folder = await self._call(self.engine.model_runner.save_image)
        return None if folder is None else str(folder)

    def stats(self) -> EngineStats:
        runner = self.engine.model_runner
        image_dir = runner.image_dir
        return EngineStats(
            weights_bytes=runner.weights_bytes,
            kv_cache_bytes=runner.kv_cache_bytes,
            is_sleeping=self.engine.is_sleeping,
            num_running=self.engine.num_running,
            num_waiting=self.engine.num_waiting,
            weights_source=runner.weights_source,
            image_dir=None if image_dir is None else str(image_dir),
            max_num_seqs=self.engine.scheduler.max_num_seqs,
            num_steps=self._num_steps,
            step_seconds=self._step_seconds,
            num_decode_graph_steps=runner.num_decode_graph_steps,
            decode_graph_gpu_seconds=runner.decode_graph_gpu_seconds,
        )

    def startup_report(self) -> StartupReport:
        runner = self.engine.model_runner
        return StartupReport(phases=dict(runner.startup_phases), overlapped=dict(runner.startup_overlap),
                             weights_source=runner.weights_source)

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put((lambda: None, concurrent.futures.Future()))
        self._thread.join(timeout=10)

    # -- loop thread ----------------------------------------------------------------------------



    def _add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if self.engine.is_sleeping:
            log.info("request %s arrived while asleep: waking up", request_id)
            self.engine.wake_up()
        self.engine.add_request(request_id, prompt_token_ids, params)

    def _sleep_when_idle(self, level: int):
        if self.engine.has_unfinished:
            return NOT_YET
        self.engine.sleep(level)
        return None


    def _run_loop(self) -> None:
        # A runner's deferred start-up work (GPU: the larger decode graphs, the pinned host
        # backup), done in short units while no request is in flight. idle_wait: None when it
        # has nothing to do (until the next command or step), else seconds until it wants to run.
        # idle_work None: it failed once, and is not asked again.
        idle_work: Callable[[], float | None] | None = self.engine.model_runner.idle_work
        idle_wait: float | None = None
        while not self._stopped:
            busy = self.engine.has_unfinished
            try:
                if busy or idle_wait is None:
                    fn, fut = self._commands.get(block=not busy)
                else:
                    fn, fut = self._commands.get(timeout=idle_wait) if idle_wait > 0 else self._commands.get_nowait()
                self._run_command(fn, fut)
                while True:
                    fn, fut = self._commands.get_nowait()
                    self._run_command(fn, fut)
            except queue.Empty:
                pass
            if self._stopped:
                break
            if idle_work is not None:
                idle_wait = 0.0  # something happened, or the wait is over: ask again
            if self.engine.has_unfinished and not self.engine.is_sleeping:
                try:  # delivery too: a loop that died would leave every caller waiting forever
                    started = time.perf_counter()
                    outputs = self.engine.step()
                    self._step_seconds += time.perf_counter() - started
                    self._num_steps += 1
                    self._deliver_all(outputs)  # one wake-up of the event loop a step, not one a stream
                except BaseException as e:  # noqa: BLE001 - fail the requests, keep serving
                    log.exception("engine step failed")
                    self._fail_all(e)
            elif idle_work is not None and not self.engine.has_unfinished and not self._deferred:
                try:
                    idle_wait = idle_work()
                except BaseException:  # noqa: BLE001 - optional work: serve on without it
                    log.exception("idle work failed; not retried")
                    idle_work = idle_wait = None
            if self._deferred and not self.engine.has_unfinished:
                self._run_deferred()


    def _fail_all(self, error: BaseException) -> None:
        for seq in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
            self.engine.abort_request(seq.request_id)
            self._deliver(seq.request_id, error)

