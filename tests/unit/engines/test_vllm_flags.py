"""The vllm engine's engine_args -> vLLM command line, and the command dormant.yaml names."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dormant.config import ConfigError, parse_model_spec
from dormant.engines.base import EngineArgsError, get_engine
from dormant.engines.vllm import API_SERVER, check_args, flags, server_command

pytestmark = pytest.mark.timeout(60)


def test_keys_become_flags_with_their_values():
    args = check_args({"max_model_len": 4096, "enforce_eager": True, "enable_prefix_caching": False,
                       "speculative_config": {"method": "mtp", "num_speculative_tokens": 2},
                       "allowed-local-media-path": "/data", "middleware": ["a.b", "c.d"]})
    assert flags(args) == ["--max-model-len", "4096", "--enforce-eager", "--no-enable-prefix-caching",
                           "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}',
                           "--allowed-local-media-path", "/data", "--middleware", "a.b", "c.d"]


@pytest.mark.parametrize(("args", "key", "words"), [
    ({"--max-model-len": 1}, "--max-model-len", "not a vLLM flag name"),
    ({"Max Model Len": 1}, "Max Model Len", "not a vLLM flag name"),
    ({"host": "0.0.0.0"}, "host", "private Unix socket"),
    ({"api_key": "x"}, "api_key", "per-start secret"),
    ({"served_model_name": "x"}, "served_model_name", "aliases"),
    ({"dtype": None}, "dtype", "leave the key out"),
    ({"enable_sleep_mode": "yes"}, "enable_sleep_mode", "true or false"),
    ({"max_model_len": 1, "max-model-len": 2}, "max-model-len", "given twice"),
])
def test_refused_keys_name_the_key(args, key, words):
    with pytest.raises(EngineArgsError, match=words) as exc:
        check_args(args)
    assert exc.value.key == key


def test_the_command_listens_on_the_socket_with_the_model_and_its_names(tmp_path: Path):
    command = [sys.executable, *API_SERVER]
    argv = server_command(command, tmp_path, ["m", "alias"], tmp_path / "s.sock",
                          check_args({"enable_sleep_mode": False, "gpu_memory_utilization": 0.3}))
    assert argv == [*command, "--model", str(tmp_path), "--uds", str(tmp_path / "s.sock"),
                    "--served-model-name", "m", "--served-model-name", "alias", "--gpu-memory-utilization", "0.3"]
    on = server_command(command, tmp_path, ["m"], tmp_path / "s.sock", check_args({"enable_sleep_mode": True}))
    assert "--enable-sleep-mode" in on and "--no-enable-sleep-mode" not in on


def test_sleep_mode_is_on_for_a_command_of_the_users_own(tmp_path: Path):
    argv = server_command(["/opt/vllm/bin/vllm", "serve"], tmp_path, ["m"], tmp_path / "s.sock", {})
    assert argv[:2] == ["/opt/vllm/bin/vllm", "serve"] and "--enable-sleep-mode" in argv


def test_the_engine_serves_itself_and_loads_nothing_in_process(tmp_path: Path):
    engine = get_engine("vllm")
    assert engine.server_command is server_command and not engine.may_use_gpu({})
    with pytest.raises(ValueError, match="own server"):
        engine.load(tmp_path, {})


def test_vllm_command_and_python_in_dormant_yaml(model_dir: Path):
    source = str(model_dir)
    spec = parse_model_spec("m", {"source": source, "engine": "vllm", "vllm_command": "/v/bin/python -m my.server"})
    assert spec.vllm_command == ("/v/bin/python", "-m", "my.server")
    spec = parse_model_spec("m", {"source": source, "engine": "vllm", "vllm_python": "/v/bin/python"})
    assert spec.vllm_command == ("/v/bin/python", *API_SERVER)
    assert parse_model_spec("m", {"source": source, "engine": "vllm"}).vllm_command == ()
    with pytest.raises(ConfigError, match="not both"):
        parse_model_spec("m", {"source": source, "engine": "vllm", "vllm_python": "p", "vllm_command": ["c"]})
    with pytest.raises(ConfigError, match="expected a command"):
        parse_model_spec("m", {"source": source, "engine": "vllm", "vllm_command": []})
