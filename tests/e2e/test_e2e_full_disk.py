"""Issue 15, item 10: a store whose disk is full never stops a model from sleeping. The engine
image is an optimisation: its write fails, is logged, and the model sleeps and wakes anyway
(its weights come from the safetensors), with no stop and no cold start.

The full disk is the kernel's own: RLIMIT_FSIZE, inherited by the gateway, its zygote and
workers, makes every write past FILE_LIMIT fail with EFBIG (Python ignores SIGXFSZ), the way a
write to a full disk fails with ENOSPC in the middle of the image.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path
from typing import Iterator

import pytest

from e2e_harness import launch_gateway, model_config

FILE_LIMIT = 64 << 20  # room for logs; SmolLM2's image is 0.8 GB
PROMPT = {"model": "smollm2", "prompt": "Count from 1 to 10:", "max_tokens": 4, "temperature": 0}


@contextlib.contextmanager
def _file_size_limit(nbytes: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.timeout(300)
def test_sleep_and_wake_succeed_when_the_image_cannot_be_written(home, model_dir, tmp_path):
    store = tmp_path / "store"  # a store of its own: no image written by another test
    (store / "models").mkdir(parents=True)
    (store / "models" / model_dir.name).symlink_to(model_dir)
    with _file_size_limit(FILE_LIMIT):
        # engine native: the engine image is its own (llama.cpp writes none: a GGUF loads in <1 s)
        gw = launch_gateway(tmp_path / "gw", store, model_config(sleep_after=0, engine="native"))
    try:
        assert gw.http("POST", "/v1/completions", json=PROMPT).status_code == 200
        pid = gw.wait_state("asleep")["pid"]
        r = gw.http("POST", "/v1/completions", json=PROMPT)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"]
        assert gw.wait_state("asleep")["pid"] == pid  # slept again: the same worker, never stopped
        log = gw.log_path.read_text(errors="replace")
        assert "engine image not written" in log and "File too large" in log, log[-4000:]
        assert "sleep failed" not in log and "Traceback" not in log, log[-4000:]
        assert not list((store / "images").glob("*/manifest.json"))
    finally:
        gw.stop()
