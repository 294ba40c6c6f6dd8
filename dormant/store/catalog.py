"""What models are on disk: imported into the store, or downloaded into the HF cache.

No torch here: `dormant list` runs it.
"""

from __future__ import annotations

from pathlib import Path

from dormant.store.paths import store_root


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def local_models(store: Path | None = None) -> list[tuple[str, Path, int]]:
    """(name, folder, bytes) for each imported model and each cached HF repo."""
    found: list[tuple[str, Path, int]] = []
    models_dir = store_root(store) / "models"
    if models_dir.is_dir():
        for folder in sorted(models_dir.iterdir()):
            if (folder / "config.json").is_file():
                found.append((folder.name, folder, _folder_size(folder)))
    try:
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir()
    except Exception:  # no cache yet, or an unreadable one: nothing to list
        return found
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type == "model":
            found.append((repo.repo_id, repo.repo_path, repo.size_on_disk))
    return found
