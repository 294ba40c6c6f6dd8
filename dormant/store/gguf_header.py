"""The scalar metadata of a GGUF file's header, read without the `gguf` package's reader: that
one parses every array and tensor description (3.9 s for SmolLM2's 49,152-token vocabulary on
the 2-core machine), and the gateway wants a few numbers (layers, KV heads, context length) to
size a replica before it starts.

    meta = read_metadata(path)        # {"general.architecture": "llama", "llama.block_count": 30, ...}
    shape = KVShape.of(meta)          # layers, KV heads, head size, trained context
    header = read_header(path)        # the metadata and the parameter count (tensor shapes)

Arrays are skipped (their length is all that is read, plus each string's for string arrays).
GGUFHeaderError for a file that is not GGUF v2/v3.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

_MAGIC = b"GGUF"
# GGUF value types: uint8, int8, uint16, int16, uint32, int32, float32, bool, string, array,
# uint64, int64, float64
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFHeaderError(ValueError):
    pass


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, Any]  # every scalar and string key; arrays are left out
    parameter_count: int  # the elements of every tensor


def read_metadata(path: str | Path) -> dict[str, Any]:
    return read_header(path, with_tensors=False).metadata


def read_header(path: str | Path, with_tensors: bool = True) -> GGUFHeader:
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise GGUFHeaderError(f"{path} is not a GGUF file")
        version, tensors, count = struct.unpack("<IQQ", f.read(20))
        if version not in (2, 3):
            raise GGUFHeaderError(f"{path}: GGUF version {version} (2 and 3 are read)")
        meta: dict[str, Any] = {}
        for _ in range(count):
            key = _string(f)
            kind = _unpack(f, "<I")
            if kind == _ARRAY:
                _skip_array(f)
            else:
                meta[key] = _value(f, kind)
        parameters = 0
        for _ in range(tensors if with_tensors else 0):  # name, dims, their sizes, type, offset
            f.seek(_unpack(f, "<Q"), 1)
            n = 1
            for _ in range(_unpack(f, "<I")):
                n *= _unpack(f, "<Q")
            f.seek(12, 1)
            parameters += n
        return GGUFHeader(meta, parameters)


@dataclass(frozen=True)
class KVShape:
    """What one token's KV cache entry takes: layers x KV heads x (key + value) head sizes."""

    num_layers: int
    num_kv_heads: int
    key_size: int
    value_size: int
    context_length: int | None

    @classmethod
    def of(cls, meta: dict[str, Any]) -> "KVShape":
        arch = meta.get("general.architecture", "llama")

        def get(name: str, default=None):
            return meta.get(f"{arch}.{name}", default)

        heads = get("attention.head_count") or 1
        head_size = (get("embedding_length") or 0) // heads
        return cls(num_layers=get("block_count") or 0, num_kv_heads=get("attention.head_count_kv") or heads,
                   key_size=get("attention.key_length") or head_size,
                   value_size=get("attention.value_length") or head_size,
                   context_length=get("context_length"))

    def bytes_per_token(self, itemsize: int) -> int:
        return self.num_layers * self.num_kv_heads * (self.key_size + self.value_size) * itemsize


def _unpack(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise GGUFHeaderError("the GGUF header ends early")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    n = _unpack(f, "<Q")
    data = f.read(n)
    if len(data) != n:
        raise GGUFHeaderError("the GGUF header ends early")
    return data.decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind == _STRING:
        return _string(f)
    if kind not in _SCALAR:
        raise GGUFHeaderError(f"unknown GGUF value type {kind}")
    return _unpack(f, _SCALAR[kind])


def _skip_array(f: BinaryIO) -> None:
    kind, n = _unpack(f, "<I"), _unpack(f, "<Q")
    if kind == _STRING:
        for _ in range(n):
            f.seek(_unpack(f, "<Q"), 1)
    elif kind == _ARRAY:
        for _ in range(n):
            _skip_array(f)
    elif kind in _SCALAR:
        f.seek(n * struct.calcsize(_SCALAR[kind]), 1)
    else:
        raise GGUFHeaderError(f"unknown GGUF array type {kind}")
