"""What every stage reads (Context), and what the model stage hands the others (LoadedModel)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cwa_dist.config import RunConfig
from cwa_dist.modeling.loading import ModelRef
from cwa_dist.modeling.sources import Origin
from cwa_dist.planning.run_plan import RunPlan
from cwa_dist.reporting.console import Reporter


class Handover:
    """What the sensitivity stage leaves the perturbation stage in this process: the gradient worker
    kept to serve as the first evaluation actor (`distributed.eval_actors.KeptWorker`), if any."""

    def __init__(self):
        self._kept = None

    def keep(self, kept) -> None:
        self._kept = kept

    def take(self):
        """The kept worker, now the taker's to shut down; None when there is none."""
        kept, self._kept = self._kept, None
        return kept

    def release(self) -> None:
        """Shut down a kept worker nobody took (the run failed or stopped before the perturbation)."""
        kept = self.take()
        if kept is not None:
            kept.release()


@dataclass(frozen=True, slots=True)
class Context:
    """What every stage reads: the settings, the console, and where the run executes."""

    cfg: RunConfig
    rep: Reporter
    plan: RunPlan  # device, dtype, backend, workers and actors: resolved once, before any stage
    joined_cluster: bool  # an existing cluster may autoscale; a local Ray cannot grow
    handover: Handover = field(default_factory=Handover)

    @property
    def device(self) -> str:
        return self.plan.device


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """What the driver knows of the model: where its weights are, never the weights."""

    model: ModelRef
    tokenizer: object
    scored: list[str]
    shapes: dict[str, tuple[int, ...]]
    model_class: str
    num_parameters: int
    model_bytes: int  # the parameters' bytes in the run's dtype
    origin: Origin  # where the weights come from (commit, directory, headers' digest)
