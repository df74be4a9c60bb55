"""Memory a process really uses, measured, not derived from sizes: no Ray, no distributed code.

- `peak_rss_bytes`: the kernel's high-water mark of this process's resident memory.
- `live_tensor_bytes`: bytes of every tensor storage this process holds right now, found by
  walking the garbage collector's objects (each storage counted once, however many views).
  A rank that kept a whole copy of the model shows it here, whatever the bookkeeping says.
- `peak_device_bytes`: torch's peak GPU allocation (0 without CUDA).
- `peak_pinned_bytes`: torch's peak of pinned host memory (0 without CUDA).
"""

from __future__ import annotations

import gc
import resource
import sys

import torch


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def live_tensor_bytes(device_type: str = "cpu") -> int:
    """Bytes of the distinct tensor storages on `device_type` reachable by the garbage collector."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.is_meta or obj.device.type != device_type:
                continue
            storage = obj.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except Exception:  # wrappers (DTensor) and freed storages hold nothing themselves
            continue
        seen[ptr] = max(seen.get(ptr, 0), nbytes)
    return sum(seen.values())


def peak_device_bytes() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def peak_pinned_bytes() -> int:
    """Torch's peak of pinned host memory (its caching host allocator's blocks, as rounded), 0 without CUDA."""
    if not torch.cuda.is_available():
        return 0
    stats = torch.cuda.host_memory_stats()
    return int(stats.get("allocated_bytes.peak", stats.get("allocated_bytes.all.peak", 0)))
