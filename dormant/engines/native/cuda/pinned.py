"""Pinned host memory straight from the driver, for a restore's staging buffers.

    buf = PinnedBuffer(nbytes)      # cuMemHostAlloc: page-aligned, the calling thread's context
    buf.address, buf.nbytes
    buf.close()                     # cuMemFreeHost; idempotent

Pinning costs ~0.45 s/GiB (DESIGN.md §4): 0.11 s for a restore's 256 MiB of staging. torch's
pinned allocator holds the GIL through it; cuda-bindings releases it, so the worker allocates
this beside its other start-up work, in the thread that creates the CUDA context
(cuda/start.py: start_cuda_context), before the image reads need it.
"""

from __future__ import annotations

from dormant.engines.native.cuda.driver import check_cuda


class PinnedBuffer:
    def __init__(self, nbytes: int) -> None:
        from cuda.bindings import driver as cuda

        if nbytes <= 0:
            raise ValueError("nbytes must be positive")
        self.nbytes = nbytes
        self.address = int(check_cuda(cuda.cuMemHostAlloc(nbytes, 0)))

    def close(self) -> None:
        if self.address:
            from cuda.bindings import driver as cuda

            address, self.address = self.address, 0
            check_cuda(cuda.cuMemFreeHost(address))

    def __enter__(self) -> "PinnedBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
