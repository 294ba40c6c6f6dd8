"""The placement policy, pure: figures in, a plan out (issue 10)."""

from __future__ import annotations

from dormant.lifecycle.placement import (Image, Limits, Need, Replica, Tier, host_overflow, images_to_delete,
                                         images_to_make_room, place, pool_used)

G = 2**30
GPU = Limits(device={"cuda:0": 100 * G}, host=50 * G, disk=200 * G)


def running(model: str, gb: float, last_use: float = 0.0, device: str = "cuda:0", **kw) -> Replica:
    return Replica(model, Tier.DEVICE, device, device_bytes=int(gb * G), asleep_bytes=int(kw.pop("asleep", gb) * G),
                   last_use=last_use, **kw)


def asleep(model: str, gb: float, last_use: float = 0.0, device: str = "cuda:0", **kw) -> Replica:
    return Replica(model, Tier.HOST, device, host_bytes=int(gb * G), last_use=last_use, **kw)


def need(gb: float, devices=("cuda:0",), **kw) -> Need:
    return Need("new", int(gb * G), tuple(devices), **kw)


def test_fits_without_evicting():
    plan = place(need(40), [running("a", 50)], GPU)
    assert plan.device == "cuda:0" and not plan.sleep and not plan.hibernate


def test_least_recently_used_idle_replica_sleeps():
    plan = place(need(40), [running("a", 40, last_use=5), running("b", 40, last_use=1)], GPU)
    assert plan.sleep == ("b",) and plan.hibernate == () and not plan.fits


def test_same_last_use_the_smaller_goes_first():
    plan = place(need(30), [running("big", 45, last_use=1), running("small", 30, last_use=1)], GPU)
    assert plan.sleep == ("small",)


def test_several_victims_when_one_is_not_enough():
    replicas = [running("a", 30, 1), running("b", 30, 2), running("c", 30, 3)]
    plan = place(need(60), replicas, GPU)
    # both must go; only one fits asleep in 50 GiB of host RAM: the more recently used
    assert plan.sleep == ("b",) and plan.hibernate == ("a",)


def test_never_a_replica_with_requests_in_flight_pinned_or_busy():
    replicas = [running("busy", 25, 0, in_flight=1), running("pinned", 25, 0, pinned=True),
                running("op", 25, 0, busy=True), running("idle", 25, 9)]
    assert place(need(25), replicas, GPU).sleep == ("idle",)
    plan = place(need(50), replicas, GPU)  # the idle one is not enough, the others may not go: wait
    assert not plan.fits and not plan.sleep and not plan.hibernate and plan.error is None


def test_nothing_evictable_means_wait():
    plan = place(need(50), [running("a", 80, in_flight=2)], GPU)
    assert not plan.fits and plan.error is None and not plan.sleep and not plan.hibernate


def test_hibernates_when_host_budget_is_full():
    limits = Limits(device={"cuda:0": 100 * G}, host=20 * G, disk=200 * G)
    replicas = [running("a", 40, 1, asleep=16), running("b", 40, 2, asleep=16), asleep("c", 10)]
    plan = place(need(60), replicas, limits)
    assert plan.sleep == () and plan.hibernate == ("a",)  # 10 asleep + 16 > 20


def test_sleep_while_host_allows_then_hibernate():
    limits = Limits(device={"cuda:0": 100 * G}, host=20 * G, disk=200 * G)
    replicas = [running("a", 40, 1, asleep=16), running("b", 40, 2, asleep=16)]
    plan = place(need(90), replicas, limits)
    assert plan.sleep == ("b",) and plan.hibernate == ("a",)  # the more recent one stays closer


def test_leaving_replica_counts_as_room_coming():
    replicas = [running("a", 60, 1, leaving=True), running("b", 30, 0)]
    plan = place(need(50), replicas, GPU)
    assert plan == place(need(50), replicas, GPU) and not plan.sleep and not plan.fits


def test_a_wake_that_streams_in_starts_while_its_room_is_emptying():
    # a sleeping victim releases its chunks as its copy out runs: a wake can map them as they come
    sleeping = [running("a", 60, 1, busy=True, leaving=True, emptying=True), running("b", 30, 0)]
    assert place(need(50, streams_in=True), sleeping, GPU).device == "cuda:0"
    # a start (or a wake that cannot wait for memory) waits for the victim to be gone
    assert not place(need(50), sleeping, GPU).fits
    # a draining victim may still be serving for minutes: nobody starts on its room
    draining = [running("a", 60, 1, leaving=True), running("b", 30, 0)]
    plan = place(need(50, streams_in=True), draining, GPU)
    assert not plan.fits and not plan.sleep
    # what is emptying must cover the whole need; else victims are chosen as before
    plan = place(need(80, streams_in=True), sleeping, GPU)
    assert not plan.fits and plan.sleep == ("b",)
    # and the host budget still holds for its backup
    plan = place(need(50, streams_in=True, host_bytes=45 * G), [*sleeping, asleep("c", 10, 0, pinned=True)], GPU)
    assert not plan.fits and plan.error is None


def test_too_large_for_every_device_names_the_budget():
    limits = Limits(device={"cuda:0": 80 * G, "cuda:1": 90 * G}, host=50 * G, disk=1,
                    keys={"cuda:1": "budgets.gpu_memory.cuda:1"})
    plan = place(need(95, devices=("cuda:0", "cuda:1")), [], limits)
    assert "budgets.gpu_memory.cuda:1" in plan.error and "90.0 GiB" in plan.error


def test_picks_the_device_with_room():
    limits = Limits(device={"cuda:0": 100 * G, "cuda:1": 100 * G}, host=50 * G, disk=1)
    plan = place(need(50, devices=("cuda:0", "cuda:1")), [running("a", 70)], limits)
    assert plan.device == "cuda:1"


def test_pinned_device_is_the_only_candidate():
    limits = Limits(device={"cuda:0": 100 * G, "cuda:1": 100 * G}, host=50 * G, disk=1)
    plan = place(need(50, devices=("cuda:0",)), [running("a", 70, 3, asleep=20)], limits)
    assert plan.sleep == ("a",) and not plan.fits


def test_preload_never_evicts():
    plan = place(need(50, may_evict=False), [running("a", 70)], GPU)
    assert plan == type(plan)()


def test_cpu_pool_is_host_ram_and_asleep_cpu_replicas_keep_some():
    limits = Limits(device={"cpu": 10 * G}, host=10 * G, disk=1)
    replicas = [running("a", 4, 1, device="cpu", asleep=0.5), running("b", 4, 2, device="cpu", asleep=0.5)]
    plan = place(need(4, devices=("cpu",)), replicas, limits)
    assert plan.sleep == ("a",)  # 10 - 8 + 3.5 >= 4
    tight = Limits(device={"cpu": 8.2 * G}, host=8.2 * G, disk=1)
    plan = place(need(4, devices=("cpu",)), replicas, tight)
    assert plan.sleep == () and plan.hibernate == ("a",)  # asleep, a would leave 3.7 GiB


def test_pool_used_counts_asleep_in_host_and_cpu():
    replicas = [running("g", 10), running("c", 2, device="cpu"), asleep("s", 3)]
    assert pool_used("cuda:0", replicas) == 10 * G
    assert pool_used("host", replicas) == 5 * G


def test_host_overflow_hibernates_least_recently_used():
    limits = Limits(device={"cuda:0": 100 * G}, host=20 * G, disk=1)
    replicas = [asleep("old", 10, 1), asleep("new", 10, 5), asleep("mid", 10, 3), asleep("pin", 10, 0, pinned=True)]
    assert host_overflow(replicas, limits) == ["old", "mid"]


def suspended(model: str, gb: float, last_use: float = 0.0, **kw) -> Replica:
    return Replica(model, Tier.SUSPENDED, "cuda:0", host_bytes=int(gb * G), last_use=last_use, **kw)


def test_a_suspended_replica_holds_host_ram_and_no_gpu():
    replicas = [running("g", 90), suspended("s", 17)]
    assert pool_used("cuda:0", replicas) == 90 * G
    assert pool_used("host", replicas) == 17 * G
    assert place(need(10), replicas, GPU).device == "cuda:0"  # the suspended one left room
    limits = Limits(device={"cuda:0": 100 * G}, host=20 * G, disk=1)
    assert host_overflow([suspended("s", 17, 1), asleep("a", 10, 5)], limits) == ["s"]


def test_images_beyond_disk_budget_go_least_recently_used_never_in_use():
    images = [Image("a", 10, 1, False), Image("b", 10, 2, True), Image("c", 10, 3, False), Image("d", 10, 4, False)]
    assert images_to_delete(images, 25) == ["a", "c"]
    assert images_to_delete(images, 40) == []


def test_room_for_a_new_image_deletes_least_recently_used_images_never_one_in_use():
    # b is the least recently used but an asleep CPU replica may wake from it
    images = [Image("b", 10, 1, True), Image("a", 10, 2, False), Image("c", 10, 3, False), Image("d", 10, 4, False)]
    assert images_to_make_room(images, room=5, need=12) == ["a"]
    assert images_to_make_room(images, room=5, need=20) == ["a", "c"]
    assert images_to_make_room(images, room=5, need=35) == ["a", "c", "d"]


def test_no_image_deleted_when_the_new_one_fits_or_no_room_can_be_made():
    images = [Image("a", 10, 1, False), Image("b", 10, 2, True)]
    assert images_to_make_room(images, room=12, need=12) == []
    # even with a gone it would not fit: a is kept, and the new image's write is skipped
    assert images_to_make_room(images, room=5, need=20) == []
    assert images_to_make_room([Image("b", 10, 2, True)], room=0, need=1) == []
    assert images_to_make_room([], room=-3, need=1) == []


def test_a_running_replicas_pinned_backup_is_host_ram_in_use():
    backed = running("a", 20, host_bytes=16 * G)
    assert pool_used("host", [backed]) == 16 * G and pool_used("cuda:0", [backed]) == 20 * G


def test_a_start_needs_host_room_for_its_backup_too():
    # the GPU has room; host RAM (50 GiB) holds a's 40 GiB backup: the new model's 16 GiB
    # backup does not fit beside it, so a (idle, least recently used) hibernates
    plan = place(need(20, host_bytes=16 * G), [running("a", 40, last_use=1, host_bytes=40 * G)], GPU)
    assert plan.hibernate == ("a",) and not plan.sleep and not plan.fits
    # asleep replicas' host RAM goes first, least recently used first
    replicas = [asleep("old", 20, last_use=1), asleep("new-ish", 20, last_use=5), running("a", 30, 9, host_bytes=10 * G)]
    plan = place(need(20, host_bytes=16 * G), replicas, GPU)
    assert plan.hibernate == ("old",) and not plan.sleep
    # with room in both pools it simply fits
    assert place(need(20, host_bytes=16 * G), [running("a", 30, host_bytes=10 * G)], GPU).fits


def test_a_victim_with_a_backup_sleeps_into_it_without_new_host_bytes():
    # host RAM is nearly full, but a's weights go into the backup it already holds
    replicas = [running("a", 60, last_use=1, asleep=40, host_bytes=40 * G)]
    plan = place(need(50), replicas, GPU)
    assert plan.sleep == ("a",) and not plan.hibernate


def test_a_backup_larger_than_the_host_budget_is_an_error_naming_it():
    plan = place(need(20, host_bytes=60 * G), [], GPU)
    assert "host_memory" in plan.error and "backup_weights" in plan.error


def test_host_bytes_a_releasing_replica_hands_back_are_room_to_come():
    # a (hibernating) holds 40 GiB of the 50 GiB host budget: the new model's 16 GiB backup
    # waits for them, and b is not chosen as well
    replicas = [running("a", 40, last_use=1, host_bytes=40 * G, busy=True, leaving=True, releasing=True),
                running("b", 20, last_use=2, host_bytes=5 * G)]
    plan = place(need(20, host_bytes=16 * G), replicas, GPU)
    assert not plan.fits and plan.hibernate == () and plan.sleep == ()
    # the same for the host budget's own check: what is on its way out is not an excess
    over = [asleep("x", 30, last_use=1, releasing=True, busy=True), asleep("y", 30, last_use=2)]
    assert host_overflow(over, GPU) == []
