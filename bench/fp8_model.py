"""Write an FP8 copy of a bf16 model folder (random_model.py's, or any Llama/Qwen-family one),
in either format dormant runs natively (dormant/engines/native/core/quantization.py):

    block    Qwen's -FP8 releases: quantization_config {quant_method: fp8, fmt: e4m3,
             weight_block_size: [128, 128], activation_scheme: dynamic}; each layer
             projection's `.weight` in float8_e4m3fn + `.weight_scale_inv` [N/128, K/128] fp32
    channel  llm-compressor's FP8_DYNAMIC (compressed-tensors, float-quantized): `.weight` in
             float8_e4m3fn + `.weight_scale` [N, 1] bf16; no input_scale (dynamic activations)

Weights are quantized with amax / 448 per 128 x 128 block or per output row; everything that
is not a layer projection (embeddings, norms, lm_head) is copied as it is. One shard at a time,
so memory holds one shard. Tokenizer and generation files are copied.

    PYTHONPATH=. python3 bench/fp8_model.py BF16_DIR OUT_DIR --format block|channel [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUANTIZATION_CONFIGS = {
    "block": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
    "channel": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                        "dynamic": False, "group_size": None, "block_structure": None, "observer": "minmax"},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                  "dynamic": True, "group_size": None, "block_structure": None, "observer": None},
            "output_activations": None}},
        "ignore": ["lm_head"], "kv_cache_scheme": None,
    },
}


def is_projection(name: str) -> bool:
    from dormant.engines.native.core.quantization import PROJECTIONS

    parts = name.split(".")
    return ".layers." in name and parts[-1] == "weight" and parts[-2] in PROJECTIONS


def make_fp8_model(bf16_dir: str | Path, out_dir: str | Path, fmt_name: str, device: str = "cpu") -> Path:
    """OUT_DIR as an FP8 checkpoint of BF16_DIR in format `fmt_name` (block | channel); an
    existing complete OUT_DIR is returned as it is."""
    from safetensors import safe_open

    src, out = Path(bf16_dir), Path(out_dir)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out

    def shards():
        for shard in sorted(src.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt", device=device) as f:
                yield shard.name, ((name, f.get_tensor(name)) for name in f.keys())

    extras = [p for p in src.iterdir()
              if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json", "model.safetensors.index.json")]
    return _write_fp8(shards(), out, fmt_name, json.loads((src / "config.json").read_text()), extras,
                      index=(src / "model.safetensors.index.json").is_file())


def make_random_fp8_model(config_path: str | Path, out_dir: str | Path, fmt_name: str, seed: int = 0,
                          shard_bytes: int = 5 << 30, device: str = "cuda") -> Path:
    """A random-weight FP8 checkpoint made on the GPU without a bf16 folder (the Qwen3-32B shape's
    would be 65 GB: with its FP8 copy and an engine image, more than the GPU machine's disk):
    the model initialized in bf16 on the GPU, each projection quantized as it is written, shards
    of about `shard_bytes`; random_model.py's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from random_model import write_tokenizer  # same folder

    out = Path(out_dir)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(Path(config_path).read_text())  # no shards yet: not complete
    config = AutoConfig.from_pretrained(out)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = model.state_dict()
    names = [n for n in state if not (config.tie_word_embeddings and n == "lm_head.weight")]

    def shards():
        group, size, index = [], 0, 0
        for name in names + [None]:
            nbytes = 0 if name is None else state[name].numel() * (1 if is_projection(name) else 2)
            if group and (name is None or size + nbytes > shard_bytes):
                index += 1
                yield f"model-{index:05d}.safetensors", ((n, state[n]) for n in group)
                group, size = [], 0
            if name is not None:
                group.append(name)
                size += nbytes

    write_tokenizer(config, out)
    # the config as save_pretrained writes it (what make_fp8_model finds in a bf16 folder)
    _write_fp8(shards(), out, fmt_name, model.config.to_diff_dict(), [], index=True)
    del model, state
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def _write_fp8(shards, out: Path, fmt_name: str, config: dict, extras: list[Path], index: bool) -> Path:
    """Each (file name, (name, tensor) pairs) of `shards` written to OUT with every layer
    projection quantized; then the index, the `extras` copied and config.json (last: it marks
    the folder complete)."""
    import torch
    from safetensors.torch import save_file

    from dormant.engines.native.core.quantization import BLOCK_FP8, CHANNEL_FP8, quantize_weight

    fmt = {"block": BLOCK_FP8, "channel": CHANNEL_FP8}[fmt_name]
    scale_dtype = torch.float32 if fmt_name == "block" else torch.bfloat16  # as each release stores it
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for file_name, tensors_in in shards:
        tensors = {}
        for name, t in tensors_in:
            if is_projection(name):
                q, scale = quantize_weight(t, fmt, scale_dtype)
                tensors[name] = q.cpu()
                tensors[name.removesuffix("weight") + fmt.scale_suffix] = scale.cpu().contiguous()
            else:
                tensors[name] = t.cpu()
        save_file(tensors, str(out / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in tensors})
        del tensors
    if index:
        total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for extra in extras:
        shutil.copy2(extra, out / extra.name)
    config["quantization_config"] = QUANTIZATION_CONFIGS[fmt_name]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bf16_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--format", choices=("block", "channel"), required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(make_fp8_model(args.bf16_dir, args.out_dir, args.format, args.device))


if __name__ == "__main__":
    main()
