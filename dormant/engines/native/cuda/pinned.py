"""Pinned host memory for a restore's staging buffers.

    buf = PinnedBuffer(nbytes)      # a HostRegion touched and registered: page-aligned, the calling thread's context
    buf.address, buf.nbytes
    buf.close()                     # unregister and unmap; idempotent

Registered in place (host_region.py): ~0.01 s for a restore's 256 MiB of staging, where
cuMemHostAlloc took ~0.1 s. cuda-bindings releases the GIL, so the worker allocates this beside
its other start-up work, in the thread that creates the CUDA context (cuda/start.py:
start_cuda_context), before the image reads need it.
"""

from __future__ import annotations

from dormant.engines.native.cuda.driver import check_cuda
from dormant.engines.native.cuda.host_region import HostRegion


class PinnedBuffer:
    def __init__(self, nbytes: int) -> None:
        from cuda.bindings import driver as cuda

        if nbytes <= 0:
            raise ValueError("nbytes must be positive")
        self.nbytes = nbytes
        self._region = HostRegion(nbytes)
        try:
            self._region.touch(0, nbytes)
            check_cuda(cuda.cuMemHostRegister(*self._region.span(0, nbytes), 0))
        except BaseException:
            self._region.close()
            raise
        self.address = self._region.address

    def close(self) -> None:
        if self.address:
            from cuda.bindings import driver as cuda

            self.address = 0
            check_cuda(cuda.cuMemHostUnregister(self._region.address))
            self._region.close()

    def __enter__(self) -> "PinnedBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
