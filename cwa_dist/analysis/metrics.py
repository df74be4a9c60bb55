"""Per-weight sensitivity scores: pure tensor math, no Ray, no distributed code.

A metric maps what is known about a parameter (or the shard of it a rank owns) to one
non-negative score per element. Higher means more critical. What a metric may read:

- `grad` g: the gradient of the token-weighted mean calibration NLL;
- `fisher` F: the mean over calibration windows of each window's squared gradient, Σ_c g_c² / C
  (g_c: the gradient of window c's mean NLL), the diagonal of the empirical Fisher;
- `feature_norm` ‖x_j‖₂: the norm, over every calibration token, of the input feature the weight
  multiplies (Wanda's activation statistic);
- `weight` w.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cwa_dist.registry import Registry

GRAD, FISHER, FEATURE_NORM = "grad", "fisher", "feature_norm"


@dataclass(frozen=True, slots=True)
class ScoreInputs:
    """One parameter's (or shard's) tensors, all the same shape, in float32 or float64."""

    weight: torch.Tensor
    grad: torch.Tensor | None = None
    fisher: torch.Tensor | None = None
    feature_norm: torch.Tensor | None = None


ScoreFn = Callable[[ScoreInputs, torch.Tensor], torch.Tensor]
"""(inputs, out) → scores: written into `out` (a scratch buffer of the weight's shape), or one of
the inputs returned as it is; never an input changed."""


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    fn: ScoreFn
    needs: frozenset[str]
    """What the metric reads besides the weight: GRAD, FISHER, FEATURE_NORM."""
    description: str

    @property
    def needs_grad(self) -> bool:
        """True for the gradient-based metrics, whose inputs come from backward."""
        return bool(self.needs & {GRAD, FISHER})

    def score(self, grad: torch.Tensor | None, weight: torch.Tensor, *, fisher: torch.Tensor | None = None,
              feature_norm: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Scores in float32 (float64 inputs stay float64), same shape as `weight`. `out`, a buffer of
        that shape and dtype, saves allocating one per call (a fresh tensor of 100M elements costs
        more in page faults than the arithmetic)."""
        given = {GRAD: grad, FISHER: fisher, FEATURE_NORM: feature_norm}
        missing = sorted(n for n in self.needs if given[n] is None)
        if missing:
            raise ValueError(f"metric {self.name!r} needs {' and '.join(missing)}, but the parameter has none")
        x = ScoreInputs(_upcast(weight), *(_upcast(t) if t is not None else None for t in (grad, fisher, feature_norm)))
        return self.fn(x, torch.empty_like(x.weight) if out is None else out)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    # Half-precision products lose the ordering of small scores; score in at least fp32.
    return t if t.dtype == torch.float64 else t.float()


METRICS: Registry[Metric] = Registry("metric")


def register_metric(name: str, *, needs: tuple[str, ...], description: str):
    def wrap(fn: ScoreFn) -> ScoreFn:
        METRICS.add(name, Metric(name=name, fn=fn, needs=frozenset(needs), description=description))
        return fn

    return wrap


@register_metric("grad_x_weight", needs=(GRAD,),
                 description="|g·w|: first-order estimate of the loss change if the weight is zeroed")
def grad_x_weight(x: ScoreInputs, out: torch.Tensor) -> torch.Tensor:
    return torch.mul(x.grad, x.weight, out=out).abs_()


@register_metric("grad_squared", needs=(GRAD,),
                 description="g²: the square of the token-weighted mean gradient, (Σ_c (n_c/N)·g_c)²; "
                             "not the Fisher (see fisher)")
def grad_squared(x: ScoreInputs, out: torch.Tensor) -> torch.Tensor:
    return torch.mul(x.grad, x.grad, out=out)


@register_metric("fisher", needs=(FISHER,),
                 description="Σ_c g_c² / C: the empirical Fisher diagonal, mean over calibration windows of the "
                             "per-window squared gradient")
def fisher(x: ScoreInputs, out: torch.Tensor) -> torch.Tensor:
    return x.fisher


@register_metric("obd", needs=(FISHER,),
                 description="½·F·w²: Optimal Brain Damage's loss increase from zeroing w, with the empirical "
                             "Fisher F as the Hessian diagonal")
def optimal_brain_damage(x: ScoreInputs, out: torch.Tensor) -> torch.Tensor:
    return torch.mul(x.weight, x.weight, out=out).mul_(x.fisher).mul_(0.5)


@register_metric("magnitude", needs=(),
                 description="|w|: the weight's magnitude (also the largest-|W| control's ranking)")
def magnitude(x: ScoreInputs, out: torch.Tensor) -> torch.Tensor:
    return torch.abs(x.weight, out=out)


@register_metric("wanda", needs=(FEATURE_NORM,),
                 description="|w|·‖x_j‖₂: Wanda's pruning score, the weight times the norm of its input feature "
                             "over the calibration tokens")
def wanda(x: ScoreInputs, out: torch.Tensor) -> torch.Tensor:
    return torch.abs(x.weight, out=out).mul_(x.feature_norm)


# The largest-|W| control is ranked on every run, whether or not `magnitude` is asked for.
MAGNITUDE = METRICS.get("magnitude")


def get_metric(name: str) -> Metric:
    return METRICS.get(name)


def ranked_metrics(requested) -> list[str]:
    """The metrics a run ranks by: those asked for, then the magnitude control's unless asked for."""
    return [*requested, *([] if MAGNITUDE.name in requested else [MAGNITUDE.name])]


def needed_inputs(metric_names) -> frozenset[str]:
    """Everything the metrics read besides the weight."""
    return frozenset().union(*(get_metric(m).needs for m in metric_names))
