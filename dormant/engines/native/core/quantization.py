"""FP8 checkpoints: which format a model folder's `quantization_config` describes, and the
quantize / dequantize arithmetic both formats share (issue 12, "FP8 checkpoints").

    fp8_format(quantization_config) -> FP8Format | None   None: not quantized
    read_fp8_format(model_dir)       the same, from the folder's config.json
    quantize_weight(w, fmt)          -> (float8_e4m3fn weight, fp32 scale), as the releases store them
    dequantize_weight(q, scale, fmt) -> fp32 weight
    quantize_activation(x, group)    -> (float8_e4m3fn x, fp32 scale per row per `group` columns)

The two formats (tensor names as vLLM's fp8 and compressed_tensors loaders read them):

    block   Qwen's and DeepSeek's `-FP8` releases: {quant_method: fp8, fmt: e4m3,
            weight_block_size: [128, 128], activation_scheme: dynamic}. `<proj>.weight` in
            float8_e4m3fn, `<proj>.weight_scale_inv` [ceil(N/128), ceil(K/128)]: the scale a
            128 x 128 block is multiplied by (the name is historical: it is not an inverse).
            Activations: one scale per token per 128 columns, computed at run time.
    channel compressed-tensors `float-quantized` as llm-compressor's FP8_DYNAMIC writes it:
            `<proj>.weight` in float8_e4m3fn, `<proj>.weight_scale` [N, 1], one per output
            channel (no `input_scale`: activations are scaled per token at run time).

Only the decoder layers' seven projections are FP8; embeddings, norms and lm_head stay in the
model's dtype (both release formats leave lm_head out). Anything else is refused by
UnsupportedQuantization, whose message names the config key and what we support.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
# a row or block of zeros gets this scale instead of 0 (which would divide by zero)
MIN_SCALE = 1e-10 / FP8_MAX
BLOCK = 128
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnsupportedQuantization(ValueError):
    """A quantization_config this engine cannot run; the message names the key."""


@dataclass(frozen=True)
class FP8Format:
    """kind "block" (128 x 128 weight blocks, 1 x 128 activation groups) or "channel" (one
    weight scale per output row, one activation scale per token)."""

    kind: str
    scale_suffix: str  # the checkpoint's name for a weight's scale: weight_scale_inv | weight_scale
    quant_method: str

    @property
    def block(self) -> int | None:
        """Rows and columns of a weight block (and columns of an activation group), or None."""
        return BLOCK if self.kind == "block" else None

    def scale_shape(self, rows: int, cols: int) -> tuple[int, int]:
        if self.kind == "block":
            return (-(-rows // BLOCK), -(-cols // BLOCK))
        return (rows, 1)


BLOCK_FP8 = FP8Format("block", "weight_scale_inv", "fp8")
CHANNEL_FP8 = FP8Format("channel", "weight_scale", "compressed-tensors")


def read_fp8_format(model_dir: str | Path) -> FP8Format | None:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    return fp8_format(json.loads(path.read_text()).get("quantization_config"))


def fp8_format(qc: dict | None) -> FP8Format | None:
    """The format of a config.json's `quantization_config` (a dict, or an object with
    to_dict), None when there is none; UnsupportedQuantization for anything else."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    method = qc.get("quant_method")
    if method == "fp8":
        return _block_format(qc)
    if method == "compressed-tensors":
        return _channel_format(qc)
    raise UnsupportedQuantization(
        f"quantization_config.quant_method is {method!r}; the native engine runs FP8 checkpoints "
        "only: 'fp8' with weight_block_size [128, 128] (Qwen/DeepSeek -FP8) or 'compressed-tensors' "
        "float-quantized per-channel (llm-compressor FP8_DYNAMIC); use the vllm engine for others")


def _refuse(key: str, value, want: str) -> UnsupportedQuantization:
    return UnsupportedQuantization(f"quantization_config.{key} is {value!r}; the native engine supports {want}")


def _block_format(qc: dict) -> FP8Format:
    if qc.get("fmt", "e4m3") != "e4m3":
        raise _refuse("fmt", qc.get("fmt"), "'e4m3'")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise _refuse("activation_scheme", qc.get("activation_scheme"), "'dynamic' (scales computed per token)")
    if list(qc.get("weight_block_size") or []) != [BLOCK, BLOCK]:
        raise _refuse("weight_block_size", qc.get("weight_block_size"), f"[{BLOCK}, {BLOCK}]")
    for key in ("modules_to_not_convert", "ignored_layers"):
        _check_ignored(key, qc.get(key))
    return BLOCK_FP8


def _channel_format(qc: dict) -> FP8Format:
    if qc.get("format", "float-quantized") != "float-quantized":
        raise _refuse("format", qc.get("format"), "'float-quantized'")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise _refuse("config_groups", list(groups), "exactly one group (FP8_DYNAMIC's)")
    name, group = next(iter(groups.items()))
    w, a = group.get("weights") or {}, group.get("input_activations")
    key = f"config_groups.{name}"
    for k, want in (("type", "float"), ("num_bits", 8), ("strategy", "channel"), ("dynamic", False)):
        if w.get(k) != want:
            raise _refuse(f"{key}.weights.{k}", w.get(k), repr(want))
    if a is None:
        raise _refuse(f"{key}.input_activations", None, "FP8 activations (weight-only FP8 is not supported)")
    for k, want in (("type", "float"), ("num_bits", 8), ("strategy", "token"), ("dynamic", True)):
        if a.get(k) != want:
            raise _refuse(f"{key}.input_activations.{k}", a.get(k), repr(want))
    if qc.get("kv_cache_scheme"):
        raise _refuse("kv_cache_scheme", qc["kv_cache_scheme"], "none (an FP8 KV cache is not supported)")
    _check_ignored("ignore", qc.get("ignore"))
    return CHANNEL_FP8


def _check_ignored(key: str, names) -> None:
    """Left-out modules must be outside the decoder layers (lm_head): we quantize all seven
    projections of every layer or none."""
    for name in names or ():
        if ".layers." in f".{name}" or name.startswith("re:"):
            raise _refuse(key, name, "leaving out lm_head only (every layer projection in FP8)")


# -- arithmetic (torch ops: the CPU reference, the checkpoint writer, the GPU tests' reference) ---

def quantize_weight(w: torch.Tensor, fmt: FP8Format, scale_dtype: torch.dtype = torch.float32):
    """(float8_e4m3fn weight, scale in `scale_dtype`) with amax / 448 per block or row. The
    scale is rounded to scale_dtype before dividing, so dequantize(q, scale) is what was meant."""
    w = w.float()
    rows, cols = w.shape
    if fmt.kind == "block":
        r, c = fmt.scale_shape(rows, cols)
        padded = torch.zeros(r * BLOCK, c * BLOCK, device=w.device)
        padded[:rows, :cols] = w
        amax = padded.view(r, BLOCK, c, BLOCK).abs().amax(dim=(1, 3))
        scale = (amax / FP8_MAX).clamp_min(MIN_SCALE).to(scale_dtype)
        full = scale.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    else:
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE).to(scale_dtype)
        full = scale.float()
    q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    rows, cols = q.shape
    scale = scale.float()
    if fmt.kind == "block":
        scale = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return q.float() * scale


def quantize_activation(x: torch.Tensor, group: int):
    """x [M, K] -> (float8_e4m3fn [M, K], fp32 scale [M, K // group]): amax / 448 per row per
    `group` columns (group = K: one per row). kernels/fp8_linear.py's Triton kernel computes
    the same, in the same order (fp32 amax, scale clamped, x / scale, clamp, round to nearest)."""
    m, k = x.shape
    xf = x.float().view(m, k // group, group)
    scale = (xf.abs().amax(dim=2, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(m, k)
    return q, scale.view(m, k // group)
