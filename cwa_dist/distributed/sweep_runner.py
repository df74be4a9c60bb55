"""Runs a sweep's runs concurrently: each run is coordinated by its own Ray task (which holds no
weights and asks for no CPU), at most `max_concurrent` at a time; the gradient groups and actor
pools they start queue in Ray, where the autoscaler sees their demand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cwa_dist.errors import one_line


@dataclass(frozen=True, slots=True)
class Outcome:
    experiment_id: str
    model: str
    where: str | None  # the run directory, when the run completed (None for a dry run: it writes none)
    error: str | None  # why it failed, one line


@ray.remote(num_cpus=0, max_retries=0)
def _coordinate(run_one: Callable, cfg, log_path: str) -> str | None:
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        return run_one(cfg, log)


def run_all(configs: list, *, run_one: Callable, max_concurrent: int, log_dir: Path,
            on_done: Callable[[Outcome], None]) -> list[Outcome]:
    """Run every configuration with `run_one(cfg, log_stream)` (the caller's: this layer does not
    call up into the driver), which returns where the run's directory is, or None for a dry run.
    A run that fails is recorded and the others go on."""
    # Coordinators run on this node, so a local --output lands where the sweep was started.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    pending, running, outcomes = list(configs), {}, []
    while pending or running:
        while pending and len(running) < max_concurrent:
            cfg = pending.pop(0)
            ref = _coordinate.options(scheduling_strategy=here, name=f"cwa_sweep:{cfg.run.experiment_id}").remote(
                run_one, cfg, str(log_dir / f"{cfg.run.experiment_id}.log"))
            running[ref] = cfg
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            cfg = running.pop(ref)
            try:
                outcome = Outcome(cfg.run.experiment_id, cfg.model.name, ray.get(ref), None)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                outcome = Outcome(cfg.run.experiment_id, cfg.model.name, None, _one_line(cause))
            except ray.exceptions.RayError as e:  # the coordinator's worker died
                outcome = Outcome(cfg.run.experiment_id, cfg.model.name, None, _one_line(e))
            outcomes.append(outcome)
            on_done(outcome)
    return outcomes


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {one_line(e)}"
