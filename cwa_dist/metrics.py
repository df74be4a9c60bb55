"""Per-weight sensitivity scores: pure tensor math, no Ray, no distributed code.

A metric maps the gradient g and weight w of a parameter (or of the shard of it a rank owns)
to one non-negative score per element. Higher means more critical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from cwa_dist.registry import Registry

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    fn: ScoreFn
    needs_grad: bool
    """False for weight-only scores such as the magnitude control."""
    description: str

    def score(self, grad: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """Scores in float32 (float64 inputs stay float64), same shape as `weight`."""
        if self.needs_grad and grad is None:
            raise ValueError(f"metric {self.name!r} needs a gradient, but the parameter has none")
        w = _upcast(weight)
        g = _upcast(grad) if grad is not None else None
        return self.fn(g, w)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    # Half-precision products lose the ordering of small scores; score in at least fp32.
    return t if t.dtype == torch.float64 else t.float()


METRICS: Registry[Metric] = Registry("metric")


def register_metric(name: str, *, needs_grad: bool = True, description: str):
    def wrap(fn: ScoreFn) -> ScoreFn:
        METRICS.add(name, Metric(name=name, fn=fn, needs_grad=needs_grad, description=description))
        return fn

    return wrap


@register_metric("grad_x_weight", description="|g·w|: first-order estimate of the loss change if the weight is zeroed")
def grad_x_weight(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.mul(g, w).abs_()  # in place: one full-size temporary, not two


@register_metric("grad_squared", description="g²: diagonal empirical-Fisher estimate")
def grad_squared(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.square(g)


# The largest-|W| control is ranked by the same top-K machinery on every run, but it is not a
# sensitivity metric a user asks for, so it stays out of the registry.
MAGNITUDE = Metric(
    name="magnitude",
    fn=lambda g, w: w.abs(),
    needs_grad=False,
    description="|w|: ranks the largest-magnitude control",
)


def get_metric(name: str) -> Metric:
    return METRICS.get(name)
