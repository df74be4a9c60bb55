"""Where tensors live: the few places that choose or change a device. Pure torch, no Ray.

- `compute_device`: the device a gradient rank or an evaluation actor computes on.
- `colocated`: a shard's weight, gradient and Fisher brought to the one device it is scored on
  (under ZeRO-3 offload the weight partition may sit in host memory while the gradient is on the
  GPU, or the other way round).
- `to_cpu`: what crosses a process boundary (a Ray return value) holds CPU tensors only, so a
  driver on a node without GPUs can unpickle it.

Everything else takes tensors as given and never mixes devices.
"""

from __future__ import annotations

import copy
import dataclasses

import torch


def compute_device(device: str, local_index: int = 0) -> torch.device:
    """`cuda` is the process's own GPU among those it can see (`local_index`), else the CPU."""
    return torch.device("cuda", local_index) if device == "cuda" else torch.device("cpu")


def colocated(device: torch.device, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each tensor on `device` (None stays None); a tensor already there is not copied."""
    return tuple(None if t is None else t.to(device, non_blocking=True) for t in tensors)


def to_cpu(obj):
    """`obj` with every tensor in it on the CPU: tensors, dicts, lists, tuples, dataclasses and plain
    objects are walked; an object holding only CPU tensors is returned as it is, not copied."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type == "cpu" else obj.cpu()
    if isinstance(obj, dict):
        moved = {k: to_cpu(v) for k, v in obj.items()}
        return obj if all(moved[k] is obj[k] for k in obj) else type(obj)(moved)
    if isinstance(obj, (list, tuple)):
        moved = [to_cpu(v) for v in obj]
        if all(a is b for a, b in zip(moved, obj)):
            return obj
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)  # namedtuples too
    if isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return obj
    names = _attributes(obj)
    if not names:
        return obj
    values = {n: getattr(obj, n) for n in names if hasattr(obj, n)}
    moved = {n: to_cpu(v) for n, v in values.items()}
    if all(moved[n] is values[n] for n in values):
        return obj
    out = copy.copy(obj)
    for n, v in moved.items():
        object.__setattr__(out, n, v)  # frozen dataclasses included
    return out


def _attributes(obj) -> list[str]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [f.name for f in dataclasses.fields(obj)]
    names = list(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    return [n for n in dict.fromkeys(names) if not n.startswith("__")]


def shared_visibility(assigned: list[tuple[str, list[str]]]) -> list[tuple[str, int]]:
    """For each rank's (node, GPU ids Ray gave it): (CUDA_VISIBLE_DEVICES for that rank, the index
    of its own first GPU among them). Every rank on a node sees all the GPUs of that node's ranks,
    as Ray Train arranges it: NCCL needs to see a peer's GPU to use NVLink/NVSwitch or PCIe P2P
    between them, and falls back to slower paths (where hangs have been reported) when each
    process sees one GPU only. Each rank still computes on its own GPU."""
    per_node: dict[str, set[str]] = {}
    for node, ids in assigned:
        per_node.setdefault(node, set()).update(ids)
    order = {node: sorted(ids, key=lambda i: (len(i), i)) for node, ids in per_node.items()}  # "2" < "10"
    out = []
    for node, ids in assigned:
        visible = order[node]
        out.append((",".join(visible), visible.index(ids[0]) if ids else 0))
    return out
