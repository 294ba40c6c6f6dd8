"""The native engine's image: restore the arena from it, or write it after a load (issue 4).

    image = ArenaImage(model_dir, dtype, "cpu", layout, startup)
    source = image.restore_cpu(arena)      # "image", or None: load the safetensors, then
    image.save_cpu(arena)                  # (in the background) write it for next time

A stale, truncated or corrupt image is logged and deleted, and the caller loads the model's
safetensors instead: the request is still answered, and the next save rebuilds the image. An
image that cannot be written (a full disk) is logged and skipped: sleep still succeeds.

GPU (cuda/runner.py): `restore_cuda` reads into pinned staging buffers and copies each
block to the `CudaArena` on a per-reader stream (arena_copier.ArenaCopier: raw driver calls, so
the readers hardly hold the GIL the main thread's graph capture needs) while the next reads
land; `save_cuda`
copies the weights to host memory on a side stream, then writes them.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dormant.store.checksum import WORD, format_sums
from dormant.store.image_reader import DEFAULT_THREADS, read_image
from dormant.store.images import (
    DIRECT_ALIGN, EngineImage, ImageCorrupt, ImageError, ImageMissing, fingerprint, image_dir_for,
)

log = logging.getLogger("dormant.engine")

# GPU restore reads: 16 readers x 2 pinned buffers of 8 MiB = 256 MiB of staging (pinning costs
# ~0.45 s/GiB) and 128 MiB queued at the disk at a time
READ_BYTES = 8 << 20


def staging_bytes(threads: int) -> int:
    """The pinned staging a GPU restore with `threads` readers uses at most."""
    return 2 * threads * READ_BYTES + DIRECT_ALIGN


def layout_of(named: list[tuple[str, torch.Tensor]], offsets: list[int], total_bytes: int) -> dict[str, Any]:
    """Param name -> offset/dtype/shape: what the manifest records and a restore must match."""
    params = {name: {"offset": off, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
              for (name, t), off in zip(named, offsets)}
    return {"params": params, "total_bytes": total_bytes}


def device_facts(device: str) -> dict[str, Any]:
    """Fingerprint entries only torch knows: CUDA runtime, driver, GPU name (GPU only)."""
    if device != "cuda":
        return {}
    facts: dict[str, Any] = {"cuda": torch.version.cuda, "gpu_name": torch.cuda.get_device_name()}
    try:
        from cuda.bindings import driver as cuda

        facts["driver"] = int(cuda.cuDriverGetVersion()[1])
    except Exception:  # noqa: BLE001 - a missing binding only weakens the fingerprint
        facts["driver"] = None
    return facts


def block_sums(data: torch.Tensor, block_bytes: int, rows_at_once: int = 8) -> torch.Tensor:
    """checksum.py's two wsum64 sums of each `block_bytes` block of a uint8 tensor (any
    device; on the GPU the 16 GB of an 8B model take tens of ms), as a [blocks, 2] int64 tensor
    on data's device: the same bits as numpy's uint64. Temporaries: `rows_at_once` blocks."""
    if data.numel() % WORD:  # block_bytes is a multiple of 4096 (images.py checks)
        data = torch.cat([data, data.new_zeros(-data.numel() % WORD)])
    words = data.view(torch.int64)
    per_block = block_bytes // WORD
    weights = torch.arange(1, per_block + 1, dtype=torch.int64, device=data.device)
    sums = []
    for start in range(0, words.numel(), per_block * rows_at_once):
        chunk = words[start:start + per_block * rows_at_once]
        full = chunk.numel() // per_block
        if full:
            rows = chunk[:full * per_block].view(full, per_block)
            sums.append(torch.stack([rows.sum(1), (rows * weights).sum(1)], dim=1))
        tail = chunk[full * per_block:]
        if tail.numel():
            sums.append(torch.stack([tail.sum(), (tail * weights[:tail.numel()]).sum()]).view(1, 2))
    return torch.cat(sums) if sums else torch.zeros((0, 2), dtype=torch.int64, device=data.device)


def block_checksums(data: torch.Tensor, block_bytes: int, rows_at_once: int = 8) -> list[str]:
    """block_sums as checksum.py's strings."""
    return [format_sums(a, b) for a, b in block_sums(data, block_bytes, rows_at_once).tolist()]


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def verify_blocks(data: torch.Tensor, check: dict[str, Any], path: Path) -> None:
    """Raise ImageCorrupt unless every block of `data` has the manifest's checksum: compared on
    data's device, one transfer of a bool back."""
    got = block_sums(data, int(check["block_bytes"]))
    want = check["blocks"]
    if got.shape[0] != len(want):
        raise ImageCorrupt(f"{path}: {got.shape[0]} blocks read, the manifest lists {len(want)}")
    expected = torch.tensor([[_as_int64(int(h[:16], 16)), _as_int64(int(h[16:], 16))] for h in want],
                            dtype=torch.int64).to(got.device, non_blocking=True)
    if torch.equal(got, expected):
        return
    bad = int((got != expected).any(dim=1).nonzero()[0, 0])
    raise ImageCorrupt(f"{path}: checksum mismatch in block {bad} (bytes {bad * int(check['block_bytes'])}..)")


class ArenaImage:
    def __init__(self, model_dir: Path, dtype: str, device: str, layout: dict[str, Any],
                 startup: dict[str, Any] | None = None, threads: int = DEFAULT_THREADS) -> None:
        self.image = EngineImage(image_dir_for(model_dir, dtype, device))
        self.layout = layout
        self.startup = dict(startup or {})
        self.threads = threads
        self.fingerprint = fingerprint(model_dir, dtype=dtype, device=device, extra=device_facts(device))
        self.last_read = None  # ReadStats of the last restore
        self._lock = threading.Lock()

    @property
    def folder(self) -> Path:
        return self.image.folder

    def is_usable(self) -> bool:
        try:
            self.image.check(self.fingerprint, self.layout)
            return True
        except ImageError:
            return False

    # -- CPU ------------------------------------------------------------------------------------

    def restore_cpu(self, arena) -> str | None:
        """Fill the (reserved) CPU arena from the image: "image" on success, None when the
        caller must load the model instead (no image, or a bad one, now deleted)."""
        return self._restore(lambda m: read_image(self.image.data_path, m, arena.buffer.data_ptr(),
                                                  threads=self.threads))

    def save_cpu(self, arena) -> None:
        with self._lock:
            if self.is_usable():
                return
            self._write(arena.buffer.data_ptr(), arena.nbytes)

    # -- GPU --------------------------------------------------------------------------------------

    def restore_cuda(self, arena, nbytes: int | None = None, staging=None) -> str | None:
        """Fill the first `nbytes` (the weights) of a CudaArena: O_DIRECT reads into pinned
        staging buffers, two per reader; each block is copied to the arena on the reader's own
        stream while the reader reads the next block into its other buffer. `staging`: pinned
        host memory to use for them (a PinnedBuffer of staging_bytes(threads)), else allocated
        here."""
        from dormant.engines.native.cuda.arena_copier import ArenaCopier

        local = threading.local()
        copiers: list[ArenaCopier] = []

        def read(manifest):
            if nbytes is not None and manifest.nbytes != nbytes:
                raise ImageMissing(f"image holds {manifest.nbytes} bytes, the weights are {nbytes}")
            block = min(READ_BYTES, int(manifest.checksum["block_bytes"]))
            threads = max(1, min(self.threads, -(-manifest.nbytes // block)))
            # One pinned allocation for all readers' buffers: pinning costs ~0.45 s/GiB (DESIGN
            # §4) and torch's host allocator rounds each request up to a power of two. The
            # caller's, made beside the start's other work, when it is large enough.
            size = 2 * threads * block
            pin_started = time.perf_counter()
            if staging is not None and staging.nbytes >= size + DIRECT_ALIGN:
                keep, origin = staging, staging.address
            else:
                keep = torch.empty(size + DIRECT_ALIGN, dtype=torch.uint8, pin_memory=True)
                origin = keep.data_ptr()
            base = origin + (-origin % DIRECT_ALIGN)
            pin_s = time.perf_counter() - pin_started
            slots = iter(range(2 * threads))  # next() is atomic under the GIL

            def pinned(n: int) -> tuple[object, int]:
                return keep, base + next(slots) * block

            def deliver(offset: int, address: int, n: int):
                copier = getattr(local, "copier", None)
                if copier is None:
                    copier = local.copier = ArenaCopier(arena)
                    copiers.append(copier)
                return copier.copy(offset, address, n)

            try:  # every reader waits for its copies; on a failure, wait for the others' here
                stats = read_image(self.image.data_path, manifest, None, deliver=deliver,
                                   threads=threads, staging=pinned, verify=False, read_bytes=block)
            finally:  # (not a device-wide sync: the main thread may be capturing graphs)
                for copier in copiers:
                    copier.close()
            verify_started = time.perf_counter()
            verify_blocks(arena.tensor(0, (manifest.nbytes,), torch.uint8), manifest.checksum, self.image.data_path)
            log.info("restore: staging pinned in %.3f s (%s), checksums verified on the GPU in %.3f s", pin_s,
                     "ready" if keep is staging else "here", time.perf_counter() - verify_started)
            return stats

        return self._restore(read)

    def save_cuda(self, arena, nbytes: int, copied: threading.Event | None = None) -> None:
        """Write the image of the arena's first `nbytes` (the weights) from its host backup:
        the file's blocks are taken first (a full disk fails at once, before any copy), then,
        awake, the weights are copied into the backup (arena.fill_host_backup: pinned, on a
        side stream, the model running meanwhile) and `copied` is set (from then on the arena
        may sleep: the write reads host memory, and a sleep that reuses the backup copies
        nothing); asleep, the backup holds them already. A backup that does not hold them
        while asleep (a level-2 sleep) writes nothing. `copied` stays clear where no copy was
        made (the image there already, a full disk): the caller decides. Background use."""
        with self._lock:
            if self.is_usable():
                return

            def weights_in_host_memory() -> int:
                if arena.is_sleeping:
                    if arena.backup_holds < nbytes:
                        raise ImageMissing("asleep without the weights in its host backup")
                    return arena.host_backup_address
                address = arena.fill_host_backup(nbytes)
                if copied is not None:
                    copied.set()
                return address

            self._write(weights_in_host_memory, nbytes)

    # -- shared -------------------------------------------------------------------------------------

    def _write(self, address: int | Callable[[], int], nbytes: int) -> None:
        """Write the image; a failure to (a full disk, a read-only store) is logged and skipped.
        The image is an optimisation: without it a sleep still succeeds and a wake or the next
        start loads the model's weights, where a failed sleep turned every idle period into a
        stop and a cold start (issue 15, item 10)."""
        try:
            self.image.write(address, nbytes, layout=self.layout, startup=self.startup, fingerprint=self.fingerprint)
        except (OSError, ImageMissing) as e:
            log.warning("engine image not written to %s (%s); the model's weights will be loaded instead",
                        self.folder, e)
            return
        log.info("engine image written to %s (%.2f GB)", self.folder, nbytes / 1e9)

    def _restore(self, read) -> str | None:
        started = time.perf_counter()
        try:
            manifest = self.image.check(self.fingerprint, self.layout)
            checked = time.perf_counter() - started
            self.last_read = read(manifest)
        except ImageMissing:
            return None
        except (ImageError, OSError) as e:
            log.warning("engine image unusable, rebuilding it from the model: %s", e)
            self.image.delete()
            return None
        s = self.last_read
        log.info("weights restored from %s: %.2f GB in %.3f s (%.2f GB/s, %s, %d readers; manifest checked in "
                 "%.3f s)", self.folder, s.nbytes / 1e9, s.seconds, s.gbps, "O_DIRECT" if s.direct else "buffered",
                 s.threads, checked)
        return "image"
