"""Make a model folder as a user would have it, from a Hugging Face config.json, with random
bf16 weights: safetensors shards + config + generation config + a word-level tokenizer whose
vocabulary ("t0".."tN") covers every id, so any generated id decodes. Used by the GPU bench
and the GPU tests (the GPU machine has no network and no model files)."""

from __future__ import annotations

import json
from pathlib import Path


def make_random_model(config_path: str | Path, out_dir: str | Path, seed: int = 0, device: str = "cuda") -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(Path(config_path).read_text())
    config = AutoConfig.from_pretrained(out)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()

    write_tokenizer(config, out)
    return out


def write_tokenizer(config, out: Path) -> None:
    """A word-level tokenizer whose vocabulary ("t0".."tN") covers every id of `config`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": f"t{eos}", "unk_token": "t0",
        "model_max_length": config.max_position_embeddings,
    }))
