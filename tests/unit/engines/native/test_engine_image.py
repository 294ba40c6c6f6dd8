"""The native engine's image with the real SmolLM2: restore gives identical greedy output; a
corrupt, truncated or stale image is caught, rebuilt from the model, and generation still works."""

from __future__ import annotations

import gc
import json
import os

import pytest

from dormant.engines.base import SamplingParams
from dormant.engines.native.core.config import EngineConfig
from dormant.engines.native.core.llm_engine import LLMEngine

PROMPT = [1, 504, 3458, 282, 4649, 314]  # "The capital of France is" in SmolLM2's vocabulary
GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture
def images_home(model_dir, tmp_path, monkeypatch):
    """A private DORMANT_HOME for images (the model itself stays in the session store)."""
    monkeypatch.setenv("DORMANT_HOME", str(tmp_path))
    return tmp_path


def start(model_dir) -> tuple[str, list[int], object]:
    engine = LLMEngine(EngineConfig(str(model_dir), dtype="float32"))
    runner = engine.model_runner
    [out] = engine.generate([PROMPT], GREEDY)
    runner.save_image()  # joins the background write
    source, image = runner.weights_source, runner.image.image
    del engine, runner
    gc.collect()
    return source, out, image


@pytest.mark.timeout(300)
def test_restore_gives_identical_output_and_bad_images_are_rebuilt(model_dir, images_home):
    source, expected, image = start(model_dir)
    assert source == "safetensors" and image.exists()
    source, out, _ = start(model_dir)
    assert (source, out) == ("image", expected)

    with open(image.data_path, "r+b") as f:  # one flipped byte
        f.seek(1_000_003)
        byte = f.read(1)
        f.seek(1_000_003)
        f.write(bytes([byte[0] ^ 1]))
    source, out, _ = start(model_dir)
    assert (source, out) == ("safetensors", expected)
    assert start(model_dir)[0] == "image"  # rebuilt by the previous start

    os.truncate(image.data_path, image.data_path.stat().st_size // 2)
    source, out, _ = start(model_dir)
    assert (source, out) == ("safetensors", expected)

    manifest = json.loads(image.manifest_path.read_text())  # made by another torch
    manifest["fingerprint"]["versions"]["torch"] = "0.0.1"
    image.manifest_path.write_text(json.dumps(manifest))
    source, out, _ = start(model_dir)
    assert (source, out) == ("safetensors", expected)
    assert json.loads(image.manifest_path.read_text())["fingerprint"]["versions"]["torch"] != "0.0.1"
