"""Streaming score statistics: pure tensor math, mergeable across shards and ranks.

Exact quantiles would need every score of the model in one place; we keep a histogram over
powers of two instead (read straight off the float exponent, which is cheap), so quantiles are
exact to a factor of 2 and the statistics of two shards of one parameter merge by addition.
Bin b holds positive scores in [2**(b-127), 2**(b-126)) (bin 0 also holds float32 subnormals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from cwa_dist.analysis.scratch import Scratch

NUM_BINS = 256  # float32 biased exponents; 255 is Inf/NaN, which scoring refuses earlier
EXP_BIAS = 127
QUANTILES = (0.5, 0.9, 0.99, 0.999, 0.9999)


@dataclass(slots=True)
class Moments:
    count: int = 0
    zeros: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    max: float = -math.inf
    min: float = math.inf
    # counts of positive scores per power-of-two bin (see module docstring)
    histogram: list[int] = field(default_factory=lambda: [0] * NUM_BINS)

    def add_batch(self, scores: torch.Tensor, scratch: Scratch | None = None) -> None:
        s = scores.reshape(-1).float()  # bins are float32 exponents
        if s.numel() == 0:
            return
        # float32 sums are blocked/pairwise in torch (and BLAS for the dot), accurate to ~1e-6
        # relative per shard, and far faster than float64; shards add up in Python floats.
        self.count += s.numel()
        self.total += float(s.sum())
        self.total_sq += float(torch.dot(s, s))
        lo, hi = torch.aminmax(s)
        self.max = max(self.max, float(hi))
        self.min = min(self.min, float(lo))
        # Scores are non-negative: the biased exponent field b puts x in [2**(b-127), 2**(b-126)).
        exponents = scratch.get(s.numel(), torch.int32, s.device) if scratch is not None else None
        counts = torch.bincount(torch.bitwise_right_shift(s.view(torch.int32), 23, out=exponents), minlength=NUM_BINS)
        # Zero has b = 0, as subnormals do; only where bin 0 holds anything is a pass needed to
        # tell them apart (zeros are counted in `zeros`, not in the histogram).
        zeros = s.numel() - int(torch.count_nonzero(s)) if int(counts[0]) else 0
        counts[0] -= zeros
        self.zeros += zeros
        self.histogram = [a + b for a, b in zip(self.histogram, counts.tolist())]

    def merge(self, other: Moments) -> None:
        self.count += other.count
        self.zeros += other.zeros
        self.total += other.total
        self.total_sq += other.total_sq
        self.max = max(self.max, other.max)
        self.min = min(self.min, other.min)
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram)]

    def quantile(self, q: float) -> float:
        """Approximate q-quantile: the geometric centre of the power-of-two bin that holds it."""
        target = q * self.count
        seen = self.zeros
        if target <= seen:
            return 0.0
        for i, c in enumerate(self.histogram):
            seen += c
            if seen >= target:
                return 2.0 ** (i - EXP_BIAS + 0.5)
        return self.max

    def finalize(self, with_histogram: bool) -> dict:
        if self.count == 0:
            return {"count": 0}
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        out = {
            "count": self.count,
            "mean": mean,
            "std": math.sqrt(var),
            "min": self.min,
            "max": self.max,
            "zero_fraction": self.zeros / self.count,
            "quantiles": {f"q{q:g}": self.quantile(q) for q in QUANTILES},
        }
        if with_histogram:
            used = [i for i, c in enumerate(self.histogram) if c]
            lo, hi = (used[0], used[-1] + 1) if used else (0, 0)
            out["histogram"] = {
                "log2_bin_edges": [i - EXP_BIAS for i in range(lo, hi + 1)],
                "counts": self.histogram[lo:hi],
                "zeros": self.zeros,
            }
        return out


class ScoreStatistics:
    """Per-parameter and whole-model statistics of one metric's scores."""

    def __init__(self) -> None:
        self.per_param: dict[str, Moments] = {}

    def add_batch(self, name: str, scores: torch.Tensor, scratch: Scratch | None = None) -> None:
        self.per_param.setdefault(name, Moments()).add_batch(scores, scratch)

    def merge(self, other: ScoreStatistics) -> None:
        for name, m in other.per_param.items():
            self.per_param.setdefault(name, Moments()).merge(m)

    def overall(self) -> Moments:
        total = Moments()
        for m in self.per_param.values():
            total.merge(m)
        return total

    def finalize(self) -> dict:
        return {
            "overall": self.overall().finalize(with_histogram=True),
            "per_parameter": {n: m.finalize(with_histogram=False) for n, m in sorted(self.per_param.items())},
        }
