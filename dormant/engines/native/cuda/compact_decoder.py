"""A compact decoder for the Llama family (Llama, Mistral, Qwen2, Qwen3) over the paged KV
cache, used by the GPU runner where transformers' layer costs too many kernels (issue 3
allows it given a logits test: tests/unit/engines/native/test_compact_decoder.py on CPU,
tests/gpu/test_gpu_engine.py on the GPU, both against transformers' forward on the same weights).

A layer is nine launches on the GPU instead of ~45: RMSNorm with the residual add fused in,
q/k/v as one GEMM (one [q | k | v] weight, filled from the checkpoint's three), one kernel for
q/k-norm (Qwen3) + RoPE + the KV-cache write, attention (paged decode kernel for decode rows,
one varlen paged prefill launch for every prompt row of the step), o_proj, norm + add,
gate/up as one GEMM, silu*mul, down. Everything else about the model stays transformers':
the config, and the rotary embedding's cos/sin, computed once by transformers' own class
(any of its rope scalings) into a [max_model_len, head_dim] table.

FP8 checkpoints (issue 12; core/quantization.py's two formats): the four GEMMs' weights stay
float8_e4m3fn in the arena, each with its fp32 scales beside it, and run through
kernels/fp8_linear.py (activations quantized per token at run time); the rest is unchanged.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from dormant.engines.native.core.quantization import FP8_DTYPE, FP8Format, UnsupportedQuantization
from dormant.engines.native.cuda.attention import PREFILL_BLOCK_M, GPUAttentionMetadata, gather_decode_attention
from dormant.engines.native.kernels.fp8_linear import fp8_linear
from dormant.engines.native.kernels.fused_ops import add_rms_norm, qk_norm_rope_cache, silu_and_mul

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def supports(hf_config) -> bool:
    """The families and options this decoder implements; anything else runs transformers'."""
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(hf_config, "mlp_bias", False) or getattr(hf_config, "use_sliding_window", False):
        return False
    if hf_config.model_type == "mistral" and getattr(hf_config, "sliding_window", None):
        return False
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type", "default")) not in ("dynamic", "longrope")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x, residual=None):
        return add_rms_norm(x, residual, self.weight, self.eps)


class LMHead(nn.Module):
    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden, dtype=dtype), requires_grad=False)

    def forward(self, x, out=None):
        return torch.matmul(x, self.weight.t(), out=out)


class CompactLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int, dtype: torch.dtype | None = None, quant: FP8Format | None = None):
        """quant: the projections' weights in FP8 with their scales (core/quantization.py),
        each `<proj>` beside a `<proj>_scale`; None: all in `dtype`."""
        super().__init__()
        self.layer_idx = layer_idx
        self.quant = quant
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv_bias = cfg.model_type == "qwen2" or getattr(cfg, "attention_bias", False)
        o_bias = cfg.model_type != "qwen2" and getattr(cfg, "attention_bias", False)
        if quant is not None:
            _check_fp8_shapes(quant, hidden, inter, self.q_size, self.kv_size)

        def param(*shape, dtype=dtype):
            return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)

        def weight(rows, cols):  # (weight, its scale or None)
            if quant is None:
                return param(rows, cols), None
            return param(rows, cols, dtype=FP8_DTYPE), param(*quant.scale_shape(rows, cols), dtype=torch.float32)

        # registered in the order the forward reads them: the arena lays them out so
        self.input_layernorm = param(hidden)
        self.qkv_proj, self.qkv_proj_scale = weight(self.q_size + 2 * self.kv_size, hidden)
        self.qkv_bias = param(self.q_size + 2 * self.kv_size) if qkv_bias else None
        self.q_norm = param(self.head_dim) if cfg.model_type == "qwen3" else None
        self.k_norm = param(self.head_dim) if cfg.model_type == "qwen3" else None
        self.o_proj, self.o_proj_scale = weight(hidden, self.q_size)
        self.o_bias = param(hidden) if o_bias else None
        self.post_attention_layernorm = param(hidden)
        self.gate_up_proj, self.gate_up_proj_scale = weight(2 * inter, hidden)
        self.down_proj, self.down_proj_scale = weight(hidden, inter)

    def checkpoint_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """transformers' parameter names -> the view of ours each one fills (FP8: the scales'
        names too; fused weights take their parts' scales stacked along the output rows, in
        128-row blocks for the block format, which _check_fp8_shapes made whole)."""
        q, kv, inter = self.q_size, self.kv_size, self.gate_up_proj.shape[0] // 2
        a, m = prefix + "self_attn.", prefix + "mlp."
        fused = {a + "q_proj": (self.qkv_proj, self.qkv_proj_scale, 0, q),
                 a + "k_proj": (self.qkv_proj, self.qkv_proj_scale, q, q + kv),
                 a + "v_proj": (self.qkv_proj, self.qkv_proj_scale, q + kv, q + 2 * kv),
                 a + "o_proj": (self.o_proj, self.o_proj_scale, 0, self.o_proj.shape[0]),
                 m + "gate_proj": (self.gate_up_proj, self.gate_up_proj_scale, 0, inter),
                 m + "up_proj": (self.gate_up_proj, self.gate_up_proj_scale, inter, 2 * inter),
                 m + "down_proj": (self.down_proj, self.down_proj_scale, 0, self.down_proj.shape[0])}
        out = {prefix + "input_layernorm.weight": self.input_layernorm,
               prefix + "post_attention_layernorm.weight": self.post_attention_layernorm}
        for name, (w, scale, start, end) in fused.items():
            out[name + ".weight"] = w[start:end]
            if scale is not None:
                step = self.quant.block or 1
                out[f"{name}.{self.quant.scale_suffix}"] = scale[start // step:end // step]
        if self.qkv_bias is not None:
            out.update({a + "q_proj.bias": self.qkv_bias[:q], a + "k_proj.bias": self.qkv_bias[q:q + kv],
                        a + "v_proj.bias": self.qkv_bias[q + kv:]})
        if self.o_bias is not None:
            out[a + "o_proj.bias"] = self.o_bias
        if self.q_norm is not None:
            out.update({a + "q_norm.weight": self.q_norm, a + "k_norm.weight": self.k_norm})
        return out

    def linear(self, x, weight, scale, bias=None):
        return F.linear(x, weight, bias) if scale is None else fp8_linear(x, weight, scale, self.quant, bias)

    def forward(self, x, residual, positions, meta: GPUAttentionMetadata, rope):
        h, residual = add_rms_norm(x, residual, self.input_layernorm, self.eps)
        qkv = self.linear(h, self.qkv_proj, self.qkv_proj_scale, self.qkv_bias)
        k_cache, v_cache = meta.kv_caches[self.layer_idx]
        q = qk_norm_rope_cache(qkv, positions, rope, self.q_norm, self.k_norm, self.eps, k_cache, v_cache,
                               meta.slot_mapping, self.num_heads, self.num_kv_heads, self.head_dim)
        attn = paged_attention(q, k_cache, v_cache, positions, meta, self.scale)
        o = self.linear(attn.view(attn.shape[0], self.q_size), self.o_proj, self.o_proj_scale, self.o_bias)
        h, residual = add_rms_norm(o, residual, self.post_attention_layernorm, self.eps)
        gate_up = self.linear(h, self.gate_up_proj, self.gate_up_proj_scale)
        return self.linear(silu_and_mul(gate_up), self.down_proj, self.down_proj_scale), residual


def _check_fp8_shapes(quant: FP8Format, hidden: int, inter: int, q_size: int, kv_size: int) -> None:
    """The block format fuses q/k/v and gate/up by stacking their scale rows: each part's rows
    must fill whole 128-row blocks, and every input width whole 128-column groups (the
    activation groups). FP8 GEMMs need widths in multiples of 16 either way."""
    need = quant.block or 16
    sizes = {"q_proj rows (heads x head_dim)": q_size, "k_proj/v_proj rows": kv_size,
             "gate_proj/up_proj rows (intermediate_size)": inter, "hidden_size": hidden}
    for what, n in sizes.items():
        if n % need:
            raise UnsupportedQuantization(f"FP8 ({quant.kind} format): {what} = {n} is not a multiple of {need}")


def paged_attention(q, k_cache, v_cache, positions, meta: GPUAttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D]: decode rows (the first num_decodes of a packed step, or all
    of a decode step) by the paged decode kernel, prompt rows by one varlen prefill launch."""
    num_decodes = q.shape[0] if not meta.is_prefill else meta.num_decodes
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_decodes:
        tables, lens = meta.block_tables[:num_decodes], meta.context_lens[:num_decodes]
        if q.is_cuda:
            from dormant.engines.native.kernels.triton_attention import paged_decode_attention

            paged_decode_attention(q[:num_decodes], k_cache, v_cache, tables, lens, scale, meta.block_size,
                                   out=out[:num_decodes])
        else:
            out[:num_decodes] = gather_decode_attention(q[:num_decodes], k_cache, v_cache, tables, lens,
                                                        scale, meta.block_size)
    if meta.is_prefill and q.shape[0] > num_decodes:
        if q.is_cuda:
            from dormant.engines.native.kernels.triton_attention import paged_prefill_attention

            paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, positions, meta.prefill_blocks,
                                    scale, meta.block_size, out, PREFILL_BLOCK_M)
        else:
            _prefill_reference(q, k_cache, v_cache, positions, meta, scale, out)
    return out


def _prefill_reference(q, k_cache, v_cache, positions, meta, scale, out) -> None:
    """What the prefill kernel computes, one query block at a time (CPU and tests)."""
    bs = meta.block_size
    for row, start, end in zip(*(t.tolist() for t in meta.prefill_blocks)):
        q_pos = positions[start:end]
        ctx = torch.arange(int(q_pos.max()) + 1, device=q.device)
        slots = meta.block_tables[row, ctx // bs].long() * bs + ctx % bs
        k, v = k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1)  # [Hkv, L, D]
        mask = ctx[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), k, v, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        out[start:end] = o.transpose(0, 1)


class CompactDecoder(nn.Module):
    def __init__(self, cfg, dtype: torch.dtype | None = None, quant: FP8Format | None = None):
        """dtype: every parameter's (None: torch's default) but FP8 weights and their fp32
        scales when quant is given (the layers' projections only)."""
        super().__init__()
        self.config = cfg
        self.quant = quant
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(CompactLayer(cfg, i, dtype, quant) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, dtype)
        if getattr(cfg, "tie_word_embeddings", False):
            self.lm_head.weight = self.embed_tokens.weight
        self.rope: torch.Tensor | None = None

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """transformers' parameter names -> the tensor (or view) of ours each one fills."""
        out = {"model.embed_tokens.weight": self.embed_tokens.weight, "model.norm.weight": self.norm.weight}
        if self.lm_head.weight is not self.embed_tokens.weight:
            out["lm_head.weight"] = self.lm_head.weight
        for i, layer in enumerate(self.layers):
            out.update(layer.checkpoint_tensors(f"model.layers.{i}."))
        return out

    def build_rope(self, max_positions: int, device, dtype: torch.dtype, table: torch.Tensor | None = None) -> None:
        """The cos | sin table (rope_table's, or `table` computed beforehand) on `device`."""
        if table is None:
            table = rope_table(self.config, max_positions, dtype)
        self.rope = table.to(device)

    def forward(self, input_ids, positions, meta: GPUAttentionMetadata, logits_to_keep=None, logits_out=None):
        """input_ids/positions [T] -> logits [T or len(logits_to_keep), vocab] (into logits_out if given)."""
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, meta, self.rope)
        if logits_to_keep is not None:
            x, residual = x[logits_to_keep], residual[logits_to_keep]
        x, _ = self.norm(x, residual)
        return self.lm_head(x, out=logits_out)


def rope_table(config, max_positions: int, dtype: torch.dtype) -> torch.Tensor:
    """cos | sin of the first half of head_dim for every position, [max_positions, head_dim],
    by transformers' own rotary class (its rope scaling and attention_scaling included),
    rounded to `dtype` as transformers rounds them. Computed on the CPU in fp32 (the GPU
    runner does it in a thread beside the arena's mapping): on the GPU this was the start's
    first cuBLAS call and first use of half a dozen kernels, 0.53 s of a restore
    (bench/README.md, "Restore: first uses"); fp32 cos/sin may differ from the GPU's in the last bit, which
    the rounding to bf16 hides but for the rare value at a boundary."""
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    with torch.device("cpu"):
        rotary = cls(config=config)
        positions = torch.arange(max_positions)[None]
        cos, sin = rotary(torch.zeros(1, dtype=dtype), positions)
    half = cos.shape[-1] // 2
    return torch.cat((cos[0, :, :half], sin[0, :, :half]), dim=-1).to(dtype).contiguous()
