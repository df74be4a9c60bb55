"""Start or join Ray, and read what the cluster offers."""

from __future__ import annotations

import logging
import os
import threading
import time

import ray

# What the embedded Ray of a run on one machine leaves out, through Ray's own settings (a cluster
# that a run joins keeps its own): the metrics that every process pushes to the dashboard agent
# for Prometheus, and the task-event reports behind `ray list tasks` and the dashboard's timeline.
# Nothing of a run reads either, and on a small machine their senders take CPU from the workers.
# Ray also starts its workers at niceness 15, below the driver and its own daemons: there any
# brief wake-up of theirs preempts one of a worker's intra-op threads, and its matmuls wait for
# that thread at every barrier (the gradient stage ran 1.29x the bare pass; at niceness 0, see
# README). The workers do the run's work, so they run at the driver's priority.
LEAN_SYSTEM_CONFIG = {
    "enable_metrics_collection": False,
    "task_events_report_interval_ms": 0,
    "worker_niceness": 0,
}
RAY_DEFAULTS_ENV = "CWA_DIST_RAY_DEFAULTS"  # "1": start the embedded Ray with Ray's defaults (to compare)


def start_ray(address: str | None, *, verbose: bool) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS); without one, start a local Ray, lean.

    Returns True when this call started Ray (so the caller should shut it down).
    """
    if ray.is_initialized():
        return False
    # Without an address, a new local Ray: never a cluster some earlier `ray start` left recorded.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    lean = address == "local" and os.environ.get(RAY_DEFAULTS_ENV) != "1"
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
        **({"_system_config": LEAN_SYSTEM_CONFIG} if lean else {}),
    )
    return True


def available_cpus() -> int:
    return int(ray.available_resources().get("CPU", 0))


def available_resources() -> dict:
    return ray.available_resources()


def stop_ray() -> None:
    ray.shutdown()


def stop_ray_beside() -> threading.Thread:
    """Shut Ray down on a thread of its own and return it (join it before exiting). Stopping Ray
    is mostly waiting for its processes to exit, so the driver's last work (the export, which
    needs no Ray) runs meanwhile instead of after it."""
    stopper = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
    stopper.start()
    return stopper


def cluster_resources() -> dict:
    """The cluster's total resources, without Ray's per-node bookkeeping entries."""
    return {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}


def settled_free_resources(timeout_s: float = 10.0, stable_s: float = 1.0) -> dict:
    """Ray's free resources once they stop growing. A removed placement group (the gradient
    workers') hands its CPUs and GPUs back a moment later; sizing the pool at once would leave
    them idle for the whole stage."""
    deadline = time.monotonic() + timeout_s
    free, since = ray.available_resources(), time.monotonic()
    total = ray.cluster_resources()
    while time.monotonic() < deadline and time.monotonic() - since < stable_s:
        if all(free.get(k, 0) >= total.get(k, 0) for k in ("CPU", "GPU")):
            break  # everything is back
        time.sleep(0.1)
        now = ray.available_resources()
        if now.get("CPU", 0) != free.get("CPU", 0) or now.get("GPU", 0) != free.get("GPU", 0):
            free, since = now, time.monotonic()
    return free


