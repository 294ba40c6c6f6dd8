"""The engine image's device facts: the CUDA image's own folder and fingerprint, stale on another GPU (faked)."""

from __future__ import annotations


import pytest
import torch

from dormant.engines.native.core import engine_image
from dormant.engines.native.core.engine_image import ArenaImage, layout_of
from dormant.store.images import ImageStale, image_dir_for

GPU_FACTS = {"cuda": "12.8", "gpu_name": "NVIDIA H100 80GB HBM3", "driver": 12080}


@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DORMANT_HOME", str(tmp_path / "home"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen3"}')
    (folder / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    return folder


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(engine_image, "device_facts", lambda device: dict(GPU_FACTS) if device == "cuda" else {})


def test_layout_of_bf16_params_on_the_meta_device():
    with torch.device("meta"):
        named = [("embed", torch.empty(10, 4, dtype=torch.bfloat16)), ("norm", torch.empty(4, dtype=torch.bfloat16))]
    layout = layout_of(named, [0, 256], 264)
    assert layout == {"params": {"embed": {"offset": 0, "dtype": "bfloat16", "shape": [10, 4]},
                                 "norm": {"offset": 256, "dtype": "bfloat16", "shape": [4]}},
                      "total_bytes": 264}


def test_cuda_image_has_its_own_folder_and_gpu_facts_in_its_fingerprint(tiny_model, fake_gpu):
    layout = {"params": {}, "total_bytes": 4096}
    gpu = ArenaImage(tiny_model, "bfloat16", "cuda", layout, {"num_kv_blocks": 7})
    cpu = ArenaImage(tiny_model, "bfloat16", "cpu", layout)
    assert gpu.folder == image_dir_for(tiny_model, "bfloat16", "cuda") != cpu.folder
    assert {k: gpu.fingerprint[k] for k in GPU_FACTS} == GPU_FACTS
    assert gpu.fingerprint["device"] == "cuda" and "gpu_name" not in cpu.fingerprint


def test_image_from_another_gpu_or_driver_is_stale(tiny_model, fake_gpu):
    layout = {"params": {}, "total_bytes": 4096}
    image = ArenaImage(tiny_model, "bfloat16", "cuda", layout, {"num_kv_blocks": 7})
    data = torch.arange(4096, dtype=torch.int32).to(torch.uint8)
    image.image.write(data.data_ptr(), 4096, layout=layout, startup=image.startup, fingerprint=image.fingerprint)
    assert image.is_usable() and image.image.read_manifest().startup == {"num_kv_blocks": 7}
    for key, other in (("gpu_name", "NVIDIA A100-SXM4-80GB"), ("driver", 12040)):
        moved = ArenaImage(tiny_model, "bfloat16", "cuda", layout)
        moved.fingerprint[key] = other
        with pytest.raises(ImageStale, match=key):
            moved.image.check(moved.fingerprint, layout)


def test_device_facts_name_the_gpu_only_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    facts = engine_image.device_facts("cuda")
    assert facts["gpu_name"] == "NVIDIA H100 80GB HBM3" and "cuda" in facts and "driver" in facts
    assert engine_image.device_facts("cpu") == {}
