"""`engine: auto` at config load: llama.cpp for a GGUF source (a file, a folder, the embedded
SmolLM2) without a GPU, where the binding is installed; the native engine for Hugging Face
folders, on a GPU, and for a config only the native engine takes."""

from __future__ import annotations

import dataclasses

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


@pytest.fixture
def cpu_machine(monkeypatch):
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(config, "_has_nvidia_gpu", lambda: False)


def test_auto_picks_llamacpp_for_gguf_sources_on_a_cpu_machine(gguf_folder, cpu_machine):
    assert parse_model_spec("m", {"source": str(gguf_folder / "model.gguf")}).engine == "llamacpp"
    assert parse_model_spec("m", {"source": str(gguf_folder), "engine": "auto"}).engine == "llamacpp"
    assert parse_model_spec("m", {"source": str(gguf_folder), "engine": "native"}).engine == "native"


def test_the_embedded_default_is_served_by_llamacpp_from_its_gguf(cpu_machine):
    assert parse_model_spec("smollm2", {}).engine == "llamacpp"
    assert parse_model_spec("tiny", {"source": "builtin:smollm2"}).engine == "llamacpp"
    assert parse_model_spec("smollm2", {"engine": "native"}).engine == "native"


def test_auto_picks_native_with_a_gpu_or_a_hugging_face_folder(gguf_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(config, "_has_nvidia_gpu", lambda: True)
    assert parse_model_spec("m", {"source": str(gguf_folder)}).engine == "native"
    assert parse_model_spec("smollm2", {}).engine == "native"
    monkeypatch.setattr(config, "_has_nvidia_gpu", lambda: False)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert parse_model_spec("m", {"source": str(hf)}).engine == "native"


def test_auto_picks_native_without_the_binding(gguf_folder, monkeypatch):
    monkeypatch.setattr(config, "_has_nvidia_gpu", lambda: False)
    import dormant.engines.llamacpp as llamacpp

    monkeypatch.setattr(llamacpp, "ENGINE", dataclasses.replace(llamacpp.ENGINE, is_available=lambda: False))
    assert parse_model_spec("smollm2", {}).engine == "native"
    assert parse_model_spec("m", {"source": str(gguf_folder)}).engine == "native"


@pytest.mark.parametrize("raw", [
    {"kv_cache_memory": "64MiB"},
    {"kv_cache_memory": "4096 tokens"},
    {"device": "cpu"},
    {"engine_args": {"num_kv_blocks": 64}},
    {"engine_args": {"dtype": "float32"}},
])
def test_auto_keeps_native_where_the_config_is_only_the_native_engines(cpu_machine, raw):
    """Where llama.cpp would refuse the config, auto does not pick it (and native takes it)."""
    assert parse_model_spec("smollm2", raw).engine == "native"


def test_auto_picks_llamacpp_with_engine_args_it_takes(cpu_machine):
    spec = parse_model_spec("smollm2", {"engine_args": {"max_num_seqs": 4, "num_threads": 2}})
    assert spec.engine == "llamacpp" and spec.engine_args["max_num_seqs"] == 4


def test_an_engine_args_key_neither_engine_has_is_refused_naming_it(cpu_machine):
    with pytest.raises(config.ConfigError, match="engine_args.max_num_seq"):
        parse_model_spec("smollm2", {"engine_args": {"max_num_seq": 4}})
