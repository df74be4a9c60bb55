"""Content hashes of checkpoint files (cwa_dist/modeling/file_hash.py), against hashlib over the bytes."""

import hashlib
import os
import shutil

import pytest

from cwa_dist.modeling import file_hash
from cwa_dist.modeling.file_hash import cached_sha256, content_digest


def _expected(directory, files):
    """The documented digest, computed independently: sha256 over 'name NUL sha256(bytes)' lines."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{hashlib.sha256((directory / name).read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    # Larger than one read block, so blockwise hashing is exercised.
    (d / "b.safetensors").write_bytes(os.urandom(file_hash.BLOCK + 12345))
    (d / "a.safetensors").write_bytes(os.urandom(1000))
    return d, ["b.safetensors", "a.safetensors"]


def test_the_digest_is_the_files_names_and_bytes(shards, tmp_path):
    d, files = shards
    cache = tmp_path / "cache.json"
    assert content_digest(d, files, cache) == _expected(d, files)
    moved = shutil.copytree(d, tmp_path / "elsewhere")  # the same bytes under the same names
    assert content_digest(moved, files, cache) == _expected(d, files)
    (moved / "a.safetensors").rename(moved / "c.safetensors")  # same bytes, another name
    assert content_digest(moved, ["b.safetensors", "c.safetensors"], cache) != _expected(d, files)


def test_an_unchanged_file_is_not_read_again_and_a_rewritten_one_is(shards, tmp_path, monkeypatch):
    d, files = shards
    cache = tmp_path / "cache.json"
    first = content_digest(d, files, cache)
    reads = []
    real = file_hash.sha256_of
    monkeypatch.setattr(file_hash, "sha256_of", lambda p: reads.append(p.name) or real(p))
    assert content_digest(d, files, cache) == first and reads == []
    data = bytearray((d / "a.safetensors").read_bytes())
    data[0] ^= 0x80
    (d / "a.safetensors").write_bytes(bytes(data))  # rewritten: a new modification time
    assert content_digest(d, files, cache) == _expected(d, files) != first
    assert reads == ["a.safetensors"]


def test_a_damaged_cache_is_hashed_again(shards, tmp_path):
    d, files = shards
    cache = tmp_path / "cache.json"
    cache.write_text("{not json")
    assert cached_sha256(d / "a.safetensors", cache) == hashlib.sha256((d / "a.safetensors").read_bytes()).hexdigest()
    assert content_digest(d, files, cache) == _expected(d, files)
