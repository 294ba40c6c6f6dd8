"""cuda.bindings' calling convention, unwrapped once for every module that calls the driver.

cuda.bindings raises at import on a machine without an NVIDIA driver, so it is imported inside
the call: importing this module stays CPU-safe.
"""

from __future__ import annotations

from typing import Any


def check_cuda(result: Any) -> Any:
    """Unwrap a cuda.bindings `(CUresult, *values)` tuple; raise RuntimeError on failure."""
    from cuda.bindings import driver as cuda

    err, *values = result
    if err != cuda.CUresult.CUDA_SUCCESS:
        _, name = cuda.cuGetErrorName(err)
        raise RuntimeError(f"CUDA driver call failed: {name.decode() if name else int(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)
