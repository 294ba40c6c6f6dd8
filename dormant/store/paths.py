"""Where dormant keeps things on local disk.

    <root>/models/<name>/        imported model folders (config.json, model.safetensors, tokenizer)
    <root>/images/<name>-<hash>/ engine images (weight backups written for sleep)
    <root>/run/<kind>-<pid>-<tag>/ runtime files of the gateway <pid> (the zygote's socket)

<root> is decided by `store_root` alone: the config's `store` (or `--store`), else
``$DORMANT_HOME``, else ``~/.dormant``. The gateway passes its root to workers as DORMANT_HOME.
Folders are created 0700: they hold private weights.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

# AF_UNIX paths are at most 107 bytes on Linux (sun_path is 108 with its NUL)
MAX_SOCKET_PATH = 107


def store_root(store: str | os.PathLike | None = None) -> Path:
    """The store's root: `store` where the config names one, else $DORMANT_HOME or ~/.dormant."""
    chosen = store if store is not None else os.environ.get("DORMANT_HOME") or Path.home() / ".dormant"
    return Path(chosen).expanduser()


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def models_dir() -> Path:
    return ensure_dir(store_root() / "models")


def model_dir(name: str) -> Path:
    """Folder of an imported model (it may not exist yet)."""
    return models_dir() / name


def runtime_folder(kind: str, root: Path | None = None, longest_name: str = "") -> Path:
    """A new 0700 folder for this process's runtime files, under <root>/run/, named after
    `kind` and this pid so that `clean_stale_runtime` can tell when its owner is gone (a
    SIGKILL leaves nothing in /tmp: issue 15, item 9). Where <root>/run/<folder>/<longest_name>
    would not fit in a Unix socket's path, a private folder in the system's temp dir instead."""
    run = ensure_dir((root or store_root()) / "run")
    run.chmod(0o700)  # made by an older version, or by hand
    folder = run / f"{kind}-{os.getpid()}-{secrets.token_hex(3)}"
    if len(str(folder / longest_name).encode()) > MAX_SOCKET_PATH:
        return Path(tempfile.mkdtemp(prefix=f"dormant-{kind}-"))
    folder.mkdir(mode=0o700)
    return folder


def clean_stale_runtime(root: Path | None = None) -> list[Path]:
    """Remove the runtime folders under <root>/run/ whose process is gone; the removed ones."""
    run = (root or store_root()) / "run"
    removed = []
    for entry in run.iterdir() if run.is_dir() else ():
        pid = _owner_pid(entry.name)
        if pid is not None and not _is_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _owner_pid(name: str) -> int | None:
    parts = name.split("-")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to judge
        return True
    return True
