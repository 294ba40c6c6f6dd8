"""A model folder's checkpoint: its safetensors copied into tensors, its end-of-sequence ids."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def copy_checkpoint(model_dir: Path, params: dict[str, torch.Tensor]) -> None:
    """Copy every tensor of the model's safetensors into `params` (checkpoint name -> the
    tensor or view it fills); a missing or misshapen tensor is an error naming it."""
    missing = set(params)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    with torch.inference_mode():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    param = params.get(name)
                    if param is None:
                        continue
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise ValueError(f"{file.name}: {name} has shape {tuple(tensor.shape)}, "
                                         f"model expects {tuple(param.shape)}")
                    if _is_fp8(tensor.dtype) != _is_fp8(param.dtype):  # copy_ would convert silently
                        raise ValueError(f"{file.name}: {name} is {tensor.dtype}, the model expects {param.dtype} "
                                         "(does config.json's quantization_config match the weights?)")
                    param.copy_(tensor)
                    missing.discard(name)
    if missing:
        raise ValueError(f"weights missing from {model_dir}: {sorted(missing)[:5]}")


def _is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def read_generation_eos(model_dir: Path) -> set[int]:
    ids: set[int] = set()
    for fname in ("generation_config.json", "config.json"):
        path = model_dir / fname
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
    return ids
