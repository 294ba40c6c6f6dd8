"""The llama.cpp engine as the worker sees it (engines.base.Engine): the scheduler's step loop
on one thread of its own, so llama_decode (which releases the GIL in C) never blocks the
worker's event loop.

The loop thread owns the model, the context and every sequence; callers send commands
(add, abort, sleep, wake) through a queue and await them. Tokens go back to each request's
asyncio.Queue through `call_soon_threadsafe`. Sleep waits until nothing is in flight; a request
that arrives while asleep wakes the engine first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from dormant.engines.base import (
    Capabilities,
    EngineStats,
    RequestOutput,
    SamplingParams,
    StartupReport,
)
from dormant.engines.command_loop import NOT_YET, CommandLoop
from dormant.engines.llamacpp.model import LlamaModel
from dormant.engines.llamacpp.scheduler import Scheduler

log = logging.getLogger("dormant.engine")


class AsyncLlamaCppEngine(CommandLoop):
    capabilities = Capabilities(sleep_levels=(1, 2), engine_image=False, logprobs=False, guidance=False)

    def __init__(self, model: LlamaModel, scheduler: Scheduler, load_phases: dict[str, float]):
        self.model = model
        self.scheduler = scheduler
        self._load_phases = load_phases
        self._sleep_level = 0
        self._commands: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.Queue()
        self._deferred: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run_loop, name="dormant-llamacpp", daemon=True)
        self._thread.start()

    # -- the Engine protocol, called from asyncio ----------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, out)
        finished = False
        try:
            await self._call(lambda: self._add(request_id, prompt_token_ids, params))
            while not finished:
                item = await out.get()
                if isinstance(item, BaseException):
                    finished = True  # the scheduler let it go already
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(lambda: self.scheduler.abort_request(request_id))

    async def sleep(self, level: int = 1) -> None:
        if level not in self.capabilities.sleep_levels:
            raise ValueError(f"sleep level {level} is not one of {self.capabilities.sleep_levels}")
        await self._call(lambda: self._sleep_when_idle(level))

    async def wake_up(self) -> None:
        await self._call(self._wake)

    @property
    def is_sleeping(self) -> bool:
        return self._sleep_level > 0

    async def save_image(self) -> str | None:
        return None  # a GGUF loads in well under a second: there is no image to write

    def stats(self) -> EngineStats:
        awake = not self.is_sleeping
        return EngineStats(
            weights_bytes=self.model.weights_bytes if awake else 0,
            kv_cache_bytes=self.model.kv_cache_bytes if awake else 0,
            is_sleeping=not awake,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            weights_source="gguf",
            max_num_seqs=self.scheduler.config.max_num_seqs,
        )

    def startup_report(self) -> StartupReport:
        return StartupReport(phases=dict(self._load_phases), weights_source="gguf")

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put((lambda: None, concurrent.futures.Future()))
        self._thread.join(timeout=10)

    # -- the loop thread -------------------------------------------------------------------------

    def _add(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if self.is_sleeping:
            log.info("request %s arrived while asleep: waking up", request_id)
            self._wake()
        self.scheduler.add_request(request_id, prompt, params)

    def _sleep_when_idle(self, level: int):
        if self.scheduler.has_unfinished:
            return NOT_YET
        if not self.is_sleeping:
            kept = self.scheduler.keep_prefixes(self.model.config.asleep_prefix_cache_bytes if level == 1 else 0)
            self.model.release(drop_page_cache=level >= 2)
            self.scheduler.forget_cache()
            self._sleep_level = level
            if kept:
                log.info("asleep: %d prefixes kept (%.1f MB of KV)", len(self.scheduler.kept), kept / 1e6)
        return None

    def _wake(self) -> None:
        if self.is_sleeping:
            self.model.wake()
            restored = self.scheduler.restore_prefixes()
            self._sleep_level = 0
            log.info("woke up: %s in %.3f s (%d cached prompt tokens back)", self.model.gguf.name,
                     self.model.load_seconds, restored)

    def _run_loop(self) -> None:
        while not self._stopped:
            busy = self.scheduler.has_unfinished
            try:
                fn, fut = self._commands.get(block=not busy)
                self._run_command(fn, fut)
                while True:
                    fn, fut = self._commands.get_nowait()
                    self._run_command(fn, fut)
            except queue.Empty:
                pass
            if self._stopped:
                break
            if self.scheduler.has_unfinished and not self.is_sleeping:
                try:  # delivery too: a loop that died would leave every caller waiting forever
                    outputs, failed = self.scheduler.step()
                    self._deliver_all([*failed, *((request_id, RequestOutput(new_ids, finished, reason))
                                                  for request_id, new_ids, finished, reason in outputs)])
                except BaseException as e:  # noqa: BLE001 - fail the requests, keep serving
                    log.exception("llama.cpp step failed")
                    self._fail_all(e)
            if self._deferred and not self.scheduler.has_unfinished:
                self._run_deferred()

    def _fail_all(self, error: BaseException) -> None:
        for req in self.scheduler.running + list(self.scheduler.waiting):
            self.scheduler.abort_request(req.request_id)
            self._deliver(req.request_id, error)

