"""bench/bench_swap.py's CPU-testable pieces (issue 10): the FP8 base model its --fp8 option
links the N models to (the GPU path, quantized there, runs on the GPU machine only), and the
merge of an earlier run's modes, refused across weight formats."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import bench_swap  # noqa: E402

TINY = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256, "intermediate_size": 384,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128,
        "vocab_size": 320, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
        "tie_word_embeddings": False, "eos_token_id": 1, "torch_dtype": "bfloat16"}


@pytest.mark.timeout(120)
def test_fp8_base_model_is_made_on_the_cpu_from_a_bf16_folder_that_then_goes(tmp_path):
    from safetensors import safe_open

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    base = bench_swap.base_model(str(cfg), tmp_path, "block", device="cpu")

    assert base == tmp_path / "base" / "tiny-fp8-block"
    assert json.loads((base / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    assert (base / "tokenizer.json").is_file()
    with safe_open(str(next(base.glob("*.safetensors"))), framework="pt") as f:
        assert str(f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype) == "torch.float8_e4m3fn"
        assert "model.layers.0.mlp.down_proj.weight_scale_inv" in f.keys()
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["tiny-fp8-block"]  # the bf16 folder went

    shard = next(base.glob("*.safetensors"))
    written = shard.stat().st_mtime_ns
    assert bench_swap.base_model(str(cfg), tmp_path, "block", device="cpu") == base  # the other mode's call
    assert shard.stat().st_mtime_ns == written and not (tmp_path / "base" / "tiny-bf16").exists()

    folders = bench_swap.model_folders(base, 2, tmp_path)
    assert (folders["m01"] / shard.name).stat().st_ino == shard.stat().st_ino  # hard links: no extra disk
    assert bench_swap.folder_bytes(base) == sum(p.stat().st_size for p in base.iterdir())


@pytest.mark.timeout(30)
def test_merge_keeps_the_earlier_mode_of_the_same_weights_and_refuses_others(tmp_path):
    trace = {"models": 12, "requests": 200, "zipf": 1.1, "seed": 0}
    before_fp8 = tmp_path / "latest.json"  # a result of before --fp8: no "weights", bf16
    before_fp8.write_text(json.dumps({"trace": trace, "gpu_budget": "45GiB", "placed": {"seconds": 300.0}}))

    bf16 = {"trace": trace, "weights": "bf16", "gpu_budget": None}
    bench_swap.merge(bf16, str(before_fp8))
    assert bf16["placed"] == {"seconds": 300.0} and bf16["gpu_budget"] == "45GiB"

    fp8 = {"trace": trace, "weights": "fp8-block", "gpu_budget": None}
    with pytest.raises(SystemExit, match="its weights are bf16, this run's fp8-block"):
        bench_swap.merge(fp8, str(before_fp8))
    assert "placed" not in fp8


@pytest.mark.timeout(300)
def test_the_probe_unloads_models_with_an_image_and_times_their_restore(model_dir, tmp_path):
    """Through a real `dormant serve` and real workers (two SmolLM2 copies): a short trace,
    then the probe unloads each idle model that has an engine image and requests it; every
    probe finds its model hibernated (no process, the image on disk) and is answered, with
    the restore timed from the server's log."""
    import asyncio

    folders = {"a": model_dir, "b": model_dir}
    result = asyncio.run(bench_swap.run_mode("placed", folders, [("a", 1), ("b", 1)], tmp_path, None, probes=2))
    assert result["failures"] == 0 and {r["placed"] for r in result["switches"]} == {"cold"}
    probe = result["hibernated_probe"]
    assert [r["model"] for r in probe["requests"]] == ["a", "b"]  # least recently used first
    for r in probe["requests"]:
        assert r["status"] == 200 and r["tier"] == "stopped" and r["placed"] == "hibernated", r
        assert r["op"] > 0 and r["over_op"] == pytest.approx(r["ttft"] - r["op"], abs=1e-3)
    assert probe["n"] == 2 and probe["ttft_p50"] > probe["op_p50"] > 0
