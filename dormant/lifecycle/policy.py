"""When a replica changes tier: pure decisions, no processes, no clocks.

The controller asks; it never decides by itself. Keeping the *when* here (and the *how* in
`process.py` and the controller) lets tests pin every rule without starting a worker.

Idle rules (Ollama's keep_alive semantics, per DESIGN.md section 3):

* The idle clock starts when the last in-flight request of a replica ends.
* Four tiers, each at its own time on that clock; `-1` never, `0` at once:
    sleep_after      weights leave the accelerator, KV freed; the process stays (wake: ~0.3 s)
    suspend_after    after sleep, the whole process's GPU state goes to host memory through the
                     driver's checkpoint API (checkpoint.py): 0 GPU bytes, the process stays
                     (resume, then wake); a replica that is still ready sleeps first. Where the
                     API cannot suspend a worker the tier is skipped (the replica stays asleep
                     until its next tier)
    hibernate_after  the worker exits; its engine image stays on disk (restore: disk speed)
    stop_after       the worker exits and the image is deleted (next start: a full cold start)
  A tier at or after a later tier is skipped (sleep_after >= hibernate_after: no sleep).
  `unload` (admin) ends the worker and keeps the image, like hibernation.
* A request's `keep_alive` replaces how long the replica stays ready after that request: the
  first tier moves to it, later tiers never come earlier than it.
* `min_replicas > 0` keeps the replica ready: no idle step fires.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from dormant.config import ModelSpec
from dormant.durations import NEVER


class IdleAction(str, Enum):
    SLEEP = "sleep"
    SUSPEND = "suspend"
    HIBERNATE = "hibernate"
    STOP = "stop"


@dataclass(frozen=True)
class IdlePlan:
    """Seconds after the idle clock started at which each tier begins (NEVER: not at all)."""

    sleep_at: float
    stop_at: float
    hibernate_at: float = NEVER
    suspend_at: float = NEVER

    def next_step(self, is_asleep: bool = False, is_hibernated: bool = False, is_suspended: bool = False,
                  can_suspend: bool = True) -> tuple[IdleAction, float] | None:
        """The next action and its time on the idle clock, or None if the replica stays put;
        `can_suspend` False skips the suspend tier (the API cannot suspend this worker)."""
        suspend_at = self.suspend_at if can_suspend else NEVER
        tiers = [(IdleAction.SLEEP, self.sleep_at), (IdleAction.SUSPEND, suspend_at),
                 (IdleAction.HIBERNATE, self.hibernate_at), (IdleAction.STOP, self.stop_at)]
        first = 3 if is_hibernated else 2 if is_suspended else 1 if is_asleep else 0
        for i in range(first, len(tiers)):
            action, at = tiers[i]
            if at != NEVER and not _superseded(at, [t for _, t in tiers[i + 1:]]):
                return action, at
        return None


def _superseded(at: float, later: list[float]) -> bool:
    return any(t != NEVER and t <= at for t in later)


def idle_plan(spec: ModelSpec, keep_alive: float | None = None) -> IdlePlan:
    """The tiers for one idle period, from the spec and the last request's `keep_alive`."""
    if spec.min_replicas > 0 or keep_alive == NEVER:
        return IdlePlan(NEVER, NEVER)
    tiers = [spec.sleep_after, spec.suspend_after, spec.hibernate_after, spec.stop_after]
    # the suspend tier does not drop the sleep tier here: where suspension proves unavailable,
    # the replica still sleeps (next_step skips what a later tier supersedes, tier by tier)
    tiers = [NEVER if t == NEVER or _superseded(t, tiers[max(i + 1, 2):]) else t for i, t in enumerate(tiers)]
    if keep_alive is not None:
        first = next((i for i, t in enumerate(tiers) if t != NEVER), None)
        if first is None:  # no tier at all: leaving ready ends the worker (Ollama's keep_alive=0)
            return IdlePlan(NEVER, keep_alive)
        tiers = [NEVER if t == NEVER else max(t, keep_alive) for t in tiers]
        tiers[first] = keep_alive
    sleep_at, suspend_at, hibernate_at, stop_at = tiers
    return IdlePlan(sleep_at, stop_at, hibernate_at, suspend_at)


# ---- start timeout ---------------------------------------------------------------------------

BASE_START_SECONDS = 60.0
SECONDS_PER_GB = 30.0
# A first start may import a GGUF (dequantise + save): ~25 s for the 98 MB default on two cores.
# Be generous: a slow disk or a busy machine must not turn a first start into a 503.
IMPORT_ALLOWANCE_SECONDS = 180.0
IMPORT_SECONDS_PER_GB = 240.0
UNKNOWN_SIZE_BYTES = 1 << 30


def start_timeout(spec: ModelSpec, store_root: Path) -> float:
    """spec.start_timeout, or 60 s + 30 s/GB on disk (+ an import allowance if not yet imported)."""
    if spec.start_timeout is not None and spec.start_timeout > 0:
        return spec.start_timeout
    size, needs_import = _size_on_disk(spec.source, store_root)
    gb = size / 1e9
    seconds = BASE_START_SECONDS + SECONDS_PER_GB * gb
    if needs_import:
        seconds += IMPORT_ALLOWANCE_SECONDS + IMPORT_SECONDS_PER_GB * gb
    return seconds


def _size_on_disk(source: str, store_root: Path) -> tuple[int, bool]:
    """Bytes of the model's weights and whether a first start must import them."""
    from dormant.store.models import SourceNotFound, parse_source  # no torch

    try:
        found = parse_source(source, store_root)
    except SourceNotFound:
        return UNKNOWN_SIZE_BYTES, True
    if found.kind == "folder":
        return _folder_bytes(found.folder), False
    if found.folder is not None and (found.folder / "config.json").is_file():
        return _folder_bytes(found.folder), False
    if found.kind == "builtin":
        return 100_000_000, True
    if found.kind == "gguf":
        return (found.gguf.stat().st_size if found.gguf.is_file() else UNKNOWN_SIZE_BYTES), True
    return UNKNOWN_SIZE_BYTES, True  # an HF repo: may be downloaded on first start


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
