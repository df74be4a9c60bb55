"""Does sensitivity predict impact? Statistics of the single-weight ablation study: pure torch.

The study zeroes each of a set of weights alone (the top N of every metric and N random weights)
and measures the change in evaluation NLL. For each metric it reports Spearman's rank correlation
between the metric's score and the measured change, with a percentile-bootstrap interval over the
studied weights, and the share of the total change carried by the metric's top tenth.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from cwa_dist.analysis.experts import position
from cwa_dist.analysis.metrics import METRICS


def _vector(x) -> torch.Tensor:
    """A float64 copy of a sequence, array or tensor (a copy: pandas hands out read-only arrays)."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().clone()
    return torch.tensor(list(map(float, x)), dtype=torch.float64)


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank (as Spearman's coefficient needs); NaNs come
    last, each a rank of its own, in the order they appear."""
    x = x.double()
    nan = torch.isnan(x)
    finite = x[~nan]
    ordered = torch.sort(finite).values
    # A value found at sorted positions i..j (0-based) ranks (i + j) / 2 + 1.
    low = torch.searchsorted(ordered, finite, right=False)
    high = torch.searchsorted(ordered, finite, right=True)
    out = torch.empty_like(x)
    out[~nan] = (low + high + 1).double() / 2
    out[nan] = torch.arange(len(finite) + 1, len(x) + 1, dtype=torch.float64)
    return out


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else math.nan


def spearman(x, y) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks (nan when either side is constant)."""
    x, y = _vector(x), _vector(y)
    return _pearson(ranks(x), ranks(y))


def spearman_interval(x, y, *, samples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of ρ, resampling the (score, impact) pairs."""
    x, y = _vector(x), _vector(y)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        idx = torch.randint(len(x), (len(x),), generator=gen)
        rho = spearman(x[idx], y[idx])
        if not math.isnan(rho):
            values.append(rho)
    if not values:
        return math.nan, math.nan
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    low, high = torch.quantile(torch.tensor(values, dtype=torch.float64), q).tolist()
    return low, high


def top_share(score, impact, fraction: float = 0.1) -> float:
    """Share of the total |impact| carried by the `fraction` of weights with the highest score."""
    score, impact = _vector(score), _vector(impact).abs()
    total = float(impact.sum())
    if total == 0 or not math.isfinite(total):
        return math.nan
    n = max(1, math.ceil(fraction * len(score)))
    top = torch.argsort(score, descending=True, stable=True)[:n]
    return float(impact[top].sum()) / total


def weights_frame(chosen: dict[tuple[str, int], list[str]], values: dict[str, tuple[torch.Tensor, ...]],
                  metrics: list[str], shapes: dict) -> pd.DataFrame:
    """The studied weights: where each is, why it was chosen (`top:<metric>`, `random`), its value,
    gradient and score under every metric, computed from the gradient the ranks hold."""
    rows = []
    for name, (idx, grad, weight, fisher, feature_norm) in values.items():
        # Scored in float32 as the ranking is (the float64 values hold float32 gradients exactly).
        scores = {m: METRICS.get(m).score(grad.float(), weight.float(), fisher=fisher.float(),
                                          feature_norm=feature_norm.float()) for m in metrics}
        for i, flat in enumerate(idx.tolist()):
            expert, row, col = position(name, shapes[name], flat)
            rows.append({"param": name, "flat_index": flat, "expert": expert, "row": row, "col": col,
                         "source": "+".join(chosen[(name, flat)]), "weight": float(weight[i]), "grad": float(grad[i]),
                         "fisher": float(fisher[i]), "feature_norm": float(feature_norm[i]),
                         **{f"score_{m}": float(scores[m][i]) for m in metrics}})
    frame = pd.DataFrame(rows).sort_values(["param", "flat_index"], ignore_index=True)
    frame[["expert", "col"]] = frame[["expert", "col"]].astype("Int64")
    return frame


def study_table(weights: pd.DataFrame, results: dict[str, dict], key) -> pd.DataFrame:
    """The studied weights with their measured impact: zeroed_ppl and delta_nll, the change in mean
    evaluation NLL per token (log of the perplexity ratio), with its paired bootstrap interval."""
    table = weights.copy()
    got = [results.get(key(r.param, r.flat_index), {}) for r in weights.itertuples(index=False)]
    table["baseline_ppl"] = [g.get("baseline_ppl") for g in got]
    table["zeroed_ppl"] = [g.get("perturbed_ppl") for g in got]
    for column, source in (("delta_nll", "ppl_ratio"), ("delta_nll_ci_low", "ppl_ratio_ci_low"),
                           ("delta_nll_ci_high", "ppl_ratio_ci_high")):
        ratio = pd.Series([g.get(source) for g in got], dtype="float64")
        table[column] = ratio.map(lambda v: math.log(v) if v and v > 0 else math.nan)
    return table


def study_summary(table: pd.DataFrame, metrics: list[str], *, samples: int, seed: int) -> dict:
    """Per metric: Spearman's ρ between its score and delta_nll over every studied weight, its
    bootstrap interval, and the share of the total |delta_nll| its top tenth carries."""
    measured = table[table["delta_nll"].notna()]
    out = {"weights": int(len(table)), "measured": int(len(measured)), "metrics": {}}
    enough = len(measured) > 2  # a rank correlation of fewer pairs says nothing
    for m in metrics:
        x, y = measured[f"score_{m}"].to_numpy(), measured["delta_nll"].to_numpy()
        low, high = spearman_interval(x, y, samples=samples, seed=seed) if enough else (math.nan, math.nan)
        out["metrics"][m] = {"spearman": spearman(x, y) if enough else math.nan,
                             "spearman_ci": [low, high], "top_tenth_share": top_share(x, y, 0.1)}
    return out
