"""What the gateway says about a model without starting it, read from its folder (or, for an
engine that reads GGUF as it is, from the GGUF's header): the context length, size, family,
parameter count, chat template. For /v1/models (`max_model_len`), Ollama's /api/tags, /api/show
and /api/ps.

`max_model_len` is the running worker's own figure where one runs (a CUDA worker may shrink it
to its KV cache), remembered after; before any start it is what the model's engine will use:
engine_args.max_model_len, else the config's max_position_embeddings capped at the engine's
default_max_model_len (8192 native, 2048 llama.cpp; engines/base.py).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from dormant.config import ModelSpec
from dormant.engines.base import get_engine
from dormant.lifecycle.controller import ReplicaController
from dormant.protocol import ModelCard
from dormant.store.gguf_header import read_header
from dormant.store.models import local_folder, local_gguf

# safetensors dtype -> Ollama's quantization_level spelling
_LEVELS = {"BF16": "BF16", "F16": "F16", "F32": "F32", "F8_E4M3": "F8", "I8": "Q8_0"}
# a GGUF's general.file_type (llama.cpp's llama_ftype) -> the same spelling
_GGUF_LEVELS = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
                11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
                17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


@dataclass(frozen=True)
class FolderInfo:
    folder: Path
    config: dict[str, Any]
    size: int
    modified: float
    parameter_count: int
    dtype: str | None
    chat_template: str | None
    digest: str
    format: str = "safetensors"


def model_info(spec: ModelSpec) -> FolderInfo | None:
    """What the model's engine serves: the GGUF for one that reads it as it is (the dequantized
    folder may not exist, and its figures are not the served file's), else the folder."""
    if get_engine(spec.engine).reads_gguf:
        return gguf_info(spec.source)
    return folder_info(spec.source)


@functools.lru_cache(maxsize=64)
def gguf_info(source: str) -> FolderInfo | None:
    path = local_gguf(source)
    if path is None:
        return None
    header = read_header(path)
    meta, stat = header.metadata, path.stat()
    arch = meta.get("general.architecture") or ""
    config = {"model_type": arch, "max_position_embeddings": meta.get(f"{arch}.context_length")}
    return FolderInfo(folder=path.parent, config=config, size=stat.st_size, modified=stat.st_mtime,
                      parameter_count=header.parameter_count, dtype=_GGUF_LEVELS.get(meta.get("general.file_type")),
                      chat_template=meta.get("tokenizer.chat_template"), format="gguf",
                      digest=hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest())


@functools.lru_cache(maxsize=64)
def folder_info(source: str) -> FolderInfo | None:
    """None while the model is not on disk (an HF repo not downloaded yet)."""
    folder = local_folder(source)
    if folder is None:
        return None
    config_bytes = (folder / "config.json").read_bytes()
    files = [f for f in folder.rglob("*") if f.is_file()]
    count, dtypes = _safetensors_parameters(folder)
    return FolderInfo(folder=folder, config=json.loads(config_bytes), size=sum(f.stat().st_size for f in files),
                      modified=max((f.stat().st_mtime for f in files), default=0.0), parameter_count=count,
                      dtype=dtypes.most_common(1)[0][0] if dtypes else None, chat_template=_chat_template(folder),
                      digest=hashlib.sha256(config_bytes + str(folder).encode()).hexdigest())


def _safetensors_parameters(folder: Path) -> tuple[int, Counter]:
    """Parameters counted from the safetensors headers alone (8-byte length, then JSON)."""
    total, dtypes = 0, Counter()
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for dim in tensor["shape"]:
                n *= dim
            total += n
            dtypes[tensor["dtype"]] += n
    return total, dtypes


def _chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    return template if isinstance(template, str) else None


def configured_max_model_len(spec: ModelSpec) -> int | None:
    if isinstance(spec.engine_args.get("max_model_len"), int):
        return spec.engine_args["max_model_len"]
    cap = get_engine(spec.engine).default_max_model_len
    info = model_info(spec)
    if info is None:
        return None
    return min(int(info.config.get("max_position_embeddings") or cap), cap)


async def max_model_len(replica: ReplicaController, seen: dict[str, int]) -> int | None:
    """The running worker's figure (remembered in `seen`), else the configured one."""
    snap = replica.snapshot()
    if snap.client is not None and snap.state.value == "ready":
        try:
            stats = await snap.client.stats(timeout=2.0)
        except (httpx.HTTPError, RuntimeError):
            stats = None
        if stats is not None and stats.max_model_len:
            seen[replica.spec.id] = stats.max_model_len
    return seen.get(replica.spec.id) or configured_max_model_len(replica.spec)


async def model_card(request: Any, replica: ReplicaController) -> ModelCard:
    """/v1/models' entry for `replica`, with `max_model_len` (vLLM's field)."""
    return ModelCard(id=replica.spec.id, created=request.app.state.created,
                     max_model_len=await max_model_len(replica, request.app.state.max_model_lens))


def _size_label(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + unit
    return str(n)


def ollama_details(info: FolderInfo | None) -> dict[str, Any]:
    family = (info.config.get("model_type") if info else None) or ""
    return {"parent_model": "", "format": info.format if info else "", "family": family, "families": [family] if family else None,
            "parameter_size": _size_label(info.parameter_count) if info else "",
            "quantization_level": _LEVELS.get(info.dtype or "", info.dtype or "") if info else ""}


def iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_tag(spec: ModelSpec) -> dict[str, Any]:
    info = model_info(spec)
    return {"name": spec.id, "model": spec.id, "modified_at": iso(info.modified if info else 0.0),
            "size": info.size if info else 0, "digest": info.digest if info else "", "details": ollama_details(info)}


def ollama_show(spec: ModelSpec, context_length: int | None) -> dict[str, Any]:
    info = model_info(spec)
    family = (info.config.get("model_type") if info else None) or "unknown"
    template = (info.chat_template if info else None) or ""
    facts = {"general.architecture": family, "general.parameter_count": info.parameter_count if info else 0,
             f"{family}.context_length": context_length}
    capabilities = ["completion"] + (["tools"] if "tools" in template else [])
    return {"modelfile": f"FROM {spec.source}\n", "parameters": "", "template": template,
            "details": ollama_details(info), "model_info": facts, "capabilities": capabilities,
            "modified_at": iso(info.modified if info else 0.0)}
