"""The worker contract (dormant/worker_api.py): the launch spec's argv round trip and /stats."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dormant.worker_api import LaunchSpec, WorkerStats


def test_a_launch_spec_survives_its_argv():
    spec = LaunchSpec(source="builtin:smollm2", model_id="smol", port=8123, host="127.0.0.2",
                      engine="native", engine_args={"device": "cpu", "max_num_seqs": 4},
                      served_model_names=("smol", "tiny"), log_level="debug")
    assert LaunchSpec.from_argv(spec.to_argv()) == spec
    plain = LaunchSpec(source="/models/x", model_id="x", port=1)
    assert LaunchSpec.from_argv(plain.to_argv()) == plain
    assert plain.model_names == ["x"] and spec.model_names == ["smol", "tiny"]
    assert spec.base_url == "http://127.0.0.2:8123"
    vllm = LaunchSpec(source="/models/x", model_id="x", port=1, engine="vllm", engine_args={"max-model-len": 4096},
                      engine_command=("/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"))
    assert LaunchSpec.from_argv(vllm.to_argv()) == vllm


def test_the_defaults_are_those_of_a_short_command_line():
    spec = LaunchSpec.from_argv(["--source", "s", "--model-id", "m", "--port", "9"])
    assert (spec.host, spec.engine, spec.engine_args, spec.served_model_names, spec.log_level) == \
        ("127.0.0.1", "native", {}, (), "info")


@pytest.mark.parametrize("argv, names", [
    (["--model-id", "m", "--port", "1"], "--source"),
    (["--source", "s", "--model-id", "m"], "--port"),
    (["--source", "s", "--model-id", "m", "--port", "one"], "--port"),
    (["--source", "s", "--model-id", "m", "--port", "1", "--engine-args", "{not json"], "--engine-args"),
    (["--source", "s", "--model-id", "m", "--port", "1", "--engine-args", "[1]"], "--engine-args"),
    (["--source", "s", "--model-id", "m", "--port", "1", "--no-such-flag"], "--no-such-flag"),
])
def test_a_bad_command_line_is_a_value_error_naming_the_flag(argv, names):
    with pytest.raises(ValueError, match=names):
        LaunchSpec.from_argv(argv)


def test_worker_stats_round_trip_through_json():
    stats = WorkerStats(pid=42, rss_bytes=1 << 30, weights_bytes=270_000_000, kv_cache_bytes=1 << 20,
                        is_sleeping=True, num_running=1, num_waiting=2, weights_source="image",
                        image_dir="/store/images/smol-1234",
                        cold_start={"phases": {"import": 1.5}, "path": "image"})
    assert WorkerStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats


def test_worker_stats_from_a_newer_worker_ignores_keys_it_does_not_know():
    body = {"pid": 1, "rss_bytes": 2, "loading": True, "gpu_bytes": 3}
    assert WorkerStats.from_dict(body) == WorkerStats(pid=1, rss_bytes=2, loading=True)
    with pytest.raises(TypeError):  # the client turns this into a WorkerControlError
        WorkerStats.from_dict({"rss_bytes": 2})


def test_worker_stats_carry_every_engine_figure():
    from dormant.engines.base import EngineStats

    missing = {f.name for f in dataclasses.fields(EngineStats)} - {f.name for f in dataclasses.fields(WorkerStats)}
    assert not missing, f"/stats drops the engine's {sorted(missing)}"
