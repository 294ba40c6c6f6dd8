"""The worker's tokenizer: transformers' AutoTokenizer, without its second parse of tokenizer.json,
and preloaded where the worker is a standby that does not know its model yet.

    preload(sources)                    # standby worker: every GPU model's, in a thread
    tokenizer = load_tokenizer(model_dir)   # the preloaded one if its files are unchanged

A tokenizer's load (0.35-0.5 s for Qwen3's, most of it one GIL hold) ran beside a GPU restore's
own Python and delayed it by about as much (bench/README.md, "Restore: the tokenizer"); a standby worker has
idle time for it before its claim.

Where tokenizer_config.json lists no `added_tokens_decoder` (SmolLM2, and any repo saved before
transformers wrote one), transformers takes them from tokenizer.json's "added_tokens" by parsing
the whole file with Python's json module (0.26 s for SmolLM2's 3.5 MB on 2 cores) before the
tokenizers library parses it again. That one C call holds the GIL throughout, and a GPU restore
runs its Python beside the tokenizer's load (bench/README.md, "Restore: the tokenizer"). Here only the top-level
keys up to "added_tokens" are decoded (HF writes them first: version, truncation, padding,
added_tokens, ..., model last), and the tokens reach transformers as `added_tokens_decoder`,
built exactly as its own legacy path builds them. Anything else (legacy special_tokens_map.json
or added_tokens.json beside, "added_tokens" after the model, a file that does not parse) leaves
the whole load to transformers.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

log = logging.getLogger("dormant.worker")

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"
_lock = threading.Lock()
_preloaded: dict[Path, Future] = {}  # folder -> future of (files_stamp, tokenizer)
_stop = threading.Event()  # set once a worker loads its own: the preloads still pending stop


def load_tokenizer(model_dir: Path):
    """The folder's tokenizer: preloaded (by a standby worker, `preload`) if its files have not
    changed since, else loaded now. A worker serves one model: other preloads are dropped."""
    key = Path(model_dir).resolve()
    with _lock:
        _stop.set()
        preloaded = _preloaded.pop(key, None)
        _preloaded.clear()
    if preloaded is not None and not preloaded.cancelled():
        try:
            stamp, tokenizer = preloaded.result()  # waits if it is loading right now
        except Exception:  # noqa: BLE001 - the preload failed: load it here and see why
            pass
        else:
            if stamp == files_stamp(key):
                log.info("tokenizer of %s preloaded by the standby worker", key)
                return tokenizer
    return _load(key)


def preload(sources: list[str]) -> threading.Thread:
    """Load the tokenizers of these model sources in a background thread, those already on
    disk (store.models.local_folder), for a worker that does not know its model yet."""

    _stop.clear()

    def run() -> None:
        from dormant.store.models import local_folder

        planned = []
        with _lock:
            for source in sources:
                try:
                    folder = local_folder(source)
                except Exception:  # noqa: BLE001 - a source that does not resolve is left to its worker
                    folder = None
                if folder is not None and not _stop.is_set():
                    future: Future = Future()
                    _preloaded[folder.resolve()] = future
                    planned.append((folder.resolve(), future))
        for folder, future in planned:
            if _stop.is_set() or not future.set_running_or_notify_cancel():
                future.cancel()
                continue
            try:
                stamp = files_stamp(folder)
                future.set_result((stamp, _load(folder)))
            except BaseException as e:  # noqa: BLE001 - the worker loads it again and reports
                future.set_exception(e)

    thread = threading.Thread(target=run, name="dormant-tokenizer-preload", daemon=True)
    thread.start()
    return thread


def files_stamp(folder: Path) -> tuple:
    """Name, size and mtime of the folder's tokenizer-side files: a preload is stale if any
    changed."""
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix in (".json", ".jinja", ".model", ".txt") and path.is_file():
            st = path.stat()
            out.append((path.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _load(model_dir: Path):
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
