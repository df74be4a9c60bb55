"""Ranking stability over disjoint folds of the calibration texts: pure math, no Ray.

`--stability-folds B` deals the calibration texts into B disjoint folds (a seeded shuffle, then
round-robin, so fold sizes differ by at most one text) and scores each fold's own gradient beside
the whole set's. Two rankings a and b (a fold, or "all", the whole set) are compared at each K:

- overlap: the share of a's top-K that is also in b's top-K (|A ∩ B| / K);
- Spearman ρ of a's and b's scores over A ∪ B, the weights either ranking puts in its top-K, with
  a percentile bootstrap interval that resamples those weights;
- each weight's inclusion frequency: the share of folds whose top-K holds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from cwa_dist.analysis.ablation import spearman, spearman_interval
from cwa_dist.errors import UsageError

ALL = "all"  # the whole calibration set, as a ranking's name
UNSTABLE_OVERLAP = 0.8  # folds that share less than 80% of their top-K on average: the ranking is unstable
BOOTSTRAP_DRAWS = 1000

Weight = tuple[str, int]  # (parameter name, flat index)


def fold_name(f: int) -> str:
    return f"fold_{f + 1}"


def text_folds(n_texts: int, folds: int, seed: int) -> list[list[int]]:
    """Positions 0..n_texts-1 in `folds` disjoint folds: a seeded shuffle dealt round-robin, each
    fold sorted."""
    if folds < 2:
        raise UsageError(f"--stability-folds needs at least 2 folds to compare, got {folds}")
    if n_texts < folds:
        raise UsageError(f"--stability-folds {folds} needs at least {folds} calibration texts, but the calibration "
                         f"set has {n_texts}; give more text or fewer folds")
    order = torch.randperm(n_texts, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sorted(order[f::folds]) for f in range(folds)]


def window_folds(windows_per_text: Sequence[int], folds: Sequence[Sequence[int]]) -> list[list[int]]:
    """The calibration windows' positions in each of `folds` (`text_folds`' positions of texts):
    every window goes with its text."""
    starts = np.concatenate([[0], np.cumsum(windows_per_text)]).tolist()
    return [[w for t in texts for w in range(starts[t], starts[t + 1])] for texts in folds]


def compare(tops: Mapping[str, Sequence[Weight]], scores: Mapping[str, Mapping[Weight, float]],
            ks: Sequence[int], seed: int) -> pd.DataFrame:
    """One row per K and pair of rankings (every fold against "all", then every pair of folds):
    how much of their top-K they share, and ρ of their scores over the union of their top-K.

    `tops[r]`: ranking r's weights, best first (at least max(ks) of them, or all there are);
    `scores[r][w]`: ranking r's score of weight w, for every w in any ranking's top-K."""
    names = list(tops)
    folds = [n for n in names if n != ALL]
    pairs = [(f, ALL) for f in folds if ALL in tops] + [(a, b) for i, a in enumerate(folds) for b in folds[i + 1:]]
    rows = []
    for k in ks:
        for n, (a, b) in enumerate(pairs):
            top_a, top_b = list(tops[a][:k]), list(tops[b][:k])
            union = list(dict.fromkeys(top_a + top_b))
            # A weight whose parameter the loss never reached in a fold has a zero gradient there.
            x = [scores[a].get(w, 0.0) for w in union]
            y = [scores[b].get(w, 0.0) for w in union]
            low, high = spearman_interval(x, y, samples=BOOTSTRAP_DRAWS, seed=seed + 7_919 * k + n)
            rho = spearman(x, y)
            shared = len(set(top_a) & set(top_b))
            rows.append({"k": k, "a": a, "b": b, "shared": shared, "overlap": shared / max(1, len(top_a)),
                         "union": len(union), "spearman_rho": rho, "rho_low": low, "rho_high": high})
    return pd.DataFrame(rows, columns=["k", "a", "b", "shared", "overlap", "union", "spearman_rho", "rho_low",
                                       "rho_high"])


def inclusion_frequency(weights: Sequence[Weight], fold_tops: Sequence[Sequence[Weight]]) -> np.ndarray:
    """For each weight, the share of folds whose top list holds it."""
    sets = [set(t) for t in fold_tops]
    return np.array([sum(w in s for s in sets) / len(sets) for w in weights], dtype=np.float64)


def summarize(table: pd.DataFrame) -> dict:
    """Per metric and K: the folds' mutual overlap and ρ (mean, min, max over pairs of folds), each
    fold's overlap with the whole set, and whether the top-K is unstable (the folds share on
    average less than UNSTABLE_OVERLAP of it: a user relying on single weights would get a
    different set from other texts)."""
    out: dict = {}
    for (metric, k), rows in table.groupby(["metric", "k"], sort=False):
        mutual = rows[rows["b"] != ALL]
        against_all = rows[rows["b"] == ALL]
        overlap = mutual["overlap"]
        out.setdefault(metric, {})[str(int(k))] = {
            "folds": int(len(against_all)),
            "fold_overlap_mean": float(overlap.mean()),
            "fold_overlap_min": float(overlap.min()),
            "fold_overlap_max": float(overlap.max()),
            "fold_rho_mean": float(mutual["spearman_rho"].mean()),
            "fold_rho_low": float(mutual["rho_low"].min()),
            "fold_rho_high": float(mutual["rho_high"].max()),
            "all_overlap_mean": float(against_all["overlap"].mean()),
            "unstable": bool(overlap.mean() < UNSTABLE_OVERLAP),
        }
    return out
