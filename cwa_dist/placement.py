"""Where a run's processes go: the device, and each gradient worker's and evaluation actor's
resources, from what the Ray cluster has now and what its autoscaler could add. The run and
--dry-run decide through these same functions."""

from __future__ import annotations

from cwa_dist.config import RunConfig
from cwa_dist.distributed import capacity
from cwa_dist.errors import UsageError
from cwa_dist.sizing import device_for


def resolve_device(cfg: RunConfig, o: capacity.Outlook | None = None) -> tuple[str, str]:
    """(cpu | cuda, why), from the cluster's GPU outlook (read here unless given). --device cuda is
    refused only when no GPU exists and none can be added."""
    o = o or capacity.outlook()
    device, why = device_for(cfg.device, gpus_now=o.gpus_now, gpus_possible=o.gpus_possible,
                             gpus_asked=cfg.asks_for_gpus)
    if device == "cuda" and not (o.gpus_now or o.gpus_possible) and cfg.device == "cuda":
        raise UsageError("--device cuda, but the Ray cluster has no GPUs and its autoscaler cannot add any; "
                         "use --device cpu or join a GPU cluster")
    if o.gpus_possible and not o.gpus_now:
        why += f" (read from {o.source})"
    return device, why


def worker_gpus(cfg: RunConfig, device: str) -> int:
    return cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (1 if device == "cuda" else 0)


def worker_cpus(cfg: RunConfig, free_cpus: int) -> int:
    return cfg.cpus_per_worker or max(1, free_cpus // cfg.num_workers)


def actor_count(cfg: RunConfig, device: str, n_specs: int, model_bytes: int, free: dict) -> int:
    """Evaluation actors: --num-eval-actors, else one per free CPU (one per --gpus-per-eval-actor GPUs
    on a GPU cluster), as many as Ray's memory allows a replica plus activations each, and never
    more than there are experiments."""
    if cfg.num_eval_actors:
        return cfg.num_eval_actors
    slots = int(free.get("GPU", 0)) // cfg.eval_actor_gpus if device == "cuda" else int(free.get("CPU", 0))
    # On CPU each actor's replica and activations come out of Ray's memory budget; on GPUs its GPUs hold them.
    by_memory = slots
    if device == "cpu" and model_bytes and free.get("memory"):
        by_memory = int(free["memory"] // (3 * model_bytes))
    return max(1, min(n_specs, slots, by_memory))
