"""How a replica's worker is started and ended: the mechanism the controller runs.

Each function is one worker operation, run by the controller as its single in-flight `op`
task; the controller decides when and reads the outcome. Nothing here touches replica state.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Awaitable, Callable

from dormant.config import ModelSpec
from dormant.lifecycle.checkpoint import Suspender, Suspension
from dormant.lifecycle.worker import Worker
from dormant.store.images import EngineImage, delete_image
from dormant.worker_api import WorkerStats

log = logging.getLogger("dormant.lifecycle")

Launch = Callable[[ModelSpec], Awaitable[Worker]]
FAILED_START_GRACE_SECONDS = 2.0


async def start(spec: ModelSpec, launch: Launch, timeout: float,
                on_launched: Callable[[Worker], None]) -> WorkerStats | None:
    """Launch a worker and wait until it is healthy; its /stats (the cold-start report), or None
    when it would not say. A worker that does not come up is stopped before this raises."""
    worker = await launch(spec)
    on_launched(worker)
    try:
        await worker.wait_healthy(timeout)
    except BaseException:
        await asyncio.shield(worker.stop(grace=FAILED_START_GRACE_SECONDS))
        raise
    try:
        return await worker.stats()
    except Exception as e:  # the report is for metrics: a start without it is still a start
        log.warning("model %s: no /stats after the start: %s", spec.id, e)
        return None


async def sleep(worker: Worker | None, level: int) -> None:
    await _alive(worker).sleep(level)


async def wake_up(worker: Worker | None) -> None:
    await _alive(worker).wake_up()


async def suspend(suspender: Suspender, worker: Worker | None) -> Suspension:
    """Checkpoint the worker's CUDA processes (checkpoint.py); SuspendUnavailable leaves them
    as they were."""
    return await suspender.suspend(_alive(worker).pid)


async def resume(suspender: Suspender, suspension: Suspension | None) -> float:
    if suspension is None:
        raise RuntimeError("nothing to resume")
    return await suspender.resume(suspension)


async def end_suspended(spec: ModelSpec, worker: Worker | None, drop_image: str | None = None,
                        image_dir: str | None = None) -> str | None:
    """End a suspended worker: killed, not asked. Its own shutdown would wait forever on the
    driver's lock (its CUDA calls block until a restore), and a restore needs the GPU memory
    the suspension gave away; its engine image was written after its start, if it has one.
    Returns `image_dir` where that image is complete on disk and not dropped, else None."""
    if worker is not None:
        worker.kill()
        await worker.wait()
    if drop_image:
        await asyncio.to_thread(delete_image, Path(drop_image))
        log.info("model %s: engine image %s deleted (stop tier)", spec.id, drop_image)
        return None
    return await _on_disk(image_dir)


async def _on_disk(image_dir: str | None) -> str | None:
    """`image_dir` where a complete engine image is there, else None."""
    if image_dir and await asyncio.to_thread(EngineImage(Path(image_dir)).exists):
        return image_dir
    return None


async def hibernate(spec: ModelSpec, worker: Worker | None, write_image: bool = True,
                    image_dir: str | None = None) -> str | None:
    """The worker makes sure its engine image is on disk, then exits; the image's folder, or
    None where no image is on disk (the replica is then stopped, not hibernated: its next start
    is a cold one). A failure to write it is logged and the worker still exits. Without
    `write_image` nothing is written (a victim a request waits on): the image the worker wrote
    after its start (`image_dir`) is kept where it is complete on disk."""
    if worker is None:
        return None
    image: str | None = None
    if write_image:
        try:
            image = await worker.hibernate()
        except Exception as e:
            log.warning("model %s: could not write the engine image before hibernating: %s", spec.id, e)
    if image is None:
        image = await _on_disk(image_dir)
    if image is None and image_dir:
        log.info("model %s: no engine image on disk: stopped, not hibernated (its next start is a cold one)",
                 spec.id)
    await worker.stop()
    return image


async def stop(spec: ModelSpec, worker: Worker | None, drop_image: str | None = None) -> None:
    """End the worker; with `drop_image`, delete that engine image too (the idle stop tier)."""
    if worker is not None:
        await worker.stop()
    if drop_image:
        await asyncio.to_thread(delete_image, Path(drop_image))
        log.info("model %s: engine image %s deleted (stop tier)", spec.id, drop_image)


def _alive(worker: Worker | None) -> Worker:
    if worker is None:  # a crash got here first: the operation fails
        raise RuntimeError("the worker is gone")
    return worker


async def delete(spec: ModelSpec, image: str, why: str) -> None:
    """Delete an engine image (the disk budget, or room for another's); the model's next start
    is a cold one."""
    await asyncio.to_thread(delete_image, Path(image))
    log.info("model %s: engine image %s deleted (%s)", spec.id, image, why)
