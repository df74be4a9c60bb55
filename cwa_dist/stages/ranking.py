"""The ranking stage: the merged top-K of every metric as rankings.parquet and the top-K CSVs."""

from __future__ import annotations

import pandas as pd

from cwa_dist.analysis.metrics import ranked_metrics
from cwa_dist.analysis.sensitivity import ShardScores
from cwa_dist.reporting.outputs import RunRecord, ranking_frame, topk_csv_frame
from cwa_dist.stages import stability
from cwa_dist.stages.context import Context


def export(ctx: Context, record: RunRecord, merged: ShardScores, shapes) -> pd.DataFrame:
    cfg, rep, out = ctx.cfg, ctx.rep, record.run_dir
    with rep.stage("🏆 Ranking Critical Weights", record.timings, "ranking"):
        frames = []
        for metric in ranked_metrics(cfg.analysis.metrics):
            frame = ranking_frame(metric, merged.candidates[metric], shapes)
            frames.append(frame)
            if metric not in cfg.analysis.metrics:  # the control's ranking: in rankings.parquet only
                continue
            for k in cfg.analysis.topk:
                out.write_csv(f"top_{k}_weights_{metric}.csv", topk_csv_frame(frame, k))
                top = frame.head(k)
                rep.line(f"  {metric} top-{k}: {top['param'].nunique()} tensors, "
                         f"{top['layer_index'].nunique()} blocks; #1 {top['param'].iloc[0]} {top['indices'].iloc[0]}")
        rankings = pd.concat(frames, ignore_index=True)
        if cfg.analysis.stability_folds:
            folds = pd.read_parquet(out.path / stability.FOLD_RANKINGS)
            rankings["inclusion_frequency"] = stability.inclusion(rankings, folds)
        out.write_parquet("rankings.parquet", rankings.drop(columns=["indices"]))
        out.write_json(
            "sensitivity_statistics.json",
            {m: s.finalize() for m, s in merged.statistics.items()},
        )
    return rankings


def read(ctx: Context, record: RunRecord) -> pd.DataFrame:
    ctx.rep.line("✅ Sensitivity and ranking: done earlier, read from rankings.parquet")
    return pd.read_parquet(record.run_dir.path / "rankings.parquet")
