"""Engine images: an arena's bytes as one O_DIRECT-aligned file plus a JSON manifest.

    <store>/images/<model>-<key>/        0700; key = hash of (model folder, dtype, device)
        weights.bin                      0600; the arena, zero-padded to a multiple of 4096
        manifest.json                    0600; layout, start-up facts, checksum, fingerprint

The manifest is the commit record: it is renamed into place last, and it names the data's
size and per-block checksums, so a crash between the two renames reads as a corrupt image
(rebuilt), never as a good one. A stale image (fingerprint differs) is never run.

Exceptions:
    ImageError
     ├── ImageMissing     no manifest yet
     ├── ImageStale       made from other model files, another software stack or layout
     └── ImageCorrupt     unreadable manifest, truncated data, or a checksum mismatch

No torch here (the gateway imports this to delete an image); reading lives in image_reader.py.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from dormant.store import checksum
from dormant.store.paths import ensure_dir, store_root

log = logging.getLogger("dormant.store")

FORMAT = 2  # 2: wsum64 block checksums (1: sha256, which capped warm restores at ~10 GB/s)
DIRECT_ALIGN = 4096
BLOCK_BYTES = 16 << 20  # O_DIRECT reads of 16 MiB reached the disk's 1.85 GB/s (DESIGN.md §4)
CHECKSUM_ALGORITHM = checksum.ALGORITHM  # see checksum.py; verified on the GPU after a restore
_HASH_THREADS = 4  # the write hashes blocks (numpy, ~5 GB/s a core, GIL released) beside its writes
DATA_FILE, MANIFEST_FILE = "weights.bin", "manifest.json"
_VERSIONED_PACKAGES = ("dormant", "torch", "transformers", "triton", "safetensors")


class ImageError(RuntimeError):
    pass


class ImageMissing(ImageError):
    pass


class ImageStale(ImageError):
    pass


class ImageCorrupt(ImageError):
    pass


def padded(nbytes: int) -> int:
    return -(-nbytes // DIRECT_ALIGN) * DIRECT_ALIGN


def image_dir_for(model_dir: Path, dtype: str, device: str) -> Path:
    key = "|".join([str(Path(model_dir).resolve()), dtype, device])
    # not made here: a store that cannot be written to (a full disk) must not stop a worker's
    # start; `write` makes the folders, and its failure is the caller's to skip
    return store_root() / "images" / f"{Path(model_dir).name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


# ---- fingerprint ------------------------------------------------------------------------------


def model_files_fingerprint(model_dir: Path) -> list[dict[str, Any]]:
    """Name, size and mtime of every weight/config file; sha256 of each config file in full and
    of each safetensors *header* (names, dtypes, shapes, offsets), not of its data: hashing
    16 GB of weights costs ~10 s per start, more than the restore itself. A file rewritten in
    place with the same layout still changes its mtime, so it reads as stale (a `touch` then
    costs one rebuild: the safe side)."""
    out = []
    for path in sorted(Path(model_dir).iterdir()):
        if not path.is_file() or not path.name.endswith((".json", ".safetensors")):
            continue
        st = path.stat()
        entry: dict[str, Any] = {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if path.name.endswith(".safetensors"):
            with open(path, "rb") as f:
                head = f.read(8)
                (length,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
                entry["header_sha256"] = hashlib.sha256(head + f.read(length)).hexdigest()
        else:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        out.append(entry)
    return out


def software_versions() -> dict[str, str | None]:
    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def fingerprint(model_dir: Path, *, dtype: str, device: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an image was made from; any difference means rebuild. `extra`: the engine's own
    facts (CUDA runtime, driver, GPU name on GPU)."""
    return {"model_files": model_files_fingerprint(model_dir), "versions": software_versions(),
            "dtype": dtype, "device": device, **(extra or {})}


# ---- the image --------------------------------------------------------------------------------


@dataclass
class Manifest:
    nbytes: int
    layout: dict[str, Any]
    startup: dict[str, Any]
    checksum: dict[str, Any]
    fingerprint: dict[str, Any]
    created: str = ""
    format: int = FORMAT

    @property
    def file_bytes(self) -> int:
        return padded(self.nbytes)

    def to_json(self) -> str:
        return json.dumps({"format": self.format, "created": self.created, "data_file": DATA_FILE,
                           "nbytes": self.nbytes, "file_bytes": self.file_bytes, "layout": self.layout,
                           "startup": self.startup, "checksum": self.checksum,
                           "fingerprint": self.fingerprint}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        raw = json.loads(text)
        return cls(nbytes=int(raw["nbytes"]), layout=raw["layout"], startup=raw.get("startup", {}),
                   checksum=raw["checksum"], fingerprint=raw["fingerprint"], created=raw.get("created", ""),
                   format=int(raw["format"]))


class EngineImage:
    """One image folder. `check` says whether it may be used; `write` replaces it atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.data_path = self.folder / DATA_FILE
        self.manifest_path = self.folder / MANIFEST_FILE

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> Manifest:
        try:
            text = self.manifest_path.read_text()
        except FileNotFoundError:
            raise ImageMissing(f"no image at {self.folder}") from None
        try:
            manifest = Manifest.from_json(text)
        except (ValueError, KeyError, TypeError) as e:
            raise ImageCorrupt(f"{self.manifest_path}: unreadable manifest ({e})") from None
        if manifest.format != FORMAT:
            raise ImageStale(f"{self.manifest_path}: format {manifest.format}, this dormant reads {FORMAT}")
        return manifest

    def check(self, fingerprint: dict[str, Any], layout: dict[str, Any]) -> Manifest:
        """The manifest, if the image was made from these files, this stack and this layout,
        and its data file is whole; the checksum is verified later, while reading."""
        manifest = self.read_manifest()
        if manifest.fingerprint != fingerprint:
            diff = sorted(k for k in set(fingerprint) | set(manifest.fingerprint)
                          if fingerprint.get(k) != manifest.fingerprint.get(k))
            raise ImageStale(f"{self.folder}: fingerprint differs in {diff}")
        if manifest.layout != layout:
            raise ImageStale(f"{self.folder}: the arena layout differs")
        if manifest.checksum.get("algorithm") != CHECKSUM_ALGORITHM:
            raise ImageStale(f"{self.folder}: checksums by {manifest.checksum.get('algorithm')!r}, "
                             f"this dormant checks {CHECKSUM_ALGORITHM!r}")
        try:
            size = self.data_path.stat().st_size
        except FileNotFoundError:
            raise ImageCorrupt(f"{self.data_path}: missing") from None
        if size < manifest.file_bytes:
            raise ImageCorrupt(f"{self.data_path}: truncated ({size} of {manifest.file_bytes} bytes)")
        return manifest

    def write(self, address: int | Callable[[], int], nbytes: int, *, layout: dict[str, Any],
              startup: dict[str, Any], fingerprint: dict[str, Any], block_bytes: int = BLOCK_BYTES) -> Manifest:
        """Write `nbytes` from host memory at `address` (kept unchanged meanwhile), hashing each
        block as it goes; temp names, fsync of files and folder, then rename (manifest last).
        `address` may be a function that puts the bytes there and returns it, called once the
        file's blocks are taken (a full disk costs no copy)."""
        ensure_dir(self.folder.parent)
        self.folder.mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        self._remove_dead_temp_files()
        tag = f".tmp-{os.getpid()}"
        data_tmp = self.folder / (DATA_FILE + tag)
        manifest_tmp = self.folder / (MANIFEST_FILE + tag)
        try:
            fd = os.open(data_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _reserve(fd, padded(nbytes))
                if callable(address):
                    address = address()
                with ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="dormant-image-hash") as pool:
                    sums = []
                    for start in range(0, nbytes, block_bytes):
                        n = min(block_bytes, nbytes - start)
                        block = memoryview((ctypes.c_char * n).from_address(address + start)).cast("B")
                        if start + n == nbytes and padded(nbytes) != nbytes:
                            block = memoryview(bytes(block) + bytes(padded(nbytes) - nbytes))
                        sums.append(pool.submit(checksum.block_checksum, block[:n]))
                        view = block
                        while view:
                            view = view[os.write(fd, view):]
                    digests = [s.result() for s in sums]
                os.fsync(fd)
            finally:
                os.close(fd)
            manifest = Manifest(
                nbytes=nbytes, layout=layout, startup=startup, fingerprint=fingerprint,
                checksum={"algorithm": CHECKSUM_ALGORITHM, "block_bytes": block_bytes, "blocks": digests},
                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            )
            _write_private(manifest_tmp, manifest.to_json().encode())
            os.replace(data_tmp, self.data_path)
            os.replace(manifest_tmp, self.manifest_path)
            _fsync_dir(self.folder)
        except BaseException:
            for tmp in (data_tmp, manifest_tmp):
                tmp.unlink(missing_ok=True)
            raise
        return manifest

    def _remove_dead_temp_files(self) -> None:
        """A writer killed mid-write (a worker stopped at once) leaves its temp files."""
        for tmp in self.folder.glob("*.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                tmp.unlink(missing_ok=True)

    def delete(self) -> None:
        """Remove the image (the manifest first, so a reader never sees data without one)."""
        self.manifest_path.unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)


def _reserve(fd: int, nbytes: int) -> None:
    """Take the file's blocks before writing any: a disk too small fails at once with ENOSPC,
    and writers running together cannot overcommit it (on the H200 four 16 GB images were
    written at once into 40 GB, each failed after ~20 s of writing and the workers' stops
    waited for them). A filesystem without fallocate is written as before."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def delete_image(folder: Path) -> bool:
    """Delete an image folder named by a worker (the gateway's stop tier). Refuses anything
    that is not an image folder under an `images` directory."""
    folder = Path(folder)
    if folder.parent.name != "images" or not any((folder / n).exists() for n in (MANIFEST_FILE, DATA_FILE)):
        log.warning("not deleting %s: not an engine image folder", folder)
        return False
    EngineImage(folder).delete()
    return True
