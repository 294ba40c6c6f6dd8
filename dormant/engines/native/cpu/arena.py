"""One flat byte buffer that every weight is a view of.

Sleep releases the buffer's storage (``resize_(0)``) and wake re-grows the same storage
object, so every parameter view stays valid with no module surgery. Buffers this large are
mmapped by glibc, so freeing them returns the pages to the OS (RSS drops). Its bytes are saved
and restored as an engine image (core/engine_image.py), which is also the level-1 sleep backup.
"""

from __future__ import annotations

import torch

ALIGN = 64


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
