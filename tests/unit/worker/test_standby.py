"""Which fork requests may take the zygote's standby worker (worker/standby.py)."""

from __future__ import annotations

import json

import pytest

from dormant.worker.standby import fits, wanted


def request(engine_args: dict | str, env: dict | None = None, engine: str = "native") -> dict:
    args = engine_args if isinstance(engine_args, str) else json.dumps(engine_args)
    return {"argv": ["--source", "builtin:smollm2", "--model-id", "m", "--port", "1", "--engine", engine,
                     "--engine-args", args], "env": env or {"PATH": "/bin"}}


@pytest.mark.timeout(30)
def test_a_gpu_request_with_the_same_cuda_environment_takes_the_standby():
    own = {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0"}
    assert fits(request({"device": "cuda"}, {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}), "auto", own)
    assert fits(request({}, {"CUDA_VISIBLE_DEVICES": "0"}), "auto", own)  # device auto


@pytest.mark.timeout(30)
def test_what_the_standby_was_made_with_must_not_differ():
    own = {"CUDA_VISIBLE_DEVICES": "0"}
    assert not fits(request({}, {"CUDA_VISIBLE_DEVICES": "1"}), "auto", own)  # another GPU
    assert not fits(request({}, {}), "auto", own)  # the variable unset
    assert not fits(request({}, {"CUDA_VISIBLE_DEVICES": "0", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
                    "auto", own)  # torch's allocator has read its settings already
    assert not fits(request({"device": "cpu"}, own), "auto", own)  # a CPU worker needs no context
    assert fits(request({"device": "cpu"}, own), "always", own)  # but "always" takes it (tests)
    assert not fits(request({}, own, engine="other"), "always", own)
    assert not fits(request("{not json", own), "always", own)


@pytest.mark.timeout(30)
def test_the_modes():
    assert wanted("always") and not wanted("off")
    import torch

    if torch.version.cuda is None:  # a CPU build of torch: no standby in auto
        assert not wanted("auto")
