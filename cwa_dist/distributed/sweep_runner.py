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
def _coordinate(cfg, log_path: str) -> str | None:
    from cwa_dist import pipeline
    from cwa_dist.report import Reporter

    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        run_dir = pipeline.run(cfg, Reporter(cfg.verbose, stream=log))
    return None if run_dir is None else run_dir.where  # a dry run plans and writes no run directory


def run_all(configs: list, *, max_concurrent: int, log_dir: Path, on_done: Callable[[Outcome], None]) -> list[Outcome]:
    """Run every configuration; a run that fails is recorded and the others go on."""
    # Coordinators run on this node, so a local --output lands where the sweep was started.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    pending, running, outcomes = list(configs), {}, []
    while pending or running:
        while pending and len(running) < max_concurrent:
            cfg = pending.pop(0)
            ref = _coordinate.options(scheduling_strategy=here, name=f"cwa_sweep:{cfg.experiment_id}").remote(
                cfg, str(log_dir / f"{cfg.experiment_id}.log"))
            running[ref] = cfg
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            cfg = running.pop(ref)
            try:
                outcome = Outcome(cfg.experiment_id, cfg.model, ray.get(ref), None)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                outcome = Outcome(cfg.experiment_id, cfg.model, None, _one_line(cause))
            except ray.exceptions.RayError as e:  # the coordinator's worker died
                outcome = Outcome(cfg.experiment_id, cfg.model, None, _one_line(e))
            outcomes.append(outcome)
            on_done(outcome)
    return outcomes


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {one_line(e)}"
