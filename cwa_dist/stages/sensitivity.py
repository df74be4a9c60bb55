"""The sensitivity stage: the gradient worker group scores every weight and returns the merged
exact top-K (and, for the ablation study, the chosen weights' values while gradients exist)."""

from __future__ import annotations

import torch

from cwa_dist.analysis import ablation
from cwa_dist.analysis.data import Split
from cwa_dist.analysis.perturb import random_targets
from cwa_dist.analysis.sensitivity import ShardScores, numel
from cwa_dist.distributed.backends import deepspeed_config
from cwa_dist.distributed.grad_workers import GradientGroup
from cwa_dist.reporting.outputs import RunRecord
from cwa_dist.stages import stability as stability_stage
from cwa_dist.stages.context import Context, LoadedModel


def run(ctx: Context, record: RunRecord, loaded: LoadedModel, split: Split) -> ShardScores:
    cfg, rep, scored = ctx.cfg, ctx.rep, loaded.scored
    with rep.stage("🧮 Computing Sensitivity Metrics", record.timings, "sensitivity"):
        settings = cfg.sharding.zero
        lay, backend = ctx.plan.layout, ctx.plan.backend
        if backend == "zero3":
            record.run_dir.write_json("deepspeed_config.json", deepspeed_config(settings, ctx.plan.dtype, ctx.device))
        gpus, cpus = lay.gpus_per_worker, lay.cpus_per_worker
        rep.line(f"🔄 {lay.num_workers} gradient worker(s), backend {backend}, "
                 f"{cpus} CPU(s){f' and {gpus} GPU(s)' if gpus else ''} each")
        serve = _worker_serves(ctx)
        group = GradientGroup(loaded.model, num_workers=lay.num_workers, backend=backend, device=ctx.device,
                              cpus_per_worker=cpus, gpus_per_worker=gpus, settings=settings,
                              autoscaling=ctx.joined_cluster, call_timeout_s=cfg.run.stage_timeout_s,
                              placement_timeout_s=_placement_timeout_s(ctx), on_wait=rep.line,
                              node_gpus=ctx.plan.view.gpu_node.gpus if ctx.plan.view.gpu_node else None,
                              serve_after=serve)
        folds = [list(f) for f in split.calibration_folds]
        # The ablation study and the stability folds read gradients back from the ranks after scoring.
        ablation_study = bool(cfg.perturbation.ablation_study and not cfg.perturbation.no_perturbation)
        try:
            with rep.progress(len(split.calibration), "backward", "chunk") as bar:
                result = group.sensitivity(
                    # The evaluation actors measure the baseline anyway, as their replay's first pass.
                    evaluation=split.evaluation if cfg.perturbation.no_perturbation else [],
                    calibration=split.calibration, scored=scored,
                    metrics=list(cfg.analysis.metrics), k=cfg.analysis.max_k, batch_size=cfg.data.batch_size,
                    checkpointing=cfg.sharding.gradient_checkpointing,
                    keep_gradients=ablation_study or bool(folds), folds=folds,
                    on_baseline=lambda b: rep.line(f"📏 Baseline perplexity (evaluation chunks): {b.value:.4f}"),
                    on_step=bar.update,
                )
            if ablation_study:
                _study_weights(ctx, record, loaded, group, result.merged)
            if folds:
                stability_stage.study(ctx, record, group, result.merged, result.folds, loaded.shapes)
            if serve:
                ctx.handover.keep(group.hand_over())
        finally:
            group.shutdown()  # nothing left to shut down once handed over
        if result.baseline is not None:
            record.fact(baseline_perplexity=result.baseline.value)
        merged, reports = result.merged, result.reports
        loss = result.calibration_loss
        rep.line(f"✅ Calibration loss (mean NLL): {loss:.4f}")
        for r in reports:
            rep.detail(f"  rank {r.rank} ({r.node}): backward {r.backward_s:.1f}s, scoring {r.scoring_s:.1f}s, "
                       f"{r.local_param_numel:,} parameter elements held, peak RSS {r.peak_rss_bytes / 2**30:.2f} GiB"
                       + (f", peak GPU {r.peak_device_bytes / 2**30:.2f} GiB" if r.peak_device_bytes else ""))
        record.memory(gradient_ranks=[
            {"rank": r.rank, "node": r.node, "peak_rss_bytes": r.peak_rss_bytes,
             "peak_device_bytes": r.peak_device_bytes, "live_tensor_bytes": r.live_tensor_bytes} for r in reports
        ])
        for metric in cfg.analysis.metrics:
            overall = merged.statistics[metric].overall().finalize(with_histogram=False)
            rep.line(f"🔄 {metric}:")
            rep.line(f"  ✅ Tensors: {len(scored)}")
            rep.line(f"  📊 Weights: {overall['count']:,}")
            rep.line(f"  📈 Mean: {overall['mean']:.2e}")
            rep.line(f"  📉 Std: {overall['std']:.2e}")
            rep.line(f"  🔝 Max: {overall['max']:.2e}")
        record.fact(calibration_loss=loss, sensitivity={
            "backend": backend,
            "workers": [
                {"rank": r.rank, "node": r.node, "backward_s": r.backward_s, "scoring_s": r.scoring_s,
                 "scored_in_backward": r.scored_in_backward,
                 "local_param_numel": r.local_param_numel, "local_grad_numel": r.local_grad_numel,
                 "peak_rss_bytes": r.peak_rss_bytes, "peak_device_bytes": r.peak_device_bytes}
                for r in reports
            ],
        })
    record.mark("sensitivity")
    return merged


def _worker_serves(ctx: Context) -> bool:
    """True when the gradient worker will serve as the first evaluation actor: it holds a whole
    replica (the `none` backend) on the CPU of a machine whose Ray this run started. It then saves
    an actor's process start and load. On GPUs a fresh actor gets its own GPUs (and memory without
    the gradient stage's cached blocks), and a joined cluster places actors by its own resources."""
    cfg = ctx.cfg
    return (ctx.plan.backend == "none" and ctx.device == "cpu" and not ctx.joined_cluster
            and not cfg.perturbation.no_perturbation)


def _placement_timeout_s(ctx: Context) -> float:
    """--placement-timeout-s, else 600 s, or an hour where the autoscaler may have to start GPU
    nodes first (a cold GPU node runs its setup commands before it joins)."""
    if ctx.cfg.run.placement_timeout_s:
        return ctx.cfg.run.placement_timeout_s
    return 3600.0 if ctx.joined_cluster and ctx.plan.view.gpus_possible else 600.0


def _study_weights(ctx: Context, record: RunRecord, loaded: LoadedModel, group: GradientGroup,
                   merged: ShardScores) -> None:
    """The weights of the single-weight ablation study (the top N of every metric and N random ones)
    with their score under every metric, read from the ranks while their gradients exist, and
    written to ablation_weights.parquet (a resumed run reads them back)."""
    cfg, n = ctx.cfg, ctx.cfg.perturbation.ablation_study
    chosen: dict[tuple[str, int], list[str]] = {}
    for m in cfg.analysis.metrics:
        c = merged.candidates[m]
        for name, flat in zip(c.names()[:n], c.flat_index[:n].tolist()):
            chosen.setdefault((name, flat), []).append(f"top:{m}")
    numels = [numel(loaded.shapes[x]) for x in loaded.scored]
    draw = random_targets(loaded.scored, numels, min(n, sum(numels)), seed=cfg.data.seed + 7919)
    for i, flat in zip(draw.param.tolist(), draw.flat_index.tolist()):
        chosen.setdefault((loaded.scored[i], flat), []).append("random")
    wanted: dict[str, list[int]] = {}
    for name, flat in chosen:
        wanted.setdefault(name, []).append(flat)
    values = group.values_at({name: torch.tensor(flats, dtype=torch.int64) for name, flats in wanted.items()})
    frame = ablation.weights_frame(chosen, values, list(cfg.analysis.metrics), loaded.shapes)
    record.run_dir.write_parquet("ablation_weights.parquet", frame)
    ctx.rep.line(f"📐 Ablation study: {len(frame)} weights chosen (top {n} of each metric, {n} random), "
                 "each to be zeroed alone")
