"""One torch.distributed process group across the gradient workers: rank 0 picks the address
and a free port, every worker gets them, and all initialise together."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist


def rendezvous_address() -> tuple[str, int]:
    """This node's address and a port free on it (called on rank 0's actor)."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def init_group(*, rank: int, world_size: int, address: str, port: int, backend: str, local_rank: int = 0,
               timeout_s: int = 1800) -> None:
    # DeepSpeed and FSDP read these too; DeepSpeed sets its device from LOCAL_RANK, so it is the
    # index of this rank's own GPU among those the process sees.
    os.environ.update(
        MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
    )
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
