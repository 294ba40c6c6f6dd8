"""One flat byte buffer that every weight is a view of.

Sleep releases the buffer's storage (``resize_(0)``) and wake re-grows the same storage
object, so every parameter view stays valid with no module surgery. Buffers this large are
mmapped by glibc, so freeing them returns the pages to the OS (RSS drops).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

ALIGN = 64
_CHUNK = 64 << 20


class Arena:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.buffer = torch.empty(nbytes, dtype=torch.uint8)

    @staticmethod
    def plan(sizes: list[int]) -> tuple[list[int], int]:
        """Aligned offsets for regions of the given byte sizes, and the total."""
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += -(-size // ALIGN) * ALIGN
        return offsets, total

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        return self.buffer[offset : offset + nbytes].view(dtype).view(shape)

    @property
    def is_released(self) -> bool:
        return self.buffer.untyped_storage().nbytes() == 0

    def release(self) -> None:
        self.buffer.untyped_storage().resize_(0)

    def reserve(self) -> None:
        if self.is_released:
            self.buffer.untyped_storage().resize_(self.nbytes)

    def _memoryview(self) -> memoryview:
        # Not buffer.numpy(): that marks the storage non-resizable, and sleep resizes it.
        # The memoryview must not outlive a release (the address changes on reserve).
        return memoryview((ctypes.c_char * self.nbytes).from_address(self.buffer.data_ptr())).cast("B")

    def save(self, path: Path) -> None:
        """Write the bytes to ``path`` atomically (temp file, then rename)."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        data = self._memoryview()
        with open(tmp, "wb", buffering=0) as f:
            for start in range(0, self.nbytes, _CHUNK):
                f.write(data[start : start + _CHUNK])
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        """Read the bytes back from ``path`` into the (re-grown) same storage."""
        self.reserve()
        if path.stat().st_size != self.nbytes:
            raise RuntimeError(f"weight image {path} has {path.stat().st_size} bytes, expected {self.nbytes}")
        data = self._memoryview()
        with open(path, "rb", buffering=0) as f:
            pos = 0
            while pos < self.nbytes:
                n = f.readinto(data[pos : pos + _CHUNK])
                if not n:
                    raise RuntimeError(f"weight image {path} ended early at byte {pos}")
                pos += n
