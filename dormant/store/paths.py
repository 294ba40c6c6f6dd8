"""Where dormant keeps things on local disk.

    <root>/models/<name>/        imported model folders (config.json, model.safetensors, tokenizer)
    <root>/images/<name>-<hash>/ engine images (weight backups written for sleep)

<root> is decided by `store_root` alone: the config's `store` (or `--store`), else
``$DORMANT_HOME``, else ``~/.dormant``. The gateway passes its root to workers as DORMANT_HOME.
Folders are created 0700: they hold private weights.
"""

from __future__ import annotations

import os
from pathlib import Path


def store_root(store: str | os.PathLike | None = None) -> Path:
    """The store's root: `store` where the config names one, else $DORMANT_HOME or ~/.dormant."""
    chosen = store if store is not None else os.environ.get("DORMANT_HOME") or Path.home() / ".dormant"
    return Path(chosen).expanduser()


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def models_dir() -> Path:
    return ensure_dir(store_root() / "models")


def images_dir() -> Path:
    return ensure_dir(store_root() / "images")


def model_dir(name: str) -> Path:
    """Folder of an imported model (it may not exist yet)."""
    return models_dir() / name
