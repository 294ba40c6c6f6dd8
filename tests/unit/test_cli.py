"""The `dormant` command line: config errors, pull (offline), list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dormant.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


@pytest.mark.timeout(60)
def test_bad_config_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "dormant.yaml"
    cfg.write_text("models:\n  smollm2:\n    sleep_after: soon\n")
    result = run_cli("serve", "--config", str(cfg))
    assert result.returncode == 2
    assert "models.smollm2.sleep_after" in result.stderr


@pytest.mark.timeout(60)
def test_unknown_model_key_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "dormant.yaml"
    cfg.write_text("models:\n  smollm2:\n    max_concurent_requests: 4\n")
    result = run_cli("serve", "--config", str(cfg))
    assert result.returncode == 2
    assert "max_concurent_requests" in result.stderr


@pytest.mark.timeout(60)
def test_public_bind_without_key_is_refused() -> None:
    result = run_cli("serve", "--host", "0.0.0.0", env={"DORMANT_API_KEY": ""})
    assert result.returncode == 2
    assert "API key" in result.stderr and "--allow-insecure-bind" in result.stderr


def _fake_hf_cache(hf_home: Path, repo_id: str) -> Path:
    """A Hugging Face cache holding one snapshot of `repo_id`, laid out as the hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


@pytest.mark.timeout(60)
def test_pull_offline_uses_the_hf_cache(tmp_path: Path) -> None:
    snapshot = _fake_hf_cache(tmp_path / "hf", "acme/tiny-model")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "DORMANT_HOME": str(tmp_path / "store")}
    result = run_cli("pull", "acme/tiny-model", env=env)
    assert result.returncode == 0, result.stderr
    assert str(snapshot) in result.stdout


@pytest.mark.timeout(60)
def test_pull_offline_missing_repo_fails_clearly(tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "DORMANT_HOME": str(tmp_path / "store")}
    result = run_cli("pull", "acme/absent-model", env=env)
    assert result.returncode == 1
    assert "acme/absent-model" in result.stderr


@pytest.mark.timeout(60)
def test_pull_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    result = run_cli("pull", str(folder), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "ready" in result.stdout


@pytest.mark.timeout(60)
def test_list_shows_configured_and_cached_models(tmp_path: Path) -> None:
    _fake_hf_cache(tmp_path / "hf", "acme/tiny-model")
    cfg = tmp_path / "dormant.yaml"
    cfg.write_text("models:\n  smollm2:\n    aliases: [small]\n")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "DORMANT_HOME": str(tmp_path / "store")}
    result = run_cli("list", "--config", str(cfg), env=env)
    assert result.returncode == 0, result.stderr
    assert "smollm2  builtin:smollm2" in result.stdout and "small" in result.stdout
    assert "acme/tiny-model" in result.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("entry", [("dormant.cli", "serve"), ("dormant.gateway",)])
@pytest.mark.parametrize("model,key", [
    ({"engine_args": {"max_num_seq": 4}}, "models.qwen.engine_args.max_num_seq"),
    ({"engine_args": {"dtype": "flaot16"}}, "models.qwen.engine_args.dtype"),
    ({"engine": "vlm"}, "models.qwen.engine"),
    ({"source": "TMP/missing.gguf"}, "models.qwen.source"),
])
def test_serve_exits_at_start_on_a_bad_model(tmp_path: Path, entry: tuple[str, ...], model: dict, key: str) -> None:
    """A real `dormant serve` (and `python -m dormant.gateway`, the same command): the config is
    refused before anything starts, naming the key; port 0 so a regression cannot take 8000."""
    spec = {"source": "acme/qwen", **model}
    spec["source"] = spec["source"].replace("TMP", str(tmp_path))
    cfg = tmp_path / "dormant.yaml"
    cfg.write_text(yaml.safe_dump({"models": {"qwen": spec}}))
    result = subprocess.run([sys.executable, "-m", *entry, "--config", str(cfg), "--port", "0"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DORMANT_HOME": str(tmp_path / "store"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert message.startswith(f"dormant: config error: {key}:") and "\n" not in message, message
    assert not (tmp_path / "store").exists()  # nothing started, nothing written
