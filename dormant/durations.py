"""Durations as Ollama writes them (`30s`, `5m`, `1h`, `0`, `-1`), in seconds.

The idle tiers of dormant.yaml and a request's `keep_alive` share this syntax. A bad value
raises `DurationError` naming the key; config.py re-raises it as a ConfigError, the gateway as
a 400 on `keep_alive`.
"""

from __future__ import annotations

import math
import re
from typing import Any

NEVER = -1.0  # a duration of "-1": the timer never fires (Ollama's keep_alive=-1)
# longer than this is never: a deadline past year 9999 broke /running (issue 15, item 6)
MAX_SECONDS = 100 * 365 * 24 * 3600.0

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class DurationError(ValueError):
    """Not a duration; the message names the key."""


def parse_duration(value: Any, key: str = "duration") -> float:
    """Seconds from an Ollama-style duration: `30s`, `5m`, `1h`, `0` (at once), `-1` (never).

    A bare number means seconds. Any negative value, and any beyond MAX_SECONDS, means never;
    NaN is refused (it compares false with every deadline, so a timer fired at once).
    """
    if isinstance(value, bool):
        raise DurationError(f"{key}: expected a duration like 30s, 5m, 0 or -1, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise DurationError(f"{key}: expected a duration like 30s, 5m, 0 or -1, got {value!r}")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if math.isnan(seconds):
        raise DurationError(f"{key}: expected a duration like 30s, 5m, 0 or -1, got {value!r}")
    return NEVER if seconds < 0 or seconds > MAX_SECONDS else seconds


def format_duration(seconds: float) -> str:
    if seconds < 0:
        return "never"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"
