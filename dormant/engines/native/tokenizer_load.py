"""The worker's tokenizer: transformers' AutoTokenizer, without its second parse of tokenizer.json.

    tokenizer = load_tokenizer(model_dir)

Where tokenizer_config.json lists no `added_tokens_decoder` (SmolLM2, and any repo saved before
transformers wrote one), transformers takes them from tokenizer.json's "added_tokens" by parsing
the whole file with Python's json module (0.26 s for SmolLM2's 3.5 MB on 2 cores) before the
tokenizers library parses it again. That one C call holds the GIL throughout, and a GPU restore
runs its Python beside the tokenizer's load (bench/NOTES-hibernate.md). Here only the top-level
keys up to "added_tokens" are decoded (HF writes them first: version, truncation, padding,
added_tokens, ..., model last), and the tokens reach transformers as `added_tokens_decoder`,
built exactly as its own legacy path builds them. Anything else (legacy special_tokens_map.json
or added_tokens.json beside, "added_tokens" after the model, a file that does not parse) leaves
the whole load to transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    added = added_tokens_decoder(Path(model_dir))
    if added is None:
        return AutoTokenizer.from_pretrained(model_dir)
    return AutoTokenizer.from_pretrained(model_dir, added_tokens_decoder=added)


def added_tokens_decoder(model_dir: Path) -> dict[int, Any] | None:
    """{id: AddedToken} from tokenizer.json's "added_tokens" where transformers would parse the
    whole file for them; None where it would not (or where we cannot tell cheaply)."""
    tokenizer_file = model_dir / "tokenizer.json"
    config_file = model_dir / "tokenizer_config.json"
    if not tokenizer_file.is_file() or not config_file.is_file():
        return None
    if (model_dir / "special_tokens_map.json").exists() or (model_dir / "added_tokens.json").exists():
        return None  # transformers' legacy path reads those too
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "added_tokens_decoder" in config:
        return None
    try:
        tokens = leading_value(tokenizer_file.read_text(encoding="utf-8"), "added_tokens")
    except (OSError, ValueError):
        return None
    if not isinstance(tokens, list):
        return None
    from tokenizers import AddedToken

    decoder = {}
    for serialized in tokens:
        if not isinstance(serialized, dict) or "id" not in serialized:
            return None
        fields = dict(serialized)
        token_id = fields.pop("id")
        decoder[token_id] = AddedToken(**fields)
    return decoder


def leading_value(text: str, key: str, stop_at: str = "model") -> Any:
    """The value of top-level `key` in the JSON object `text`, decoding only the members before
    it; ValueError if it is not there before `stop_at` (or the text is not such an object)."""
    pos = _skip(text, 0)
    if not text.startswith("{", pos):
        raise ValueError("not a JSON object")
    pos += 1
    while True:
        pos = _skip(text, pos)
        name, pos = _DECODER.raw_decode(text, pos)
        if not isinstance(name, str):
            raise ValueError("a member name that is not a string")
        pos = _skip(text, pos)
        if not text.startswith(":", pos):
            raise ValueError("no ':' after a member name")
        if name == stop_at:
            raise ValueError(f"{key!r} not before {stop_at!r}")
        value, pos = _DECODER.raw_decode(text, _skip(text, pos + 1))
        if name == key:
            return value
        pos = _skip(text, pos)
        if not text.startswith(",", pos):
            raise ValueError(f"no {key!r} in the object")
        pos += 1


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos
