"""The zygote imports the engine's modules once and forks every worker from itself: nothing it
imports may initialize the CUDA driver, or every forked worker's cuInit fails
(CUDA_ERROR_NOT_INITIALIZED). llguidance.torch does (its pinned-memory probe at import), which
took every zygote-forked GPU worker down in the swap benchmark; it is imported where a mask is
first made instead."""

import subprocess
import sys

from dormant.engines.native import ENGINE

# modules seen to initialize the driver at import (checked on an H200: fork, then cuInit in the child)
DRIVER_AT_IMPORT = ("llguidance.torch",)


def test_the_zygotes_imports_leave_the_driver_alone():
    # the samplers and guided.py by name: without triton (a CPU machine) the GPU runner's
    # modules stop importing before they reach them, as the zygote skips what fails to import
    modules = [*ENGINE.import_modules, *ENGINE.preload_modules, "dormant.engines.native.cuda.sampler",
               "dormant.engines.native.core.guided"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    try: importlib.import_module(m)\n"
            "    except ImportError: pass\n"
            f"print([m for m in {DRIVER_AT_IMPORT!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"the zygote would import {out.stdout.strip()}"
