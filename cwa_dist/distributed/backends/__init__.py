"""Sharding backends of the gradient workers.

Each backend loads the model on one rank, runs forward/backward on micro-batches, and gives the
`ParamShard` that rank owns of each parameter (`shard`): (parameter name, flat offset, local
weights, local gradient), handed to the scorer from inside the final backward as each gradient
completes. Nothing above this interface knows which backend ran; the scoring and top-K code is the
same for all.

- `none`: one process holds the whole model (world size 1 only).
- `zero3`: DeepSpeed ZeRO-3. Parameters are created partitioned (`deepspeed.zero.Init`); rank r
  owns elements [r·P, (r+1)·P) of every flattened parameter, P = ⌈numel / world⌉ (the last
  partition is padded; the padding is cut off here).
- `fsdp2`: PyTorch FSDP2 (`fully_shard` per block and on the root, built on the meta device).
  Rank r owns rows [r·R, (r+1)·R) of every parameter's first dimension, R = ⌈rows / world⌉, which
  is one contiguous flat range starting at r·R·(numel/rows).

Gradient averaging: both backends average gradients over ranks, so each rank's loss is
multiplied by the world size; with every rank dividing its summed NLL by the global token count,
the result is the single-process gradient of the token-weighted mean NLL.
"""

from cwa_dist.distributed.backends.base import Backend, check_parameter_dtype, refuse_float16_gradients
from cwa_dist.distributed.backends.fsdp2 import Fsdp2Backend
from cwa_dist.distributed.backends.replica import ReplicaBackend
from cwa_dist.distributed.backends.zero3 import (
    PARTITION_GRADS_PARAMETERS,
    Zero3Backend,
    check_wrapped_signature,
    deepspeed_config,
)
from cwa_dist.sharding import ZeroSettings

BACKENDS = {"none": ReplicaBackend, "zero3": Zero3Backend, "fsdp2": Fsdp2Backend}

__all__ = [
    "BACKENDS", "PARTITION_GRADS_PARAMETERS", "Backend", "Fsdp2Backend", "ReplicaBackend", "Zero3Backend",
    "ZeroSettings", "check_parameter_dtype", "check_wrapped_signature", "deepspeed_config",
    "refuse_float16_gradients",
]
