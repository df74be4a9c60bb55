"""Convert a model that is not in safetensors (a .gguf file, or a directory with only pickle
files) into a cached safetensors directory, once per node.

The cache entry is keyed by the source's content hash and the converter's version, written
under a temporary name and renamed into place, guarded by a file lock so that concurrent
processes on one node convert once, and checked on every use against the sizes and hashes it
recorded: a corrupted entry is rebuilt, not trusted. The conversion itself runs in a child
process, so the process asking for it (the driver) never holds the model.

    python -m cwa_dist.modeling.convert gguf|pickle SOURCE DEST     # what the child process runs
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cwa_dist.errors import UsageError, one_line
from cwa_dist.modeling.file_hash import cache_root, sha256_of

CONVERTER_VERSION = 1
MANIFEST = "cwa_dist_conversion.json"


def source_key(kind: str, files: list[Path]) -> str:
    """Content hash of the source files (names and bytes) and the converter's version."""
    h = hashlib.sha256(f"{kind}:v{CONVERTER_VERSION}".encode())
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode())
        h.update(sha256_of(f).encode())
    return h.hexdigest()


def _record(entry: Path, source: Path, key: str) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
             for p in sorted(entry.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"converter_version": CONVERTER_VERSION, "source": str(source), "source_key": key, "files": files}
    (entry / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def verify(entry: Path) -> str | None:
    """None if the entry holds exactly the files it recorded, else what is wrong."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable record of its files"
    for name, want in manifest["files"].items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"] or sha256_of(path) != want["sha256"]:
            return f"{name} does not match its recorded hash"
    return None


def _entry(kind: str, source: Path, files: list[Path]) -> tuple[Path, str]:
    """Where `source`'s conversion is cached, and its key."""
    key = source_key(kind, files)
    return cache_root() / "checkpoints" / f"{source.name.removesuffix('.gguf')}-{key[:16]}", key


def cached(kind: str, source: Path, files: list[Path]) -> Path | None:
    """`source`'s cached safetensors directory if an earlier run converted it and its files are
    intact, else None; converts nothing. An entry is renamed into place whole, so one that exists
    is complete."""
    entry, _ = _entry(kind, source, files)
    return entry if entry.is_dir() and verify(entry) is None else None


def converted(kind: str, source: Path, files: list[Path], *, announce: Callable[[str], None]) -> Path:
    """The cached safetensors directory for `source`, converting it first if needed."""
    from filelock import FileLock

    entry, key = _entry(kind, source, files)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if entry.is_dir():
            problem = verify(entry)
            if problem is None:
                announce(f"✅ Reusing the converted checkpoint {entry} (no conversion)")
                return entry
            announce(f"⚠️  The cached conversion {entry} is corrupt ({problem}); converting again")
            shutil.rmtree(entry)
        announce(f"🔄 Converting {source} to safetensors, once (cached in {entry})")
        tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "cwa_dist.modeling.convert", kind, str(source), str(tmp)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"exit code {proc.returncode}"
            what = "GGUF file" if kind == "gguf" else "pickle checkpoint"
            raise UsageError(f"cannot read {what} {source} (corrupt, truncated or unsupported?): {reason}")
        _record(tmp, source, key)
        os.replace(tmp, entry)
    return entry


def _convert(kind: str, source: Path, dest: Path) -> None:
    """Load with transformers, write safetensors, config and tokenizer into `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "gguf":
        where, extra = source.parent, {"gguf_file": source.name}
    else:  # pickle files only: read without running code from them
        where, extra = source, {"use_safetensors": False}
    net = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32 if kind == "gguf" else "auto", **extra)
    if kind == "gguf":
        # The weights are dequantised into plain float32 tensors already; the GGUF "quantizer" left
        # on the model is only a marker, and it makes save_pretrained refuse.
        net.hf_quantizer = None
        if hasattr(net.config, "quantization_config"):
            del net.config.quantization_config
    net.save_pretrained(dest, max_shard_size="2GB")
    AutoTokenizer.from_pretrained(where, **({"gguf_file": source.name} if kind == "gguf" else {})).save_pretrained(dest)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    kind, source, dest = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    try:
        _convert(kind, source, dest)
    except Exception as e:  # one line for the parent to show
        print(f"{type(e).__name__}: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
