"""A safetensors checkpoint directory, read one tensor, or one slice of one, at a time.

This is how every process gets its weights: the driver reads only headers (names, shapes,
dtypes); a gradient rank reads only its own partition of each parameter; an evaluation actor
reads one tensor at a time into its replica. Reads are plain positioned reads of exactly the
bytes asked for, straight into a new tensor: no memory map, whose touched pages would count in
the process's resident memory until unmapped. The format is safetensors: 8 bytes of header
length, a JSON header (dtype, shape, byte offsets of each tensor), then the data, little-endian.
Pure torch: no Ray, no transformers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from cwa_dist.errors import UsageError

INDEX = "model.safetensors.index.json"


class _Sized:
    """numel and nbytes of a record with a shape and a dtype."""

    __slots__ = ()
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class TensorInfo(_Sized):
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    offset: int  # of the tensor's first byte in its file


@dataclass(frozen=True, slots=True)
class Segment:
    """Elements [start, start + length) of stored tensor `key`, flattened."""

    key: str
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class FusedInfo(_Sized):
    """A tensor the checkpoint does not store whole: the concatenation of `segments`, reshaped."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    segments: tuple[Segment, ...]


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 2 <= size <= 100_000_000:
            raise UsageError(f"{path} is not a safetensors file (header length {size})")
        try:
            return json.loads(f.read(size)), 8 + size
        except ValueError as e:
            raise UsageError(f"{path} has a corrupt safetensors header ({e})") from None


def read_into(f, buffer: memoryview) -> int:
    """Fill `buffer` from the unbuffered file `f`; returns the bytes read (fewer only at the end of
    the file). One readinto is one read(2), which Linux caps at 2,147,479,552 bytes, and which
    may return less than asked for anyway: loop until full or at the end of the file."""
    done = 0
    while done < len(buffer):
        got = f.readinto(buffer[done:])
        if not got:
            break
        done += got
    return done


class Checkpoint:
    """The tensors of a directory of safetensors files (one file, or shards with an index)."""

    def __init__(self, path: str | Path, headers: dict[str, dict] | None = None):
        """The checkpoint in directory `path`, its headers read from its files; or, with `headers`
        (file name → its safetensors header, as the Hub serves them to range requests), the
        tensors those describe, for a process that only needs names, shapes and dtypes."""
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.fused: dict[str, FusedInfo] = {}  # added by a loader that follows a model's conversions
        self._open: dict[str, object] = {}
        if headers is not None:
            for file, header in headers.items():
                self._add(file, header, data_start=0, size=None)
            return
        for file in self._files():
            path = self.path / file
            if not path.is_file():
                raise UsageError(f"{path} is missing (the checkpoint's index names it)")
            header, data_start = _read_header(path)
            self._add(file, header, data_start, path.stat().st_size)

    def _add(self, file: str, header: dict, data_start: int, size: int | None) -> None:
        where = self.path / file
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = _DTYPES.get(meta["dtype"])
            if dtype is None:
                raise UsageError(f"{where}: tensor {name} has dtype {meta['dtype']}, which cwa_dist cannot read")
            begin, end = meta["data_offsets"]
            info = TensorInfo(tuple(meta["shape"]), dtype, file, data_start + begin)
            if end - begin != info.nbytes or (size is not None and data_start + end > size):
                raise UsageError(f"{where} is truncated or corrupt: tensor {name} does not fit its byte range")
            self.tensors[name] = info

    @property
    def files(self) -> list[str]:
        return sorted({t.file for t in self.tensors.values()})

    def _files(self) -> list[str]:
        index = self.path / INDEX
        if index.is_file():
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise UsageError(f"{self.path} holds no .safetensors file")
        return files

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def key_for(self, name: str, prefix: str = "") -> str | None:
        """The checkpoint key holding parameter `name`: the name itself, or the name without (or
        with) the model's base prefix, as older checkpoints store it (GPT-2's 'h.0...' for
        'transformer.h.0...'). None if the checkpoint does not hold it."""
        if name in self.tensors:
            return name
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in self.tensors:
            return name[len(prefix) + 1 :]
        if prefix and f"{prefix}.{name}" in self.tensors:
            return f"{prefix}.{name}"
        return None

    def add_fused(self, key: str, shape: tuple[int, ...], segments: list[Segment]) -> None:
        """Make `key` readable as the tensor of `shape` whose flattened elements are `segments`,
        in order (see modeling.fusion)."""
        dtypes = {self.tensors[s.key].dtype for s in segments}
        if len(dtypes) != 1:
            raise UsageError(f"{self.path}: the tensors fused into {key} have different dtypes "
                             f"({', '.join(sorted(map(str, dtypes)))})")
        info = FusedInfo(tuple(shape), dtypes.pop(), tuple(segments))
        if sum(s.length for s in segments) != info.numel:
            raise ValueError(f"the segments of {key} hold {sum(s.length for s in segments)} elements, not {info.numel}")
        self.fused[key] = info

    def info(self, key: str) -> TensorInfo | FusedInfo:
        """Shape and dtype of a stored or fused tensor."""
        return self.tensors[key] if key in self.tensors else self.fused[key]

    def _file(self, file: str):
        if file not in self._open:
            self._open[file] = open(self.path / file, "rb", buffering=0)
        return self._open[file]

    def read_flat(self, key: str, start: int, length: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Elements [start, start + length) of the flattened tensor (clipped to its end), reading
        only their bytes, as a new 1-D tensor in `dtype` (default: as stored)."""
        if key in self.fused:
            return self._read_fused(self.fused[key], start, length, dtype)
        info = self.tensors[key]
        length = max(0, min(length, info.numel - start))
        raw = torch.empty(length * info.dtype.itemsize, dtype=torch.uint8)
        if length:
            f = self._file(info.file)
            f.seek(info.offset + start * info.dtype.itemsize)
            if read_into(f, memoryview(raw.numpy())) != raw.numel():
                raise UsageError(f"{self.path / info.file} ended early while reading {key}")
        out = raw.view(info.dtype)
        return out if dtype is None or out.dtype == dtype else out.to(dtype)

    def _read_fused(self, info: FusedInfo, start: int, length: int, dtype: torch.dtype | None) -> torch.Tensor:
        """The fused tensor's elements [start, start + length): each overlapping segment's part,
        read straight into its place in the output."""
        length = max(0, min(length, info.numel - start))
        out = torch.empty(length, dtype=dtype or info.dtype)
        at = 0  # the first element of the current segment, in the fused tensor
        for seg in info.segments:
            lo, hi = max(start, at), min(start + length, at + seg.length)
            if lo < hi:
                out[lo - start : hi - start] = self.read_flat(seg.key, seg.start + lo - at, hi - lo, dtype)
            at += seg.length
            if at >= start + length:
                break
        return out

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor, in `dtype` (default: as stored)."""
        info = self.info(key)
        return self.read_flat(key, 0, info.numel, dtype).reshape(info.shape)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()
