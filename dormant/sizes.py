"""Sizes as dormant.yaml writes them: `8GiB`, `512MiB`, `20GB`, `1.5TiB`, a bare number of
bytes, or a share of a whole (`80%`, where the key allows one). Also `32768 tokens` for a KV
allotment. A bad value raises `SizeError` naming the key; config.py re-raises it as a
ConfigError.
"""

from __future__ import annotations

import re
from typing import Any

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_TOKENS = re.compile(r"^\s*(\d+)\s*tokens?\s*$", re.IGNORECASE)
_SHARE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")

GiB = 2**30


class SizeError(ValueError):
    """Not a size; the message names the key."""


def parse_bytes(value: Any, key: str) -> int:
    """Bytes from `8GiB`, `500MB`, `1024` (an int or a digit string); > 0."""
    if isinstance(value, bool):
        raise SizeError(f"{key}: expected a size like 8GiB or 500MB, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(str(value))
        if m is None:
            raise SizeError(f"{key}: expected a size like 8GiB, 500MB or a number of bytes, got {value!r}")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    if n <= 0:
        raise SizeError(f"{key}: expected a size above 0, got {value!r}")
    return n


def parse_share(value: Any) -> float | None:
    """`80%` -> 0.8; None when `value` is not a percentage."""
    m = _SHARE.match(str(value)) if isinstance(value, str) else None
    if m is None:
        return None
    return float(m.group(1)) / 100


def parse_tokens(value: Any) -> int | None:
    """`32768 tokens` -> 32768; None when `value` is not a token count."""
    m = _TOKENS.match(value) if isinstance(value, str) else None
    return int(m.group(1)) if m else None


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
