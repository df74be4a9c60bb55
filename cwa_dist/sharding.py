"""The sharding settings that reach DeepSpeed (pure data: the config holds them as a section, the
ZeRO-3 backend reads them, and neither imports the other for it)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _flat(default, flat: str | None = None):
    # The flat name is the flag and the config.json key, which keep the names users know.
    return field(default=default, metadata={"flat": flat})


@dataclass(frozen=True, slots=True)
class ZeroSettings:
    """The ZeRO-3 knobs that matter for memory."""

    offload_params: bool = _flat(False)
    """ZeRO-3: keep parameter partitions in CPU memory between uses (models larger than the GPUs)."""
    offload_optimizer: bool = _flat(False)
    """ZeRO-3: keep DeepSpeed's fp32 master and gradient partitions in CPU memory."""
    reduce_bucket_size: int = _flat(50_000_000, "zero_reduce_bucket_size")
    """ZeRO-3: elements per gradient reduce-scatter bucket."""
    prefetch_bucket_size: int = _flat(50_000_000, "zero_prefetch_bucket_size")
    """ZeRO-3: elements of parameters gathered ahead of use."""
    max_live_parameters: int = _flat(1_000_000_000, "zero_max_live_parameters")
    """ZeRO-3: most gathered parameter elements alive at once per rank."""
    max_reuse_distance: int = _flat(50_000_000, "zero_max_reuse_distance")
    """ZeRO-3: a gathered parameter is kept (not re-gathered) only if it is used again within this
    many elements. DeepSpeed's default of 1e9 keeps every parameter of a smaller model gathered from
    its forward to its backward, that is the whole model on every rank."""
    param_persistence_threshold: int = _flat(100_000, "zero_param_persistence_threshold")
    """ZeRO-3: parameters smaller than this stay gathered (saves collectives on tiny tensors)."""

    @property
    def offloads(self) -> bool:
        return self.offload_params or self.offload_optimizer
