"""The compact decoder (compact_decoder.py) against transformers' forward on the same random
fp32 weights, on CPU: tiny Qwen3 (q/k-norm), Llama (tied embeddings, attention bias) and
Qwen2 (q/k/v bias) configs. One packed prefill of two prompts over a shuffled paged cache,
then a packed step of one decode and one prompt chunk over its cached context."""

from __future__ import annotations

import pytest
import torch

from dormant.engines.native.cuda.attention import PREFILL_BLOCK_M, GPUAttentionMetadata
from dormant.engines.native.cuda.compact_decoder import CompactDecoder, supports

BLOCK = 4
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=200, max_position_embeddings=256, rms_norm_eps=1e-6)


def _configs():
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    return {
        "qwen3": Qwen3Config(**TINY, head_dim=32),
        "llama": LlamaConfig(**TINY, tie_word_embeddings=True, attention_bias=True,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "qwen2": Qwen2Config(**TINY),
    }


def _models(cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    ours = CompactDecoder(cfg).eval()
    state = hf.state_dict()
    with torch.no_grad():
        for name, view in ours.checkpoint_tensors().items():
            view.copy_(state[name])
    ours.build_rope(cfg.max_position_embeddings, "cpu", torch.float32)
    return hf, ours


def _step(seqs, tables, num_decodes):
    """seqs: (table row, first position, tokens) in row order, decodes first -> model inputs."""
    ids, pos, slots, blocks = [], [], [], [[], [], []]
    for row, (table_row, first, tokens) in enumerate(seqs):
        start = len(ids)
        for i, tok in enumerate(tokens):
            p = first + i
            ids.append(tok)
            pos.append(p)
            slots.append(tables[table_row][p // BLOCK] * BLOCK + p % BLOCK)
        if row >= num_decodes:
            for b in range(start, len(ids), PREFILL_BLOCK_M):
                for lst, v in zip(blocks, (row, b, min(b + PREFILL_BLOCK_M, len(ids)))):
                    lst.append(v)
    return torch.tensor(ids), torch.tensor(pos), torch.tensor(slots), tuple(torch.tensor(b) for b in blocks)


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_compact_decoder_logits_match_transformers(family):
    cfg = _configs()[family]
    assert supports(cfg)
    hf, ours = _models(cfg)
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (7, 90))
    head_dim = ours.layers[0].head_dim
    num_blocks = 64
    caches = [(torch.zeros(num_blocks * BLOCK, cfg.num_key_value_heads, head_dim),
               torch.zeros(num_blocks * BLOCK, cfg.num_key_value_heads, head_dim)) for _ in range(cfg.num_hidden_layers)]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.tensor([perm[:32], perm[32:]], dtype=torch.int32)

    def run(seqs, num_decodes):
        ids, pos, slots, blocks = _step(seqs, tables.tolist(), num_decodes)
        rows = torch.tensor([r for r, _, _ in seqs])
        lens = torch.tensor([first + len(t) for _, first, t in seqs[:num_decodes]], dtype=torch.int32)
        meta = GPUAttentionMetadata(is_prefill=True, slot_mapping=slots, kv_caches=caches, block_size=BLOCK,
                                    num_decodes=num_decodes, block_tables=tables[rows], context_lens=lens,
                                    prefill_blocks=blocks)
        with torch.no_grad():
            return ours(ids, pos, meta)

    def reference(tokens):
        with torch.no_grad():
            return hf(torch.tensor([tokens])).logits[0]

    # step 1: both prompts in one packed prefill, b's first 60 tokens only (a chunk)
    logits = run([(0, 0, a), (1, 0, b[:60])], 0)
    torch.testing.assert_close(logits[:7], reference(a), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[7:], reference(b[:60]), rtol=1e-4, atol=1e-4)
    # step 2: a decodes one token, b's remaining 30 tokens attend to its cached 60
    nxt = int(logits[6].argmax())
    logits = run([(0, 7, [nxt]), (1, 60, b[60:])], 1)
    torch.testing.assert_close(logits[0], reference(a + [nxt])[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1:], reference(b)[60:], rtol=1e-4, atol=1e-4)


def test_unsupported_configs_fall_back_to_transformers():
    from transformers import LlamaConfig, MistralConfig

    assert not supports(LlamaConfig(**TINY, mlp_bias=True))
    assert not supports(MistralConfig(**TINY, sliding_window=4096))
    assert supports(MistralConfig(**TINY, sliding_window=None))
