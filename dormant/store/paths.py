"""Where dormant keeps things on local disk.

    <root>/models/<name>/        imported model folders (config.json, model.safetensors, tokenizer)
    <root>/images/<name>-<hash>/ engine images (weight backups written for sleep)

<root> is ``$DORMANT_HOME`` or ``~/.dormant``. Folders are created 0700: they hold private weights.
"""

from __future__ import annotations

import os
from pathlib import Path


def store_root() -> Path:
    return Path(os.environ.get("DORMANT_HOME") or Path.home() / ".dormant").expanduser()


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
