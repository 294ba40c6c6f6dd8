"""Config: durations, errors that name the key, the bind refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from dormant.config import NEVER, ConfigError, load_config, parse_duration


@pytest.mark.timeout(10)
@pytest.mark.parametrize("raw,seconds", [
    ("30s", 30), ("5m", 300), ("1h", 3600), ("250ms", 0.25), (0, 0), ("0", 0), (-1, NEVER), ("-1", NEVER), (12, 12),
])
def test_parse_duration(raw, seconds):
    assert parse_duration(raw) == seconds


@pytest.mark.timeout(10)
@pytest.mark.parametrize("raw", ["soon", "5 minutes", True, None, "1d"])
def test_bad_duration_names_the_key(raw):
    with pytest.raises(ConfigError, match="keep_alive"):
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
    assert cfg.host == "127.0.0.1" and cfg.port == 8000
    assert load_config().models[0].id == "smollm2"


@pytest.mark.timeout(10)
def test_non_loopback_bind_without_key_is_refused(monkeypatch):
    monkeypatch.delenv("DORMANT_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="host"):
        load_config(host="0.0.0.0")
    assert load_config(host="0.0.0.0", allow_insecure_bind=True).host == "0.0.0.0"
    monkeypatch.setenv("DORMANT_API_KEY", "k1,k2")
    assert load_config(host="0.0.0.0").api_keys == ("k1", "k2")


def test_command_line_durations_override_the_file(tmp_path):
    from dormant.config import NEVER, load_config

    path = tmp_path / "dormant.yaml"
    path.write_text("models:\n  smollm2:\n    sleep_after: 10m\n    stop_after: 1h\n")
    spec = load_config(path, model_defaults={"sleep_after": "-1", "stop_after": None}).model("smollm2")
    assert spec.sleep_after == NEVER and spec.stop_after == 3600
    spec = load_config(path, model_defaults={"sleep_after": "30s"}, models=["smollm2"]).model("smollm2")
    assert spec.sleep_after == 30
