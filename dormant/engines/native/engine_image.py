"""The native engine's image: restore the arena from it, or write it after a load (issue 4).

    image = ArenaImage(model_dir, dtype, "cpu", layout, startup)
    source = image.restore_cpu(arena)      # "image", or None: load the safetensors, then
    image.save_cpu(arena)                  # (in the background) write it for next time

A stale, truncated or corrupt image is logged and deleted, and the caller loads the model's
safetensors instead: the request is still answered, and the next save rebuilds the image.

GPU: `restore_cuda` reads into pinned staging buffers and copies each block to the
`CudaArena` on a per-reader side stream while the next reads land; `save_cuda` stages the
arena through pinned host memory. Written against CudaArena's API (`tensor`, `nbytes`); it
runs only on the GPU machine.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch

from dormant.store.image_reader import DEFAULT_THREADS, read_image
from dormant.store.images import (
    DIRECT_ALIGN, EngineImage, ImageError, ImageMissing, fingerprint, image_dir_for, padded,
)

log = logging.getLogger("dormant.engine")


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
            self.image.write(arena.buffer.data_ptr(), arena.nbytes, layout=self.layout,
                             startup=self.startup, fingerprint=self.fingerprint)
            log.info("engine image written to %s (%.2f GB)", self.folder, arena.nbytes / 1e9)

    # -- GPU --------------------------------------------------------------------------------------

    def restore_cuda(self, arena, nbytes: int | None = None) -> str | None:
        """Fill the first `nbytes` (the weights) of a CudaArena: O_DIRECT reads into pinned
        staging buffers, each copied to the arena on the reader's own stream while its other
        buffer is being read into."""
        local = threading.local()
        keep: list[torch.Tensor] = []

        def pinned(n: int) -> tuple[torch.Tensor, int]:
            t = torch.empty(n + DIRECT_ALIGN, dtype=torch.uint8, pin_memory=True)
            keep.append(t)
            return t, t.data_ptr() + (-t.data_ptr() % DIRECT_ALIGN)

        def deliver(offset: int, address: int, n: int):
            if not hasattr(local, "stream"):
                local.stream = torch.cuda.Stream(arena.device)
                local.staging = {}
            src = local.staging.get(address)
            if src is None:
                base = next(t for t in keep if t.data_ptr() <= address < t.data_ptr() + t.numel())
                src = local.staging[address] = base[address - base.data_ptr():]
            with torch.cuda.stream(local.stream):
                arena.tensor(offset, (n,), torch.uint8).copy_(src[:n], non_blocking=True)
                event = torch.cuda.Event()
                event.record(local.stream)
            return event.synchronize

        def read(manifest):
            if nbytes is not None and manifest.nbytes != nbytes:
                raise ImageMissing(f"image holds {manifest.nbytes} bytes, the weights are {nbytes}")
            stats = read_image(self.image.data_path, manifest, None, deliver=deliver,
                               threads=self.threads, staging=pinned)
            torch.cuda.synchronize(arena.device)
            return stats

        return self._restore(read)

    def save_cuda(self, arena, nbytes: int) -> None:
        """Copy the arena's first `nbytes` to host memory, then write them (background use)."""
        with self._lock:
            if self.is_usable():
                return
            host = torch.empty(padded(nbytes), dtype=torch.uint8)
            host[:nbytes].copy_(arena.tensor(0, (nbytes,), torch.uint8))
            self.image.write(host.data_ptr(), nbytes, layout=self.layout, startup=self.startup,
                             fingerprint=self.fingerprint)

    # -- shared -------------------------------------------------------------------------------------

    def _restore(self, read) -> str | None:
        try:
            manifest = self.image.check(self.fingerprint, self.layout)
            self.last_read = read(manifest)
        except ImageMissing:
            return None
        except (ImageError, OSError) as e:
            log.warning("engine image unusable, rebuilding it from the model: %s", e)
            self.image.delete()
            return None
        s = self.last_read
        log.info("weights restored from %s: %.2f GB in %.3f s (%.2f GB/s, %s, %d readers)", self.folder,
                 s.nbytes / 1e9, s.seconds, s.gbps, "O_DIRECT" if s.direct else "buffered", s.threads)
        return "image"
