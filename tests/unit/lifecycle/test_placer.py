"""The placer carrying out the policy over real controllers (fake workers, conftest.py): who
is evicted, who waits, what is preloaded, what is hibernated or deleted for the budgets. The
disk is a fake one (FakeDisk): its free space is what the test says less the images' bytes."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from conftest import FakeClock, FakeLauncher, FakeSuspender, RecordingObserver, until
from dormant.config import ModelSpec, Size
from dormant.durations import NEVER
from dormant.errors import ModelUnavailable
from dormant.lifecycle.budgets import DISK_RESERVE_BYTES, StoreDisk
from dormant.lifecycle.controller import ReplicaController
from dormant.lifecycle.placement import Limits
from dormant.lifecycle.placer import Placer
from dormant.lifecycle.states import State

pytestmark = pytest.mark.anyio
G = 2**30


class Fleet:
    """Replicas m1, m2, m3... sharing one placer; each runs in 4 GiB and sleeps in 1 GiB."""

    def __init__(self, tmp_path: Path, limits: Limits, n: int = 3, running: int = 4 * G,
                 disk: StoreDisk | None = None, image: int = 0, **spec_kw) -> None:
        self.clock = FakeClock()
        self.observer = RecordingObserver()
        self.placer = Placer(limits, tmp_path, self.observer, estimate=lambda spec, device, budget: (running, G),
                             disk=disk, image_estimate=lambda spec, device: image)
        self.c: dict[str, ReplicaController] = {}
        self.launchers: dict[str, FakeLauncher] = {}
        for i in range(1, n + 1):
            kw = {"sleep_after": NEVER, "hibernate_after": NEVER, "stop_after": NEVER, "max_queue_wait": NEVER}
            spec = ModelSpec(id=f"m{i}", source="builtin:smollm2", **{**kw, **spec_kw.get(f"m{i}", {})})
            self.launchers[spec.id] = FakeLauncher(tmp_path / "images")
            c = ReplicaController(spec, launch=self.launchers[spec.id], start_timeout=30.0,
                                  observer=self.placer, clock=self.clock, liveness=None, room=self.placer,
                                  suspender=FakeSuspender())
            self.placer.add(c)
            self.c[spec.id] = c
            c.start()

    def state(self, model: str) -> State:
        return self.c[model].snapshot().state

    async def admitted(self, model: str):
        self.clock.advance(1.0)  # a later last use
        ticket = await self.c[model].enter()
        await ticket.admitted
        return ticket

    async def served(self, model: str) -> None:
        self.c[model].leave(await self.admitted(model))
        await until(lambda: self.c[model].snapshot().in_flight == 0)

    async def close(self) -> None:
        for c in self.c.values():
            await c.shutdown()


    def gate_start(self, model: str) -> asyncio.Event:
        """Hold `model`'s next start in starting until the event is set."""
        self.launchers[model].gates["wait_healthy"] = asyncio.Event()
        return self.launchers[model].gates["wait_healthy"]

    def image(self, model: str) -> Path:
        return Path(self.c[model].snapshot().image_dir)

    def fill_image(self, model: str, nbytes: int) -> None:
        """Its image holds `nbytes` (a sparse file: the placer reads sizes, not blocks)."""
        with open(self.image(model) / "weights.bin", "wb") as f:
            f.truncate(nbytes)


class FakeDisk:
    """The store's filesystem as StoreDisk reads it: 100 GiB, of which `room` is free less what
    the images hold (a deleted image gives its bytes back); lower `room` as other files come."""

    TOTAL = 100 * G

    def __init__(self, images: Path, room: int) -> None:
        self.images = images
        self.room = room

    def __call__(self) -> tuple[int, int]:
        # an image may be being deleted meanwhile (a thread): what is gone holds nothing
        held = 0
        for folder, _, files in os.walk(self.images):
            for name in files:
                try:
                    held += os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:
                    pass
        return self.TOTAL, self.room - held


CPU = Limits(device={"cpu": 10 * G}, host=10 * G, disk=100 * G)


@pytest.fixture
async def fleet(tmp_path):
    made: list[Fleet] = []

    def build(limits: Limits = CPU, **kw) -> Fleet:
        made.append(Fleet(tmp_path, limits, **kw))
        return made[-1]

    yield build
    for f in made:
        await f.close()


async def test_the_least_recently_used_idle_replica_sleeps_to_make_room(fleet):
    f = fleet()
    await f.served("m1")
    await f.served("m2")
    await f.served("m3")  # 3 x 4 GiB > 10: m1 sleeps (it keeps 1 GiB of the pool)
    assert f.state("m1") is State.ASLEEP and f.state("m2") is State.READY
    assert f.observer.evictions == [("m1", "make_room", "sleep")]
    await f.served("m1")  # and back: m2 is now the least recently used
    assert f.state("m2") is State.ASLEEP and f.state("m3") is State.READY


async def test_a_replica_with_a_request_in_flight_is_never_evicted_the_next_waits(fleet):
    f = fleet()
    t1 = await f.admitted("m1")
    t2 = await f.admitted("m2")
    waiting = await f.c["m3"].enter()
    await until(lambda: "m3" in f.placer._waiting)
    assert not waiting.admitted.done() and f.state("m3") is State.COLD
    f.c["m2"].leave(t2)  # m2 is idle now: it goes, m3 comes
    await until(lambda: waiting.admitted.done(), timeout=5)
    assert f.state("m2") is State.ASLEEP and f.state("m1") is State.READY
    f.c["m1"].leave(t1)
    f.c["m3"].leave(waiting)


async def test_a_pinned_replica_is_never_evicted(fleet):
    f = fleet(m1={"pin": True})
    await f.served("m1")
    await f.served("m2")
    await f.served("m3")
    assert f.state("m1") is State.READY and f.state("m2") is State.ASLEEP


async def test_a_model_larger_than_the_budget_fails_naming_it(fleet):
    f = fleet(running=11 * G)
    ticket = await f.c["m1"].enter()
    with pytest.raises(ModelUnavailable, match="budgets.host_memory") as e:
        await ticket.admitted
    assert e.value.code == "model_too_large"
    f.c["m1"].leave(ticket)


async def test_preload_starts_what_fits_and_evicts_nobody(fleet):
    f = fleet()
    await f.served("m1")
    await f.served("m2")
    f.c["m3"].preload()
    await until(lambda: f.c["m3"]._inbox.empty())
    assert f.state("m3") is State.COLD and f.state("m1") is State.READY
    f2 = fleet(n=1)
    f2.c["m1"].preload()
    await until(lambda: f2.state("m1") is State.READY)


async def test_asleep_beyond_the_host_budget_hibernate_and_images_beyond_disk_are_deleted(fleet):
    limits = Limits(device={"cuda:0": 20 * G}, host=int(1.5 * G), disk=1)
    # no pinned backup while running: the host RAM is taken when they sleep
    gpu = {"device": "cuda:0", "sleep_after": 5.0, "engine_args": {"backup_weights": False}}
    f = fleet(limits, n=2, m1=gpu, m2=gpu)
    await f.served("m1")
    await f.served("m2")
    f.clock.advance(5.0)  # both sleep: 2 GiB asleep > 1.5: the least recently used hibernates
    await until(lambda: ("m1", "host_budget", "hibernate") in f.observer.evictions and f.state("m2") is State.ASLEEP)
    # its image is beyond the 1-byte disk budget: deleted, and with nothing to restore from m1
    # is stopped, not hibernated; m2's stays (its process may read it)
    await until(lambda: ("m1", "disk_budget", "delete_image") in f.observer.evictions
                and f.state("m1") is State.STOPPED)
    image = Path(f.c["m2"].snapshot().image_dir)
    await until(lambda: not (image.parent / "m1-image").exists())
    assert image.exists()


async def test_running_replicas_pinned_backups_count_against_the_host_budget(fleet):
    # each native GPU replica pins a 1 GiB copy of its weights while it runs: two do not fit
    # in 1.5 GiB of host RAM, so the second start hibernates the first (the H200 run that
    # did not count them ran out of RAM and the kernel killed workers)
    limits = Limits(device={"cuda:0": 20 * G}, host=int(1.5 * G), disk=100 * G)
    gpu = {"device": "cuda:0"}
    f = fleet(limits, n=2, m1=gpu, m2=gpu)
    await f.served("m1")
    await f.served("m2")
    await until(lambda: f.state("m1") is State.HIBERNATED and f.state("m2") is State.READY)
    assert ("m1", "make_room", "hibernate") in f.observer.evictions


async def test_a_start_waits_for_its_hibernating_victim_instead_of_choosing_more(fleet):
    # host RAM holds two 1 GiB backups; m3's start hibernates m1 (least recently used), whose
    # exit takes a while. Every look meanwhile (each 0.25 s, each transition) must count m1's
    # backup as room to come: on the H200 one start hibernated four models, one per look
    limits = Limits(device={"cuda:0": 20 * G}, host=int(2.5 * G), disk=100 * G)
    gpu = {"device": "cuda:0"}
    f = fleet(limits, n=3, m1=gpu, m2=gpu, m3=gpu)
    written = asyncio.Event()
    f.launchers["m1"].gates["stop"] = written
    await f.served("m1")
    await f.served("m2")
    looks = 0
    claim = f.placer.claim

    def counted(model, **kw):
        nonlocal looks
        looks += model == "m3"
        return claim(model, **kw)

    f.placer.claim = counted
    third = asyncio.create_task(f.served("m3"))
    await until(lambda: f.state("m1") is State.STOPPING and looks >= 6)
    assert f.state("m2") is State.READY and f.observer.evictions == [("m1", "make_room", "hibernate")]
    written.set()
    await third
    assert f.state("m1") is State.HIBERNATED and f.state("m2") is State.READY and f.state("m3") is State.READY


async def test_a_victim_made_room_for_writes_no_image_and_keeps_the_one_on_disk(fleet):
    # m3's start waits for m1's exit: m1 hibernates with the image its start wrote, asking its
    # worker to write nothing (a 16 GB write held a start 20-25 s on the H200); m2, whose
    # start wrote none, ends without one: stopped, not hibernated (its next start is a cold one)
    limits = Limits(device={"cuda:0": 20 * G}, host=int(2.5 * G), disk=100 * G)
    gpu = {"device": "cuda:0"}
    f = fleet(limits, n=3, m1=gpu, m2=gpu, m3=gpu)
    await f.served("m1")
    await f.served("m2")
    image = Path(f.c["m2"].snapshot().image_dir)
    (image / "manifest.json").unlink()  # m2's start wrote none (a full disk)
    await f.served("m3")
    await f.served("m1")  # m2 is now the least recently used
    await until(lambda: f.state("m1") is State.READY and f.state("m2") is State.STOPPED)
    assert [e for e in f.observer.evictions if e[1] == "make_room"] == [("m1", "make_room", "hibernate"),
                                                                          ("m2", "make_room", "hibernate")]
    for m in ("m1", "m2"):
        assert "hibernate" not in f.launchers[m].workers[0].calls
    assert f.c["m1"].snapshot().image_dir and not (image / "manifest.json").exists()


async def test_a_suspended_replica_holds_no_gpu_and_its_host_bytes_count_against_the_host_budget(fleet):
    limits = Limits(device={"cuda:0": 20 * G}, host=int(2.5 * G), disk=100 * G)
    tiers = {"device": "cuda:0", "sleep_after": 5.0, "suspend_after": 10.0, "engine_args": {"backup_weights": False}}
    f = fleet(limits, n=2, m1=tiers, m2=tiers)
    await f.served("m1")
    f.clock.advance(5.0)
    await until(lambda: f.state("m1") is State.ASLEEP)
    f.clock.advance(5.0)
    await until(lambda: f.state("m1") is State.SUSPENDED)
    view = f.placer.view(f.c["m1"].snapshot())
    assert (view.tier.value, view.device_bytes, view.host_bytes) == ("suspended", 0, G + FakeSuspender.MOVED_BYTES)
    await f.served("m2")  # asleep beside it: 1 + 2 GiB > 2.5: the least recently used, m1, hibernates
    f.clock.advance(5.0)
    await until(lambda: f.state("m1") is State.HIBERNATED and f.state("m2") is State.ASLEEP)
    assert ("m1", "host_budget", "hibernate") in f.observer.evictions


async def test_a_keep_warm_replica_without_room_waits_for_it_without_spinning(fleet):
    f = fleet(m3={"min_replicas": 1})
    await until(lambda: f.state("m3") is State.READY)
    t1 = await f.admitted("m1")
    await f.c["m3"].unload()  # stopped; keep-warm holds until the next request
    t2 = await f.admitted("m2")
    ticket = await f.c["m3"].enter()  # keep-warm again, but m1 and m2 are busy and fill the pool
    await until(lambda: "m3" in f.placer._waiting)
    await asyncio.sleep(0.6)  # the placer looks again every 0.25 s meanwhile
    assert f.clock.pending() == [] and not ticket.admitted.done()  # no keep-warm retry timer piling up
    f.c["m1"].leave(t1)
    await until(lambda: ticket.admitted.done())
    assert f.state("m1") is State.ASLEEP
    f.c["m2"].leave(t2)
    f.c["m3"].leave(ticket)


async def test_the_disk_budget_is_read_again_at_each_look_as_other_files_take_the_disk(fleet, tmp_path, caplog):
    # the H200: the budget taken at start no longer fit once other files took the free space,
    # and image writes failed with ENOSPC while unused images stayed
    caplog.set_level(logging.INFO, "dormant.lifecycle")
    usage = FakeDisk(tmp_path / "images", room=50 * G)
    f = fleet(n=2, disk=StoreDisk(Size(), usage), m1={"hibernate_after": 5.0})
    await f.served("m1")
    f.clock.advance(5.0)
    await until(lambda: f.state("m1") is State.HIBERNATED)
    f.fill_image("m1", 3 * G)
    await f.served("m2")  # transitions: the placer looks, 47 GiB free: the image stays
    assert f.image("m1").exists() and f.observer.evictions == []
    usage.room = 6 * G  # other files came: 3 GiB free, below the 4 GiB reserve
    await f.c["m2"].unload()  # transitions: the placer looks again
    await until(lambda: ("m1", "disk_budget", "delete_image") in f.observer.evictions
                and f.state("m1") is State.STOPPED)
    await until(lambda: "m1-image deleted (disk budget)" in caplog.text)
    assert not (tmp_path / "images" / "m1-image").exists()


async def test_a_cold_start_makes_room_for_its_image_deleting_images_no_process_reads(fleet, tmp_path, caplog):
    # m3 is asleep (its process may read its image), m1 and m2 hibernated: m4's 4 GiB image
    # needs 1.5 GiB more than the disk has free beyond the reserve
    caplog.set_level(logging.INFO, "dormant.lifecycle")
    images = tmp_path / "images"
    usage = FakeDisk(images, room=50 * G)
    tiers = {"hibernate_after": 5.0}
    f = fleet(n=5, running=G, disk=StoreDisk(Size(), usage), image=4 * G, m1=tiers, m2=tiers,
              m3={"sleep_after": 5.0})
    for m in ("m3", "m1", "m2"):  # m3 the least recently used
        await f.served(m)
    f.clock.advance(5.0)
    await until(lambda: [f.state(m) for m in ("m1", "m2", "m3")] == [State.HIBERNATED] * 2 + [State.ASLEEP])
    for m in ("m1", "m2", "m3"):
        f.fill_image(m, 3 * G)
    usage.room = 9 * G + DISK_RESERVE_BYTES + int(2.5 * G)
    held = f.gate_start("m4")
    fourth = await f.c["m4"].enter()
    await until(lambda: f.state("m4") is State.STARTING and not (images / "m1-image").exists())
    assert f.observer.evictions == [("m1", "image_room", "delete_image")] and f.state("m1") is State.STOPPED
    await until(lambda: f"engine image {images / 'm1-image'} deleted (room for m4's image)" in caplog.text)
    # m5 starts while m4 still starts: m4's image to come counts as taken, so m2's goes too
    await f.served("m5")
    assert f.observer.evictions[1:] == [("m2", "image_room", "delete_image")]
    await until(lambda: not (images / "m2-image").exists())
    assert f.state("m3") is State.ASLEEP and f.image("m3").exists()
    held.set()
    await fourth.admitted
    f.c["m4"].leave(fourth)


async def test_a_cold_start_without_room_for_its_image_deletes_nothing_and_starts(fleet, tmp_path, caplog):
    caplog.set_level(logging.INFO, "dormant.lifecycle")
    usage = FakeDisk(tmp_path / "images", room=50 * G)
    f = fleet(n=3, running=G, disk=StoreDisk(Size(), usage), image=40 * G, m1={"hibernate_after": 5.0},
              m2={"sleep_after": 5.0})
    await f.served("m1")
    await f.served("m2")
    f.clock.advance(5.0)
    await until(lambda: f.state("m1") is State.HIBERNATED and f.state("m2") is State.ASLEEP)
    f.fill_image("m1", 3 * G)
    f.fill_image("m2", 30 * G)  # in use: never deleted, so 40 GiB cannot be made
    usage.room = 33 * G + DISK_RESERVE_BYTES + G
    await f.served("m3")  # its worker's write then fails at once (ENOSPC) and is skipped
    assert f.observer.evictions == [] and f.image("m1").exists() and f.state("m1") is State.HIBERNATED
    assert "model m3: no room on disk for its engine image" in caplog.text
