"""The GPU runner's pieces that need no GPU: KV sizing, the sampler (run on CPU tensors), the
device switch in EngineConfig."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from dormant.engines.base import SamplingParams
from dormant.engines.native.core.config import EngineConfig
from dormant.engines.native.core.sequence import Sequence
from dormant.engines.native.cuda.sampler import GPUSampler, top_p_filter
from dormant.engines.native.cuda.start import (
    GiB, activation_reserve_bytes, kv_block_bytes, num_kv_blocks_for_memory,
)


def test_kv_block_bytes_qwen3_8b():
    # 36 layers, 8 KV heads of 128, bf16, K and V: 144 KiB per token
    assert kv_block_bytes(36, 16, 8, 128, 2) == 16 * 36 * 2 * 8 * 128 * 2


def test_kv_blocks_fill_the_utilization_after_weights_others_and_reserve():
    total, free = 80 * GiB, 79 * GiB  # 1 GiB held by the context
    block = 2 * 1024 * 1024
    n = num_kv_blocks_for_memory(total, free, 0.9, weights_bytes=16 * GiB, reserve_bytes=2 * GiB, block_bytes=block)
    assert n == (int(80 * GiB * 0.9) - 1 * GiB - 16 * GiB - 2 * GiB) // block
    assert num_kv_blocks_for_memory(total, 10 * GiB, 0.9, 16 * GiB, 2 * GiB, block) == 0  # nothing fits


def test_activation_reserve_grows_with_the_token_budget():
    cfg = SimpleNamespace(hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, vocab_size=151936)
    small = activation_reserve_bytes(cfg, 512, 8)
    large = activation_reserve_bytes(cfg, 8192, 128)
    assert GiB // 2 < small < large < 8 * GiB


def _seq(i: int, **params) -> Sequence:
    return Sequence(f"r{i}", [1, 2, 3], SamplingParams(**params))


def test_sampler_greedy_rows_take_the_argmax():
    logits = torch.randn(3, 50)
    assert GPUSampler()(logits, [_seq(i, temperature=0) for i in range(3)]) == logits.argmax(-1).tolist()


def test_sampler_seed_reproduces_whatever_else_is_batched():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    sampler = GPUSampler()
    alone = sampler(logits[1:2], [_seq(0, temperature=1.0, seed=7)])
    seq = _seq(0, temperature=1.0, seed=7)
    batched = sampler(logits, [_seq(1, temperature=0), seq, _seq(2, temperature=0.7), _seq(3, temperature=1.0, seed=1)])
    assert batched[1] == alone[0]
    assert batched[0] == int(logits[0].argmax())


def test_sampler_follows_the_distribution_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()
    seqs = [_seq(i, temperature=1.0) for i in range(4000)]
    counts = torch.bincount(torch.tensor(GPUSampler()(logits, seqs)), minlength=4).float() / 4000
    assert torch.allclose(counts, probs, atol=0.04)
    seqs = [_seq(i, temperature=1.0, top_p=0.7) for i in range(4000)]
    counts = torch.bincount(torch.tensor(GPUSampler()(logits, seqs)), minlength=4)
    assert counts[2] == 0 and counts[3] == 0 and counts[0] > counts[1] > 0


def test_top_p_filter_per_row():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    out = top_p_filter(probs, torch.tensor([[0.5], [0.9]]))
    assert torch.equal(out, torch.tensor([[0.5, 0.0, 0.0], [0.5, 0.3, 0.2]]))


@pytest.fixture()
def config_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 40960}))
    return tmp_path


def test_config_cuda_defaults_leave_kv_to_the_runner(config_dir):
    c = EngineConfig.from_args(config_dir, {"device": "cuda"})
    assert (c.dtype, c.max_num_seqs, c.num_kv_blocks, c.max_model_len) == ("bfloat16", 256, None, 8192)
    c.set_num_kv_blocks(100)  # 1600 tokens: max_model_len shrinks to fit
    assert c.max_model_len == 1600


def test_config_cpu_defaults_unchanged(config_dir):
    c = EngineConfig.from_args(config_dir, {"device": "cpu"})
    assert (c.dtype, c.max_num_seqs, c.num_kv_blocks) == ("mixed", 8, 512)


@pytest.mark.parametrize("args, key", [
    ({"device": "tpu"}, "device"),
    ({"device": "cuda", "dtype": "mixed"}, "dtype"),
    ({"device": "cuda", "gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"device": "cuda", "decode_attention": "flash"}, "decode_attention"),
])
def test_config_bad_gpu_args_name_the_key(config_dir, args, key):
    with pytest.raises(ValueError, match=key):
        EngineConfig.from_args(config_dir, args)
