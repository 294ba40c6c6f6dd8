"""Build a transformers ``*ForCausalLM`` whose weights are views of one arena.

The model is built on the meta device from its config (transformers' own model code, our
attention registered by name), then each parameter is swapped for a view of the arena;
RoPE buffers, which checkpoints do not hold, are rebuilt on the CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from dormant.engines.native.core.checkpoint import copy_checkpoint
from dormant.engines.native.core.engine_image import layout_of
from dormant.engines.native.core.quantization import UnsupportedQuantization, read_fp8_format
from dormant.engines.native.cpu.arena import Arena
from dormant.engines.native.cpu.attention import ATTN_IMPLEMENTATION
from dormant.engines.native.cpu.mixed_linear import MixedLinear, SmallRows

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "mixed": torch.float32}


class LoadedModel:
    def __init__(self, model: nn.Module, arena: Arena, hf_config, dtype: torch.dtype, small_copies,
                 layout: dict | None = None, small_rows: SmallRows | None = None):
        self.model = model
        self.arena = arena
        self.hf_config = hf_config
        self.dtype = dtype
        self.small_copies = small_copies  # [(bf16 view, fp32 weight)] for the mixed mode
        self.layout = layout or {}  # name -> offset/dtype/shape, recorded in the engine image
        self.small_rows = small_rows or SmallRows(0)  # which steps the bf16 copies run (mixed mode)

    def load_weights(self, model_dir: Path) -> None:
        """Fill the arena from the model's safetensors files (and refresh the bf16 copies)."""
        self.arena.reserve()
        copy_checkpoint(model_dir, dict(self.model.named_parameters()))
        self.refresh_small_copies()

    def refresh_small_copies(self) -> None:
        with torch.inference_mode():
            for small, weight in self.small_copies:
                small.copy_(weight)


def load_model(model_dir: str | Path, dtype_name: str, small_batch_tokens: int, weights: bool = True) -> LoadedModel:
    """The model with its arena; `weights=False` leaves the arena unfilled (an engine image
    fills it, see core/engine_image.py)."""
    model_dir = Path(model_dir)
    dtype = TORCH_DTYPES[dtype_name]
    fmt = read_fp8_format(model_dir)  # raises on a quantization it does not know, naming the key
    if fmt is not None:
        raise UnsupportedQuantization(
            f"{model_dir.name} is an FP8 checkpoint (quantization_config.quant_method {fmt.quant_method!r}): the "
            "CPU engine runs bf16/fp32 weights only; serve it with device: cuda on a GPU with FP8 (Ada, Hopper)")
    hf_config = AutoConfig.from_pretrained(model_dir)
    hf_config = copy.deepcopy(hf_config)  # set_attn_implementation writes into the config
    for key in ("quantization_config",):
        if hasattr(hf_config, key):
            delattr(hf_config, key)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    model.eval().requires_grad_(False)

    linears = []
    if dtype_name == "mixed":
        linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    named = list(model.named_parameters())  # tied weights appear once
    sizes = [p.numel() * p.element_size() for _, p in named]
    small_sizes = [mod.weight.numel() * 2 for _, mod in linears]
    offsets, total = Arena.plan(sizes + small_sizes)
    arena = Arena(total)
    for (name, param), offset in zip(named, offsets):
        view = arena.view(offset, param.dtype, tuple(param.shape))
        torch.utils.swap_tensors(param, nn.Parameter(view, requires_grad=False))

    small_copies = []
    small_rows = SmallRows(small_batch_tokens)
    for (name, mod), offset in zip(linears, offsets[len(named):]):
        small = arena.view(offset, torch.bfloat16, tuple(mod.weight.shape))
        small_copies.append((small, mod.weight))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MixedLinear(mod, small, small_rows))

    _rebuild_buffers(model, hf_config)
    small_named = [(f"{name}.weight@bf16", small) for (name, _), (small, _) in zip(linears, small_copies)]
    layout = layout_of(named + small_named, offsets, total)
    loaded = LoadedModel(model, arena, hf_config, dtype, small_copies, layout, small_rows)
    if weights:
        loaded.load_weights(model_dir)
    return loaded


def _rebuild_buffers(model: nn.Module, hf_config) -> None:
    """Non-persistent buffers (RoPE inv_freq) are not in checkpoints: rebuild them on the CPU."""
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            with torch.device("cpu"):
                fresh = type(module)(config=getattr(module, "config", hf_config))
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, fresh)
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise RuntimeError(f"buffer {name} has no value after load (unsupported model family?)")
