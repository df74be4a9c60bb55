"""The sharding settings that reach DeepSpeed (pure data: the config builds them, the ZeRO-3
backend reads them, and neither imports the other for it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ZeroSettings:
    """The ZeRO-3 knobs that matter for memory."""

    offload_params: bool = False
    offload_optimizer: bool = False
    reduce_bucket_size: int = 50_000_000
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 50_000_000
    param_persistence_threshold: int = 100_000
