"""When a replica changes tier: pure decisions, no processes, no clocks.

The controller asks; it never decides by itself. Keeping the *when* here (and the *how* in
`process.py` and the controller) lets tests pin every rule without starting a worker.

Idle rules (Ollama's keep_alive semantics, per DESIGN.md section 3):

* The idle clock starts when the last in-flight request of a replica ends.
* `sleep_after` seconds later the replica sleeps (weights leave the accelerator, the process
  stays); `stop_after` seconds later the worker exits. `-1` never, `0` at once.
* A request's `keep_alive` replaces how long the replica stays ready after that request; the
  spec's next tier follows (never earlier than the override).
* `min_replicas > 0` keeps the replica ready: no idle step fires.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from dormant.config import NEVER, ModelSpec


class IdleAction(str, Enum):
    SLEEP = "sleep"
    STOP = "stop"


@dataclass(frozen=True)
class IdlePlan:
    """Seconds after the idle clock started at which each tier begins (NEVER: not at all)."""

    sleep_at: float
    stop_at: float

    def next_step(self, is_asleep: bool) -> tuple[IdleAction, float] | None:
        """The next action and its time on the idle clock, or None if the replica stays put."""
        if not is_asleep and self.sleep_at != NEVER and (self.stop_at == NEVER or self.sleep_at < self.stop_at):
            return IdleAction.SLEEP, self.sleep_at
        if self.stop_at != NEVER:
            return IdleAction.STOP, self.stop_at
        return None


def idle_plan(spec: ModelSpec, keep_alive: float | None = None) -> IdlePlan:
    """The tiers for one idle period, from the spec and the last request's `keep_alive`."""
    if spec.min_replicas > 0:
        return IdlePlan(NEVER, NEVER)
    if keep_alive is None:
        return IdlePlan(spec.sleep_after, spec.stop_after)
    if keep_alive == NEVER:
        return IdlePlan(NEVER, NEVER)
    if spec.sleep_after != NEVER and (spec.stop_after == NEVER or spec.sleep_after < spec.stop_after):
        stop_at = NEVER if spec.stop_after == NEVER else max(spec.stop_after, keep_alive)
        return IdlePlan(keep_alive, stop_at)
    # No sleep tier: leaving ready means the worker exits (Ollama's keep_alive=0 unloads).
    return IdlePlan(NEVER, keep_alive)


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
    from dormant.store.models import BUILTIN_SOURCES  # no torch: a names table

    if source in BUILTIN_SOURCES:
        folder = store_root / "models" / "SmolLM2-135M-Instruct"
        if (folder / "config.json").is_file():
            return _folder_bytes(folder), False
        return 100_000_000, True
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        imported = store_root / "models" / path.name[: -len(".gguf")]
        if (imported / "config.json").is_file():
            return _folder_bytes(imported), False
        return (path.stat().st_size if path.is_file() else UNKNOWN_SIZE_BYTES), True
    if path.is_dir():
        return _folder_bytes(path), False
    imported = store_root / "models" / source
    if (imported / "config.json").is_file():
        return _folder_bytes(imported), False
    return UNKNOWN_SIZE_BYTES, True  # an HF repo: may be downloaded on first start


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
