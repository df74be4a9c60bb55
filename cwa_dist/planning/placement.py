"""How many evaluation actors to start once the gradient stage has handed its resources back: the
plan (`run_plan`) fixed each one's GPUs; how many fit depends on what is free at that moment."""

from __future__ import annotations

from cwa_dist.config import RunConfig


def actor_count(cfg: RunConfig, device: str, n_specs: int, model_bytes: int, free: dict, *,
                gpus_per_actor: int = 1) -> int:
    """Evaluation actors: --num-eval-actors, else one per free CPU (one per `gpus_per_actor` free GPUs
    on a GPU cluster), as many as Ray's memory allows a replica plus activations each, and never
    more than there are experiments."""
    if cfg.perturbation.num_eval_actors:
        return cfg.perturbation.num_eval_actors
    slots = int(free.get("GPU", 0)) // gpus_per_actor if device == "cuda" else int(free.get("CPU", 0))
    # On CPU each actor's replica and activations come out of Ray's memory budget; on GPUs its GPUs hold them.
    by_memory = slots
    if device == "cpu" and model_bytes and free.get("memory"):
        by_memory = int(free["memory"] // (3 * model_bytes))
    return max(1, min(n_specs, slots, by_memory))
