"""--stability-folds: each fold's ranking beside the whole set's, compared (analysis/stability.py).

The gradient stage scores every fold in the same pass as the whole set; here, while the workers
still hold the gradients, each ranking's scores are read at every weight any ranking put in its
top-K, so ρ is computed over exact values. Writes fold_rankings.parquet and stability.csv/.parquet.
"""

from __future__ import annotations

import pandas as pd
import torch

from cwa_dist.analysis import stability
from cwa_dist.analysis.metrics import get_metric
from cwa_dist.analysis.sensitivity import ShardScores
from cwa_dist.analysis.topk import Candidates
from cwa_dist.distributed.grad_workers import GradientGroup
from cwa_dist.reporting.outputs import RunRecord, ranking_frame
from cwa_dist.stages.context import Context

FOLD_RANKINGS = "fold_rankings.parquet"


def _weights(c: Candidates) -> list[stability.Weight]:
    return list(zip(c.names(), c.flat_index.tolist()))


def study(ctx: Context, record: RunRecord, group: GradientGroup, merged: ShardScores, folds: list[ShardScores],
          shapes) -> pd.DataFrame:
    """Compare the folds' rankings with each other and with the whole set's; returns the table."""
    metrics = list(ctx.cfg.analysis.metrics)
    rankings = {stability.ALL: merged, **{stability.fold_name(f): s for f, s in enumerate(folds)}}
    tops = {m: {r: _weights(s.candidates[m]) for r, s in rankings.items()} for m in metrics}
    wanted: dict[str, set[int]] = {}
    for per_ranking in tops.values():
        for weights in per_ranking.values():
            for name, flat in weights:
                wanted.setdefault(name, set()).add(flat)
    at = {name: torch.tensor(sorted(flats), dtype=torch.int64) for name, flats in wanted.items()}
    scores: dict[str, dict] = {m: {} for m in metrics}  # metric → ranking → weight → score
    for f, ranking in enumerate(rankings):
        values = group.values_at(at, fold=None if ranking == stability.ALL else f - 1)
        for m in metrics:
            scores[m][ranking] = _scores(get_metric(m), values)
    rows = [stability.compare(tops[m], scores[m], ctx.cfg.analysis.topk, seed=ctx.cfg.data.seed).assign(metric=m)
            for m in metrics]
    table = pd.concat(rows, ignore_index=True)[["metric", *rows[0].columns.drop("metric")]]
    record.run_dir.write_csv("stability.csv", table)
    record.run_dir.write_parquet("stability.parquet", table)
    fold_frames = [ranking_frame(m, s.candidates[m], shapes).assign(fold=stability.fold_name(f))
                   for f, s in enumerate(folds) for m in metrics]
    record.run_dir.write_parquet(FOLD_RANKINGS, pd.concat(fold_frames, ignore_index=True).drop(columns=["indices"]))
    _announce(ctx, table)
    return table


def _scores(metric, values: dict[str, tuple[torch.Tensor, ...]]) -> dict[stability.Weight, float]:
    """The metric's score, in float64, of every weight read back (index, grad, weight, Fisher, norm)."""
    out = {}
    for name, (index, grad, weight, fisher, norm) in values.items():
        score = metric.score(grad, weight, fisher=fisher, feature_norm=norm)
        out.update(zip(zip([name] * len(index), index.tolist()), score.tolist()))
    return out


def _announce(ctx: Context, table: pd.DataFrame) -> None:
    summary = stability.summarize(table)
    folds = ctx.cfg.analysis.stability_folds
    for metric, by_k in summary.items():
        for k, s in by_k.items():
            word = "unstable" if s["unstable"] else "stable"
            ctx.rep.line(f"🧪 {metric} top-{k} over {folds} folds: {word}; folds share {s['fold_overlap_mean']:.0%} "
                         f"of it (ρ {s['fold_rho_mean']:.2f}), each fold shares {s['all_overlap_mean']:.0%} "
                         "with the whole set")


def inclusion(rankings: pd.DataFrame, fold_rankings: pd.DataFrame) -> pd.Series:
    """Each ranked weight's inclusion frequency: the share of folds whose top-K (K the largest
    --topk) holds it, for the metrics the folds ranked (NaN for the |W| control, which reads no text)."""
    tops: dict[str, list[set]] = {}
    for (metric, _), rows in fold_rankings.groupby(["metric", "fold"], sort=False):
        tops.setdefault(metric, []).append(set(zip(rows["param"], rows["flat_index"])))
    out = pd.Series(float("nan"), index=rankings.index, dtype="float64")
    for metric, sets in tops.items():
        rows = rankings[rankings["metric"] == metric]
        weights = list(zip(rows["param"], rows["flat_index"]))
        out.loc[rows.index] = stability.inclusion_frequency(weights, sets)
    return out
