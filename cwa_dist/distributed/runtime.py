"""Start or join Ray, and read what the cluster offers."""

from __future__ import annotations

import logging
import os

import ray


def start_ray(address: str | None, *, verbose: bool) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS); without one, start a local Ray.

    Returns True when this call started Ray (so the caller should shut it down).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
    )
    return True


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def available_cpus() -> int:
    return int(ray.available_resources().get("CPU", 0))
