"""Where a model runs and whom it evicts: pure decisions over figures, no processes, no clocks.

The fleet's placer (placer.py) gathers the figures and carries the plan out; this module only
chooses (issue 10). Memory pools:

    a GPU (cuda:N)   the running models placed on it          <= its gpu_memory budget
    host RAM         asleep models' weights (pinned copies),   <= the host_memory budget
                     the pinned backups running GPU models keep
                     for their sleep, suspended models' (their
                     GPU state too), and on a CPU device the
                     running models too
    disk             engine images in the store                <= the disk budget; a cold
                                                               start's new image fits in
                                                               the free space too

Making room on a pool, victims are idle replicas (nothing in flight or held, no operation
under way, not pinned by `pin: true` or min_replicas), least recently used first and, at the
same last use, the smaller (cheaper to bring back) first. What a replica whose process is
ending will hand back counts as room to come: the caller waits for it rather than choosing
more victims (on the H200 one start's need hibernated four models, one per look). Each goes to sleep when its weights
fit in host RAM beside what is asleep already, else it hibernates (image on disk, process gone).
A native GPU replica pins its backup when it starts (sleep then copies into it), so its host
bytes count from the start, and a start needs room for them in host RAM as well as on the GPU:
without it, asleep replicas and then idle running ones hibernate (on the H200, twelve 8B models
with uncounted backups took all 125 GiB of RAM and the kernel killed workers).
When nothing can be evicted the caller waits (bounded by max_queue_wait); a model larger than
every budget it may use is an error naming the limit.

On disk the victims are engine images no live process may read, least recently used first
(the next start of a deleted one is a cold one): beyond the disk budget, and before a cold
start that will write an image, until that image fits. A start never waits for the disk: where
no room can be made, its image write stops at the reservation, nothing copied (store/images.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from dormant.sizes import format_bytes


class Tier(str, Enum):
    DEVICE = "device"          # a process with its weights on its device (starting, ready, waking...)
    HOST = "asleep"            # a process, weights in host RAM
    SUSPENDED = "suspended"    # a process, all its GPU state in host RAM: 0 bytes on the GPU
    DISK = "hibernated"        # no process; the engine image on disk
    NONE = "cold"              # no process, no image we know of


@dataclass(frozen=True)
class Replica:
    """One replica as the policy sees it. Bytes are what it holds now in each place."""

    model: str
    tier: Tier
    device: str                # "cuda:N" or "cpu"
    device_bytes: int = 0      # on its device (host RAM for a CPU device) while tier is DEVICE
    host_bytes: int = 0        # in host RAM now: asleep, suspended, or a running GPU replica's pinned backup
    disk_bytes: int = 0        # its engine image
    asleep_bytes: int = 0      # what it would hold in host RAM asleep (its weights on a GPU)
    last_use: float = 0.0
    in_flight: int = 0         # running + held requests
    pinned: bool = False       # pin: true or min_replicas > 0
    busy: bool = False         # an operation under way (start, wake, sleep, stop)
    leaving: bool = False      # leaving its device already (draining, sleeping, stopping)
    emptying: bool = False     # its device memory is on its way out now (sleeping, stopping), whatever comes
    releasing: bool = False    # its process is ending (hibernating, stopping): its host bytes go too

    @property
    def is_evictable(self) -> bool:
        return self.tier is Tier.DEVICE and not (self.in_flight or self.pinned or self.busy or self.leaving)


@dataclass(frozen=True)
class Limits:
    device: dict[str, int]     # "cuda:0" -> bytes; "cpu" -> the host budget (one pool with RAM)
    host: int
    disk: int
    # the config key each limit comes from, for errors (budgets.gpu_memory...)
    keys: dict[str, str] = field(default_factory=dict)
    # each GPU's whole memory ("cuda:0" -> bytes): what vLLM's gpu_memory_utilization is a share of
    memory: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Need:
    """The model that wants to run: its footprint on a device, and where it may go."""

    model: str
    device_bytes: int
    devices: tuple[str, ...]   # candidates in order of preference (one when pinned to a device)
    may_evict: bool = True     # preload never evicts
    host_bytes: int = 0        # the pinned backup it takes in host RAM when it starts on a GPU
    # it takes its device memory chunk by chunk as it comes (a native GPU wake): it may start
    # while replicas that are emptying its device still hold what it needs
    streams_in: bool = False


@dataclass(frozen=True)
class Plan:
    device: str | None = None          # run there now (None: not yet)
    sleep: tuple[str, ...] = ()
    hibernate: tuple[str, ...] = ()
    error: str | None = None           # it can never fit: tell the client

    @property
    def fits(self) -> bool:
        return self.device is not None


def pool_used(pool: str, replicas: list[Replica]) -> int:
    """Bytes held in `pool` ("cuda:N", "cpu" or "host") by these replicas."""
    used = 0
    for r in replicas:
        if r.tier is Tier.DEVICE and (r.device == pool or (pool == "host" and r.device == "cpu")):
            used += r.device_bytes
        if r.tier in (Tier.HOST, Tier.SUSPENDED, Tier.DEVICE) and pool in ("host", "cpu"):
            used += r.host_bytes
    return used


def host_coming(replicas: list[Replica]) -> int:
    """Host bytes that replicas whose process is ending are about to hand back."""
    return sum(r.host_bytes for r in replicas if r.releasing)


def place(need: Need, replicas: list[Replica], limits: Limits) -> Plan:
    """Where `need` runs, and who makes room; `replicas` are the others."""
    candidates = [d for d in need.devices if d in limits.device]
    if not candidates:
        return Plan(error=f"model {need.model!r}: no device among {', '.join(need.devices)} has a memory budget")
    largest = max(candidates, key=lambda d: limits.device[d])
    if need.device_bytes > limits.device[largest]:
        key = limits.keys.get(largest, "budgets.host_memory" if largest == "cpu" else "budgets.gpu_memory")
        return Plan(error=f"model {need.model!r} needs {format_bytes(need.device_bytes)} on {largest}, more than "
                          f"{key} ({format_bytes(limits.device[largest])}); raise {key}, or lower the "
                          "model's kv_cache_memory")
    if need.host_bytes > limits.host:
        return Plan(error=f"model {need.model!r} keeps a pinned copy of {format_bytes(need.host_bytes)} in host "
                          f"RAM, more than budgets.host_memory ({format_bytes(limits.host)}); raise it, or set "
                          "the model's engine_args backup_weights: false")
    free = {d: limits.device[d] - pool_used(d, replicas) for d in candidates}
    best = max(candidates, key=lambda d: free[d])
    host_free = limits.host - pool_used("host", replicas)
    if free[best] >= need.device_bytes and host_free >= need.host_bytes:
        return Plan(device=best)
    if not need.may_evict:
        return Plan()
    for device in sorted(candidates, key=lambda d: -free[d]):
        plan = _make_room(need, device, free[device], host_free, replicas)
        if plan is not None:
            return plan
    return Plan()  # nothing evictable now: wait for a request to end, or an eviction under way


def _make_room(need: Need, device: str, free: int, host_free: int, replicas: list[Replica]) -> Plan | None:
    """Victims that free enough on `device`, and in host RAM for need's backup; None if they
    cannot. Replicas already leaving count as room to come: then no new victim is chosen for
    the device, the caller waits; or, when the room comes from replicas emptying the device
    already and need streams in, it runs there now."""
    coming = sum(r.device_bytes for r in replicas if r.device == device and r.tier is Tier.DEVICE and r.leaving)
    host_free += host_coming(replicas)  # else each look while a victim hibernates chose one more
    if need.streams_in and host_free >= need.host_bytes and free + sum(
            r.device_bytes for r in replicas if r.device == device and r.tier is Tier.DEVICE and r.emptying
    ) >= need.device_bytes:  # its copy in overlaps theirs out
        return Plan(device=device)
    if free + coming >= need.device_bytes and host_free >= need.host_bytes:
        return Plan()
    on_cpu = device == "cpu"  # one pool with host RAM: an asleep CPU replica still holds some
    victims = sorted((r for r in replicas if r.device == device and r.is_evictable),
                     key=lambda r: (r.last_use, r.device_bytes))
    gained = free + coming  # as if every victim hibernated: the fewest victims that make room
    chosen: list[Replica] = []
    for v in victims:
        if gained >= need.device_bytes:
            break
        chosen.append(v)
        gained += v.device_bytes
    if gained < need.device_bytes:
        return None
    host_left = host_free - need.host_bytes  # below 0: host RAM must be freed as well
    sleep: list[Replica] = []
    hibernate: list[Replica] = []
    # then asleep where room allows, the most recently used first: a GPU replica's weights go
    # to its pinned backup (no new host bytes) or else need room in host RAM; an asleep CPU
    # replica keeps some of the pool
    for v in reversed(chosen):
        if on_cpu and gained - v.asleep_bytes >= need.device_bytes:
            gained -= v.asleep_bytes
            sleep.insert(0, v)
        elif not on_cpu and (v.host_bytes or v.asleep_bytes <= host_left):
            host_left -= 0 if v.host_bytes else v.asleep_bytes
            sleep.insert(0, v)
        else:
            host_left += v.host_bytes
            hibernate.insert(0, v)
    if host_left < 0:  # hibernate what holds host RAM, least recently used first
        others = [r for r in replicas if r.host_bytes and not (r.in_flight or r.pinned or r.busy or r.releasing)
                  and (r.tier in (Tier.HOST, Tier.SUSPENDED) or (r.is_evictable and r not in chosen))]
        for r in sorted(sleep + others, key=lambda r: r.last_use):
            if host_left >= 0:
                break
            if r.host_bytes:
                host_left += r.host_bytes
                if r in sleep:
                    sleep.remove(r)
                hibernate.append(r)
        if host_left < 0:
            return None
    return Plan(sleep=tuple(v.model for v in sleep), hibernate=tuple(v.model for v in hibernate))


def host_overflow(replicas: list[Replica], limits: Limits) -> list[str]:
    """Replicas to hibernate, least recently used first, until host RAM is within its budget:
    asleep and suspended ones, then idle running ones holding a backup (pinned ones stay: they
    wake fastest)."""
    excess = pool_used("host", replicas) - host_coming(replicas) - limits.host
    out: list[str] = []
    holders = [r for r in replicas if r.host_bytes and not r.busy and not r.in_flight and not r.pinned
               and not r.releasing
               and (r.tier in (Tier.HOST, Tier.SUSPENDED) or r.is_evictable)]
    for r in sorted(holders, key=lambda r: (r.tier is Tier.DEVICE, r.last_use)):
        if excess <= 0:
            break
        out.append(r.model)
        excess -= r.host_bytes
    return out


@dataclass(frozen=True)
class Image:
    folder: str
    bytes: int
    last_use: float
    in_use: bool   # a live process may read it (an asleep CPU replica wakes from it)


def images_to_delete(images: list[Image], limit: int) -> list[str]:
    """Engine images to delete, least recently used first, until the rest fit in `limit`.
    An image in use is never deleted; the next start of a deleted one is a cold start."""
    return [i.folder for i in _least_recently_used(images, sum(i.bytes for i in images) - limit)]


def images_to_make_room(images: list[Image], room: int, need: int) -> list[str]:
    """Engine images to delete, least recently used first, so that a new image of `need` bytes
    fits in `room` (what the disk can take now). None when it fits already, and none when even
    every image not in use would not make room: the new image's write then fails at once and
    is skipped (images.py reserves its blocks first), and those images are better kept."""
    chosen = _least_recently_used(images, need - room)
    return [i.folder for i in chosen] if room + sum(i.bytes for i in chosen) >= need else []


def _least_recently_used(images: list[Image], excess: int) -> list[Image]:
    """The images not in use, least recently used first, until their bytes cover `excess`."""
    out: list[Image] = []
    for image in sorted((i for i in images if not i.in_use), key=lambda i: i.last_use):
        if excess <= 0:
            break
        out.append(image)
        excess -= image.bytes
    return out
