"""The CUDA arena on a GPU: views, copies, sleep/wake at the same addresses, graphs across sleep."""

from __future__ import annotations

import ctypes
import time

import pytest
import torch

from dormant.engines.native.cuda.arena_plan import MiB

GiB = 1 << 30


@pytest.fixture
def arena():
    from dormant.engines.native.cuda.arena import CudaArena

    a = CudaArena(GiB + 3 * MiB, chunk_bytes=256 * MiB)  # 5 chunks, the last one small
    a.allocate_host_backup(background=True)
    yield a
    a.close()


def _fill_random(t: torch.Tensor) -> None:
    t.view(torch.uint8).random_(0, 256)


def test_views_share_the_arena(arena):
    base = arena.tensor(0, (arena.nbytes,), torch.uint8)
    assert base.data_ptr() == arena.ptr
    w = arena.tensor(4096, (1024, 1024), torch.bfloat16)
    assert w.data_ptr() == arena.ptr + 4096
    w.fill_(1.5)
    assert torch.all(base[4096:4096 + 2 * 1024 * 1024].view(torch.bfloat16) == 1.5)
    with pytest.raises(ValueError):
        arena.tensor(arena.nbytes - 2, (2,), torch.bfloat16)
    with pytest.raises(ValueError):
        arena.tensor(1, (2,), torch.bfloat16)


def test_copier_threads_fill_the_arena_from_reused_pinned_buffers(arena):
    """The restore's copy path: several threads, each its own copier and two staging buffers
    reused alternately, every copy waited for before its buffer is refilled."""
    import threading

    from dormant.engines.native.cuda.arena_copier import ArenaCopier

    piece = 4 * MiB
    want = torch.randint(0, 256, (64 * piece,), dtype=torch.uint8)
    threads = 4

    def copy_share(first: int) -> None:
        copier = ArenaCopier(arena)
        buffers = [torch.empty(piece, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        waits = [None, None]
        for k, i in enumerate(range(first, 64, threads)):
            slot = k % 2
            if waits[slot] is not None:
                waits[slot]()
            buffers[slot].copy_(want[i * piece:(i + 1) * piece])
            waits[slot] = copier.copy(i * piece, buffers[slot].data_ptr(), piece)
        copier.close()  # waits for the last copies

    workers = [threading.Thread(target=copy_share, args=(t,)) for t in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert torch.equal(arena.tensor(0, (want.numel(),), torch.uint8).cpu(), want)
    copier = ArenaCopier(arena)
    with pytest.raises(ValueError, match="outside"):
        copier.copy(arena.nbytes - 8, want.data_ptr(), 16)
    copier.close()


def test_sleep_wake_round_trips_bit_exactly_at_the_same_addresses(arena):
    base = arena.tensor(0, (arena.nbytes,), torch.uint8)
    _fill_random(base)
    ref = base.clone()
    ptr = base.data_ptr()
    for pipelined in (False, True, False):
        arena.sleep()
        assert arena.is_sleeping and arena.mapped_bytes == 0
        events = arena.wake(pipelined=pipelined)
        assert len(events) == len(arena.chunks)
        if pipelined:
            for ev, (off, size) in zip(events, arena.chunks):
                torch.cuda.current_stream().wait_event(ev)
                assert torch.equal(base[off:off + size], ref[off:off + size])
        assert not arena.is_sleeping and arena.mapped_bytes == arena.nbytes
        assert base.data_ptr() == ptr
        assert torch.equal(base, ref)


def test_keep_bytes_restores_only_the_prefix(arena):
    keep = 300 * MiB  # mid-chunk
    base = arena.tensor(0, (arena.nbytes,), torch.uint8)
    _fill_random(base)
    ref = base[:keep].clone()
    arena.sleep(keep_bytes=keep)
    arena.wake()
    assert torch.equal(base[:keep], ref)


def test_a_filled_backup_is_reused_by_sleep_and_copied_nothing_more(arena):
    """fill_host_backup copies the kept prefix awake; a sleep that may reuse the backup copies
    nothing (a byte changed on the device after the fill is not carried over: the caller
    promises the prefix is read-only), and the wake brings the filled bytes back."""
    keep = 300 * MiB
    base = arena.tensor(0, (arena.nbytes,), torch.uint8)
    _fill_random(base)
    ref = base[:keep].clone()
    address = arena.fill_host_backup(keep)
    assert address == arena.host_backup_address and arena.backup_holds == keep
    host = torch.frombuffer((ctypes.c_char * keep).from_address(address), dtype=torch.uint8)
    assert torch.equal(host, ref.cpu())
    base[0] ^= 0xFF  # not carried over: the backup is reused as it is
    torch.cuda.synchronize()
    started = time.perf_counter()
    arena.sleep(keep_bytes=keep, reuse_backup=True)
    reused_s = time.perf_counter() - started
    arena.wake()
    assert torch.equal(base[:keep], ref)
    base[0] ^= 0xFF
    started = time.perf_counter()
    arena.sleep(keep_bytes=keep)  # not reused: copied again
    assert torch.equal(host[:1], (ref[:1] ^ 0xFF).cpu())
    print(f"sleep reusing the backup {reused_s * 1e3:.1f} ms, copying {keep >> 20} MiB "
          f"{(time.perf_counter() - started) * 1e3:.1f} ms")
    arena.wake()
    with pytest.raises(ValueError):
        arena.fill_host_backup(arena.nbytes + 1)


def test_sleeping_frees_the_gpu_memory(arena):
    torch.cuda.synchronize()
    free_awake, _ = torch.cuda.mem_get_info()
    arena.sleep(keep_bytes=0)
    free_asleep, _ = torch.cuda.mem_get_info()
    assert free_asleep - free_awake >= 0.95 * arena.nbytes
    arena.wake()
    free_again, _ = torch.cuda.mem_get_info()
    assert abs(free_again - free_awake) <= 64 * MiB


def test_cuda_graph_captured_before_sleep_replays_after_wake(arena):
    n = 1024
    a = arena.tensor(0, (n, n), torch.bfloat16)
    b = arena.tensor(n * n * 2, (n, n), torch.bfloat16)
    weights_end = 2 * n * n * 2
    c = arena.tensor(512 * MiB, (n, n), torch.bfloat16)  # past weights_end: not kept
    a.copy_(torch.randn(n, n, device="cuda"))
    b.copy_(torch.randn(n, n, device="cuda"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up cuBLAS outside the capture
        torch.matmul(a, b, out=c)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.matmul(a, b, out=c)
    graph.replay()
    expected = c.clone()
    ref = (a.double() @ b.double())
    for _ in range(3):
        arena.sleep(keep_bytes=weights_end)
        arena.wake()
    c.fill_(float("nan"))  # the replay must write every element
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.isnan(c).any()
    assert torch.equal(c, expected)
    rel = (c.double() - ref).norm() / ref.norm()
    assert rel < 1e-2


def test_backup_pinned_in_pieces_partly_then_finished_by_sleep():
    """A backup planned in pieces smaller than (and not aligned to) the chunks, half pinned
    step by step, the rest pinned by sleep itself; keep_bytes mid-piece."""
    from dormant.engines.native.cuda.arena import CudaArena

    with CudaArena(GiB, chunk_bytes=256 * MiB) as a:
        keep = 700 * MiB + 4096
        a.reserve_host_backup(keep, piece_bytes=96 * MiB)
        assert a.host_backup_pending and a.host_backup_bytes == keep
        for _ in range(4):
            assert a.pin_host_backup_step()
        assert a.host_backup_pending
        base = a.tensor(0, (a.nbytes,), torch.uint8)
        _fill_random(base)
        ref = base[:keep].clone()
        for pipelined in (False, True):
            a.sleep(keep_bytes=keep)
            assert not a.host_backup_pending
            events = a.wake(pipelined=pipelined)
            for ev in events:
                torch.cuda.current_stream().wait_event(ev)
            assert torch.equal(base[:keep], ref)
        with pytest.raises(ValueError):
            a.sleep(keep_bytes=keep + 1)  # more than the backup holds


def test_background_pinning_in_pieces_leaves_the_main_thread_free():
    """allocate_host_backup(background=True) pins piece by piece in a thread; meanwhile this
    thread's CUDA work goes on (the old single 15 GiB call stalled a worker for 7.3 s)."""
    import time

    from dormant.engines.native.cuda.arena import CudaArena

    with CudaArena(2 * GiB) as a:
        x = torch.randn(256, 256, device="cuda")
        (x @ x).sum().item()  # cuBLAS's handle first: ~0.6 s once, not the pinning's doing
        t = time.perf_counter()
        future = a.allocate_host_backup(background=True, piece_bytes=64 * MiB)
        gaps, last = [], time.perf_counter()
        while not future.done():
            (x @ x).sum().item()  # a launch and a sync, as a serving step does
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        future.result()
        pin_s = time.perf_counter() - t
        print(f"pinned 2 GiB in {pin_s:.2f} s; main-thread steps {len(gaps)}, longest gap {max(gaps or [0]) * 1e3:.1f} ms")
        assert not a.host_backup_pending
        assert len(gaps) >= 3 and max(gaps) < max(0.25, pin_s / 3)


def test_a_wake_waits_for_memory_another_owner_is_releasing():
    """The device has no room for the arena's chunks: a wake that may not wait fails and stays
    asleep, whole; one that may wait maps each chunk once the memory is freed (as another
    replica's sleep frees its chunks), and the bytes come back."""
    import threading

    from dormant.engines.native.cuda.arena import CudaArena

    with CudaArena(GiB, chunk_bytes=256 * MiB) as a:
        a.allocate_host_backup()
        base = a.tensor(0, (a.nbytes,), torch.uint8)
        _fill_random(base)
        ref = base.cpu()
        a.sleep()
        torch.cuda.synchronize()
        free, _ = torch.cuda.mem_get_info()
        hog = torch.empty(free - 600 * MiB, dtype=torch.uint8, device="cuda")  # room for 2 chunks of 4
        with pytest.raises(RuntimeError, match="OUT_OF_MEMORY"):
            a.wake()
        assert a.is_sleeping and a.mapped_bytes == 0
        woke: list = []
        waker = threading.Thread(target=lambda: woke.append(a.wake(wait_for_memory_s=60)))
        waker.start()
        deadline = time.monotonic() + 30
        while a.mapped_bytes < 2 * 256 * MiB and time.monotonic() < deadline:  # mapped what fits, waits
            time.sleep(0.001)
        assert waker.is_alive() and a.mapped_bytes == 2 * 256 * MiB
        del hog
        torch.cuda.empty_cache()
        waker.join(timeout=30)
        assert not waker.is_alive() and woke and not a.is_sleeping
        assert torch.equal(base.cpu(), ref)


def test_close_releases_everything():
    from dormant.engines.native.cuda.arena import CudaArena

    torch.cuda.synchronize()
    free0, _ = torch.cuda.mem_get_info()
    with CudaArena(512 * MiB) as a:
        a.allocate_host_backup()
        a.sleep()
        a.wake()
    free1, _ = torch.cuda.mem_get_info()
    assert abs(free1 - free0) <= 64 * MiB
    with pytest.raises(RuntimeError):
        a.sleep()
