"""The fleet's placer: gathers each replica's figures, asks the policy (placement.py) and
carries its plan out through the replicas' commands (issue 10).

A replica asks `claim` before a start or a wake, on its own controller task; the victims get
`evict` commands and drain on theirs, and every transition anywhere kicks the replicas still
waiting for room, which ask again. After every transition the placer also hibernates what is
asleep beyond the host budget and deletes engine images beyond the disk budget, read again from
the disk each time (budgets.StoreDisk); before a cold start that will write an image, it deletes
images until that one fits. All of it runs on the gateway's one event loop; only the
controllers change replica state.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dormant.config import ModelSpec
from dormant.errors import ModelUnavailable
from dormant.lifecycle import budgets
from dormant.lifecycle.placement import (Image, Limits, Need, Replica, Tier, host_overflow, images_to_delete,
                                         images_to_make_room, place)
from dormant.lifecycle.policy import IdleAction
from dormant.lifecycle.states import NullObserver, Observer, ReplicaSnapshot, State
from dormant.sizes import format_bytes
from dormant.store.images import EngineImage

if TYPE_CHECKING:
    from dormant.lifecycle.controller import ReplicaController

log = logging.getLogger("dormant.lifecycle")

# (spec, device, that device's budget) -> (bytes running, bytes asleep), before the model has run
Estimate = Callable[[ModelSpec, str, int], tuple[int, int]]
# (spec, device) -> bytes of the engine image its start will write, before the model has run
ImageEstimate = Callable[[ModelSpec, str], int]
RETRY_SECONDS = 0.25
TOLD_SECONDS = 2.0
# suspending and resuming hold what asleep holds, on their way to or from suspended
_TIERS = {State.COLD: Tier.NONE, State.STOPPED: Tier.NONE, State.HIBERNATED: Tier.DISK, State.ASLEEP: Tier.HOST,
          State.SUSPENDING: Tier.HOST, State.RESUMING: Tier.HOST, State.SUSPENDED: Tier.SUSPENDED}
_BUSY = (State.STARTING, State.WAKING, State.SLEEPING, State.STOPPING, State.SUSPENDING, State.RESUMING)
_LEAVING = (State.DRAINING, State.SLEEPING, State.STOPPING)
_EMPTYING = (State.SLEEPING, State.STOPPING)


class Placer:
    """Also the lifecycle's Observer: it passes every event on to `observer` (the metrics)."""

    def __init__(self, limits: Limits, store_root: Path, observer: Observer | None = None,
                 estimate: Estimate | None = None, disk: budgets.StoreDisk | None = None,
                 image_estimate: ImageEstimate | None = None) -> None:
        self.limits = limits
        self._estimate = estimate or (lambda spec, device, budget: budgets.estimate(
            spec, device, budget, store_root, self.limits.memory.get(device)))
        # None: limits.disk holds as it is, and no room is made on disk before a start
        self._disk = disk
        self._image_estimate = image_estimate or (lambda spec, device: budgets.image_bytes(spec, device, store_root))
        self._observer = observer or NullObserver()
        self._replicas: dict[str, ReplicaController] = {}
        self._estimates: dict[str, tuple[int, int]] = {}
        self._image_estimates: dict[str, int] = {}
        self._waiting: set[str] = set()
        # victims told to hibernate, until their state says so (a look before their task has
        # run must not choose more): model -> when told
        self._told_to_leave: dict[str, float] = {}
        # images told to go, until gone from disk (room to come): folder -> (bytes, when told)
        self._deleting: dict[str, tuple[int, float]] = {}
        self._recheck: asyncio.Handle | None = None

    def add(self, replica: ReplicaController) -> None:
        self._replicas[replica.spec.id] = replica

    # ---- Room ---------------------------------------------------------------------------------

    def claim(self, model: str, *, may_evict: bool) -> str | None:
        spec = self._replicas[model].spec
        snap = self._replicas[model].snapshot()
        running, asleep = self.figures(snap)
        devices = budgets.candidate_devices(spec, self.limits)
        backup = asleep if budgets.keeps_backup(spec, self._device(snap)) else 0
        # a native GPU wake maps its chunks as the device frees them (cuda/arena.py)
        streams_in = snap.state is State.ASLEEP and backup > 0
        need = Need(model, running, devices, may_evict, host_bytes=backup, streams_in=streams_in)
        others = [(s, self.view(s)) for s in (r.snapshot() for r in self._replicas.values() if r.spec.id != model)]
        plan = place(need, [view for _, view in others], self.limits)
        if plan.error:
            raise ModelUnavailable(plan.error, code="model_too_large")
        for victim in plan.sleep:
            self._replicas[victim].evict(IdleAction.SLEEP, "make_room")
        for victim in plan.hibernate:
            self._hibernate(victim, "make_room")
        if plan.device is None:
            if may_evict:  # a request ending elsewhere is no transition: look again soon too
                self._waiting.add(model)
                asyncio.get_running_loop().call_later(RETRY_SECONDS, self._changed)
            return None
        self._waiting.discard(model)
        if snap.state in (State.COLD, State.STOPPED) and not _has_image(snap):  # a start that writes one
            self._make_room_for_image(snap, plan.device, others)
        return plan.device

    def _make_room_for_image(self, snap: ReplicaSnapshot, device: str,
                             others: list[tuple[ReplicaSnapshot, Replica]]) -> None:
        """Before a cold start that will write an engine image: delete images no process may
        read, least recently used first, until it fits in the free space (issue 10: with that
        space taken by other files, every write failed with ENOSPC while unused images of other
        models stayed). What other starts will write counts as taken, images on their way out
        as free. Where no room can be made, nothing is deleted and the start goes ahead.
        (An image of an earlier run the gateway does not know of counts as none.)"""
        need = self._image_bytes(snap, device)
        if self._disk is None or not need:
            return
        self._forget_deleted()
        # less what their folders hold already (a write takes all its blocks first, images.py)
        writing = sum(max(0, self._image_bytes(s, self._device(s)) - v.disk_bytes) for s, v in others
                      if s.state is State.STARTING and not _has_image(s))
        room = self._disk.room() + sum(nbytes for nbytes, _ in self._deleting.values()) - writing
        images = self._images(others)
        folders = images_to_make_room(images, room, need)
        if need > room and not folders:
            log.info("model %s: no room on disk for its engine image (%s, %s free beyond the reserve): it starts "
                     "anyway, and its image write will stop at the reservation", snap.model, format_bytes(need),
                     format_bytes(max(0, room)))
        self._drop_images(folders, others, for_model=snap.model)

    def _drop_images(self, folders: list[str], owners: list[tuple[ReplicaSnapshot, Replica]],
                     for_model: str | None = None) -> None:
        told = asyncio.get_running_loop().time()
        by_folder = {snap.image_dir: (snap.model, view.disk_bytes) for snap, view in owners}
        for folder in folders:
            model, nbytes = by_folder[folder]
            self._deleting[folder] = (nbytes, told)
            self._replicas[model].drop_image(for_model)

    def _forget_deleted(self) -> None:
        """Images told to go are room to come until gone from disk, or TOLD_SECONDS (a refused
        delete: its replica started meanwhile)."""
        now = asyncio.get_running_loop().time()
        for folder, (_, told) in list(self._deleting.items()):
            if now - told >= TOLD_SECONDS or not os.path.exists(folder):
                del self._deleting[folder]

    def _images(self, pairs: list[tuple[ReplicaSnapshot, Replica]]) -> list[Image]:
        """The engine images the replicas hold, but empty folders and those on their way out (to
        the budget they are files like any other until gone)."""
        return [Image(snap.image_dir, view.disk_bytes, view.last_use, snap.state.has_process)
                for snap, view in pairs
                if snap.image_dir and view.disk_bytes and snap.image_dir not in self._deleting]

    def _hibernate(self, model: str, reason: str) -> None:
        self._told_to_leave[model] = asyncio.get_running_loop().time()
        self._replicas[model].evict(IdleAction.HIBERNATE, reason)

    def _releasing(self, snap: ReplicaSnapshot) -> bool:
        """Its process is ending: stopping, or told to hibernate a moment ago and not yet
        moved (a refused eviction is forgotten after TOLD_SECONDS)."""
        if snap.state is State.STOPPING:
            return True
        told = self._told_to_leave.get(snap.model)
        if told is None:
            return False
        if snap.state in (State.READY, State.DRAINING, State.ASLEEP, State.SUSPENDED) and \
                asyncio.get_running_loop().time() - told < TOLD_SECONDS:
            return True
        del self._told_to_leave[snap.model]
        return False

    # ---- figures ------------------------------------------------------------------------------

    def figures(self, snap: ReplicaSnapshot) -> tuple[int, int]:
        """(bytes on its device while running, bytes in host RAM while asleep): measured by its
        worker once it has run (weights + KV + a worker's overhead), estimated before."""
        spec = self._replicas[snap.model].spec
        device = self._device(snap)
        stats = snap.stats
        if stats is not None and stats.weights_bytes:
            if device == "cpu":
                return stats.weights_bytes + stats.kv_cache_bytes + budgets.CPU_OVERHEAD_BYTES, budgets.CPU_OVERHEAD_BYTES
            return stats.weights_bytes + stats.kv_cache_bytes + budgets.GPU_OVERHEAD_BYTES, stats.weights_bytes
        if spec.id not in self._estimates:
            self._estimates[spec.id] = self._estimate(spec, device, self.limits.device.get(device, 0))
        return self._estimates[spec.id]

    def _image_bytes(self, snap: ReplicaSnapshot, device: str) -> int:
        """What the engine image its start writes will take: the weights its worker measured
        once it has run (the image holds them), estimated before; 0 where it writes none."""
        spec = self._replicas[snap.model].spec
        if not budgets.writes_image(spec):
            return 0
        if snap.stats is not None and snap.stats.weights_bytes:
            return snap.stats.weights_bytes
        if spec.id not in self._image_estimates:
            self._image_estimates[spec.id] = self._image_estimate(spec, device)
        return self._image_estimates[spec.id]

    def view(self, snap: ReplicaSnapshot) -> Replica:
        spec: ModelSpec = self._replicas[snap.model].spec
        running, asleep = self.figures(snap)
        tier = _TIERS.get(snap.state, Tier.DEVICE)
        if tier is Tier.NONE and _has_image(snap):  # stopped (unload), its image kept: its next start restores
            tier = Tier.DISK
        device = self._device(snap)
        host = asleep if tier is Tier.HOST or (tier is Tier.DEVICE and budgets.keeps_backup(spec, device)) else 0
        if tier is Tier.SUSPENDED:  # the asleep weights, and what the checkpoint moved to host memory
            host = asleep + (snap.suspension.host_bytes if snap.suspension else 0)
        return Replica(
            snap.model, tier, device, device_bytes=running if tier is Tier.DEVICE else 0,
            host_bytes=host, disk_bytes=_dir_bytes(snap.image_dir),
            asleep_bytes=asleep, last_use=snap.last_used or 0.0, in_flight=snap.in_flight + snap.queued,
            pinned=spec.pin or spec.min_replicas > 0, busy=snap.state in _BUSY, leaving=snap.state in _LEAVING,
            emptying=snap.state in _EMPTYING,
            releasing=self._releasing(snap))

    def _device(self, snap: ReplicaSnapshot) -> str:
        if snap.device not in (None, "auto"):
            return snap.device
        return budgets.candidate_devices(self._replicas[snap.model].spec, self.limits)[0]

    # ---- after every transition ---------------------------------------------------------------

    def _changed(self) -> None:
        """Coalesced to once per loop turn, after the transition's step has finished."""
        if self._recheck is None:
            self._recheck = asyncio.get_running_loop().call_soon(self._check)

    def _check(self) -> None:
        self._recheck = None
        for model in list(self._waiting):
            self._replicas[model].kick()
        pairs = [(s, self.view(s)) for s in (r.snapshot() for r in self._replicas.values())]
        for model in host_overflow([view for _, view in pairs], self.limits):
            self._hibernate(model, "host_budget")
        self._forget_deleted()
        images = self._images(pairs)
        # the disk's free space moves with other files: the budget is read again each time
        disk = self._disk.budget(sum(i.bytes for i in images)) if self._disk else self.limits.disk
        self._drop_images(images_to_delete(images, disk), pairs)

    # ---- Observer -----------------------------------------------------------------------------

    def on_transition(self, model: str, from_state: State, to_state: State) -> None:
        self._observer.on_transition(model, from_state, to_state)
        self._changed()

    def on_ready(self, model: str, tier: str, seconds: float) -> None:
        self._observer.on_ready(model, tier, seconds)

    def on_cold_start_phases(self, model: str, path: str, phases: dict[str, float]) -> None:
        self._observer.on_cold_start_phases(model, path, phases)

    def on_checkpoint(self, model: str, op: str, seconds: float) -> None:
        self._observer.on_checkpoint(model, op, seconds)

    def on_eviction(self, model: str, reason: str, action: str) -> None:
        self._observer.on_eviction(model, reason, action)


def _dir_bytes(folder: str | None) -> int:
    if not folder:
        return 0
    try:
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    except OSError:
        return 0


def _has_image(snap: ReplicaSnapshot) -> bool:
    """Its engine image is on disk: its next start restores from it rather than writing one."""
    return snap.image_dir is not None and EngineImage(Path(snap.image_dir)).exists()
