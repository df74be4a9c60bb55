"""Content hashes of files, and of a checkpoint directory's weights.

A run records what it analysed by content, not only by name: a local checkpoint's digest is the
sha256 of its files' names and bytes. Hashing reads every byte once, which for a 70B checkpoint
takes minutes, so each file's hash is remembered in the cache, keyed by its path, size,
modification time and inode: a file written again gets a new hash; an untouched one is not read
again. Pure Python: no torch, no Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

BLOCK = 1 << 22


def cache_root() -> Path:
    """cwa_dist's cache: converted checkpoints, the test model, remembered hashes."""
    return Path(os.environ.get("CWA_DIST_CACHE", Path.home() / ".cache" / "cwa_dist"))


def hash_cache() -> Path:
    return cache_root() / "file_hashes.json"


def sha256_of(path: Path) -> str:
    """sha256 of the file's bytes, read once in blocks (never whole into memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def cached_sha256(path: Path, cache_file: Path) -> str:
    """sha256_of(path), from `cache_file` where the file is unchanged since it was hashed."""
    from filelock import FileLock

    key = str(path.resolve())
    with FileLock(str(cache_file) + ".lock"):
        known = _read(cache_file)
        entry = known.get(key)
        if entry and entry.get("stamp") == _stamp(path):
            return entry["sha256"]
    digest = sha256_of(path)  # outside the lock: other runs need not wait for a long read
    with FileLock(str(cache_file) + ".lock"):
        known = _read(cache_file)
        known[key] = {"stamp": _stamp(path), "sha256": digest}
        tmp = cache_file.with_name(f"{cache_file.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
        os.replace(tmp, cache_file)
    return digest


def _read(cache_file: Path) -> dict:
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: hash again
    return known if isinstance(known, dict) else {}


def content_digest(directory: Path, files: list[str], cache_file: Path,
                   announce: Callable[[str], None] = lambda _: None) -> str:
    """sha256 over each file's name and content hash, in name order: the same bytes under the
    same names give the same digest, wherever the directory lies."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    known = _read(cache_file)
    unhashed = [f for f in files if known.get(str((directory / f).resolve()), {}).get("stamp")
                != _stamp(directory / f)]
    size = sum((directory / f).stat().st_size for f in unhashed)
    if size > 1 << 30:
        announce(f"🔐 Hashing {size / 2**30:.1f} GiB of weights in {directory}, once (remembered in {cache_file})")
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{cached_sha256(directory / name, cache_file)}\n".encode())
    return h.hexdigest()
