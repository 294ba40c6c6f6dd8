"""`engine: auto` at config load: llama.cpp for a GGUF file or folder without a GPU, where the
binding is installed; the native engine for Hugging Face folders and the embedded default."""

from __future__ import annotations

import pytest

from dormant import config
from dormant.config import parse_model_spec

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def gguf_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF")
    return folder


def test_auto_picks_llamacpp_for_gguf_sources_on_a_cpu_machine(gguf_folder, monkeypatch):
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(config, "_has_nvidia_gpu", lambda: False)
    assert parse_model_spec("m", {"source": str(gguf_folder / "model.gguf")}).engine == "llamacpp"
    assert parse_model_spec("m", {"source": str(gguf_folder), "engine": "auto"}).engine == "llamacpp"
    assert parse_model_spec("m", {"source": str(gguf_folder), "engine": "native"}).engine == "native"
    assert parse_model_spec("smollm2", {}).engine == "native"  # the builtin: see config.auto_engine


def test_auto_picks_native_with_a_gpu_or_a_hugging_face_folder(gguf_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(config, "_has_nvidia_gpu", lambda: True)
    assert parse_model_spec("m", {"source": str(gguf_folder)}).engine == "native"
    monkeypatch.setattr(config, "_has_nvidia_gpu", lambda: False)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert parse_model_spec("m", {"source": str(hf)}).engine == "native"
