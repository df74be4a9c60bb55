"""Stage orchestration on the driver: data → model → sensitivity → ranking → perturbation → export.

Workers and actors compute; only this module's driver process writes the run directory.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from cwa_dist import ablation, html_report, plots
from cwa_dist.config import RunConfig
from cwa_dist.data import Split, load_texts, split_documents, tokenize_documents
from cwa_dist.distributed.backends import deepspeed_config
from cwa_dist.distributed.eval_actors import EvalPool, ExperimentResult
from cwa_dist.distributed.grad_workers import GradientGroup
from cwa_dist.distributed.runtime import (
    cluster_resources,
    settled_free_resources,
    start_ray,
    stop_ray,
)
from cwa_dist.dry_run import cluster_view, dry_run, plan_run
from cwa_dist.errors import UsageError, last_line
from cwa_dist.evaluate import bootstrap_intervals, predicted_tokens, window_tokens
from cwa_dist.memory import peak_rss_bytes
from cwa_dist.metrics import MAGNITUDE, ranked_metrics
from cwa_dist.models import (
    ModelRef,
    Origin,
    checkpoint_keys,
    empty_model,
    load_config,
    load_tokenizer,
    resolve_origin,
    resolve_source,
)
from cwa_dist.outputs import (
    PERTURBATION_COLUMNS,
    RunDirectory,
    RunRecord,
    candidates_from_rankings,
    ranking_frame,
    super_weight_table,
    topk_csv_frame,
)
from cwa_dist.perturb import PerturbationSpec, flip_bit_index, random_targets
from cwa_dist.placement import actor_count
from cwa_dist.plan import (
    ABLATION,
    SUPER_WEIGHT,
    ablation_key,
    ablation_spec,
    plan_experiments,
    super_weight_spec,
)
from cwa_dist.provenance import git_revision, host, versions
from cwa_dist.report import Reporter
from cwa_dist.resume import ResultLog, differing_identity, differing_settings, latest_unfinished, run_identity
from cwa_dist.run_plan import RunPlan, refusal
from cwa_dist.sensitivity import ShardScores, numel, select_parameters
from cwa_dist.storage import Output, durable_output


@dataclass(frozen=True, slots=True)
class Context:
    """What every stage reads: the settings, the console, and where the run executes."""

    cfg: RunConfig
    rep: Reporter
    plan: RunPlan  # device, dtype, backend, workers and actors: resolved once, before any stage
    joined_cluster: bool  # an existing cluster may autoscale; a local Ray cannot grow

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


def run(cfg: RunConfig, rep: Reporter | None = None) -> RunDirectory | None:
    """The stages, in order. Each takes what it needs and returns a typed result; the RunRecord
    is the only writer of manifest.json and experiment_summary.json, and skips the stages an
    earlier try of the same run finished."""
    rep = rep or Reporter(cfg.verbose)
    if cfg.dry_run:
        started_ray = not cfg.cluster and start_ray(cfg.ray_address, verbose=cfg.verbose)
        try:
            dry_run(cfg, rep)
            return None
        finally:
            if started_ray:
                stop_ray()
    texts = load_texts(cfg.data_file, cfg.eval_limit)  # cheap input errors before anything slow
    output = Output(durable_output(cfg.output, rep.line))
    output.check_writable()
    experiment_id = _experiment_id(cfg, output)
    output.pull(experiment_id)  # a run stored under a URI: its files, to continue it
    where = output.where(experiment_id)
    run_path = output.local / experiment_id
    previous = _previous_run(cfg, run_path, where, experiment_id)
    if previous and previous.get("status") == "complete":
        rep.line(f"✅ {where} is already complete; nothing to resume")
        return RunDirectory(run_path, where=where)
    started_ray = start_ray(cfg.ray_address, verbose=cfg.verbose)
    try:
        # The same plan as --dry-run's, from the model's config: refused here, before any stage
        # starts a worker, when a process would not fit its GPU or its node.
        plan = plan_run(cfg, cluster_view(cfg))
        if not plan.fit.ok:
            raise UsageError(refusal(plan))
        joined = bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))
        ctx = Context(cfg=cfg, rep=rep, plan=plan, joined_cluster=joined)
        dtype = plan.dtype
        if cfg.perturbation_mode == "bit_flip":
            flip_bit_index(dtype, cfg.perturbation_bit)  # a bit the weights' dtype has, checked before any work
        timings: dict[str, float] = {}
        # The weights' origin: a Hub id's commit (pinned for every node), or the local checkpoint.
        origin = resolve_origin(resolve_source(cfg.model), revision=cfg.revision, announce=rep.line)
        identity = run_identity(texts, dtype, origin.identity)
        if previous:
            _check_identity(run_path, where, identity)
        _header(ctx, where, len(texts))
        loaded = _load(ctx, timings, origin)
        split, data_facts = _prepare_data(ctx, texts, loaded.tokenizer)
        run_dir = RunDirectory.create(run_path, on_write=output.uploader(experiment_id), where=where,
                                      exists_ok=bool(previous))
        record = _open_record(ctx, run_dir, experiment_id, previous, loaded, identity)
        record.timings.update(timings)
        record.fact(model_name=cfg.model, num_parameters=loaded.num_parameters,
                    num_scored_weights=sum(numel(s) for s in loaded.shapes.values()), data=data_facts)
        record.mark("model")
        try:
            rankings = record.stage(
                "ranking",
                compute=lambda: _export_rankings(ctx, record, _sensitivity(ctx, record, loaded, split), loaded.shapes),
                restore=lambda: _read_rankings(ctx, record),
            )
            results = None
            if not cfg.no_perturbation:
                results = record.stage(
                    "perturbation",
                    compute=lambda: _perturbation(ctx, record, loaded, split, rankings),
                    restore=lambda: pd.read_parquet(record.run_dir.path / "perturbation_results.parquet"),
                )
            _finish(ctx, record, rankings, results)
        except BaseException as e:
            record.fail(e)
            raise
        return record.run_dir
    finally:
        if started_ray:
            stop_ray()


def _experiment_id(cfg: RunConfig, output: Output) -> str:
    if cfg.experiment_id:
        return cfg.experiment_id
    if cfg.resume:
        latest = latest_unfinished(output.manifests())
        if latest is None:
            raise UsageError(f"--resume: no unfinished run under {cfg.output}; give --experiment-id or start a new run")
        return latest
    return dt.datetime.now().strftime("critical_analysis_%Y%m%d_%H%M%S")


def _config_record(cfg: RunConfig, experiment_id: str, device: str) -> dict:
    return {**cfg.to_dict(), "experiment_id": experiment_id, "device": device}


def _plan_line(plan: RunPlan) -> str:
    lay = plan.layout
    gpus = f" and {lay.gpus_per_worker} GPU(s)" if lay.gpus_per_worker else ""
    actors = ""
    if lay.num_eval_actors:
        each = f" of {lay.gpus_per_eval_actor} GPU(s)" if plan.device == "cuda" else ""
        actors = f"; {lay.num_eval_actors} evaluation actor(s){each}"
    return f"🧭 Plan: {lay.num_workers} gradient worker(s) of {lay.cpus_per_worker} CPU(s){gpus}{actors}; it fits"


def _previous_run(cfg: RunConfig, path: Path, where: str, experiment_id: str) -> dict | None:
    """The manifest of the run to continue, after checking that continuing it is safe."""
    manifest, config = path / "manifest.json", path / "config.json"
    if not manifest.exists() or not config.exists():
        if cfg.resume:
            raise UsageError(f"--resume: {where} holds no run to continue; start it without --resume")
        return None  # RunDirectory.create refuses a non-empty directory that is not a run
    stored = json.loads(config.read_text())
    diffs = differing_settings(stored, _config_record(cfg, experiment_id, stored.get("device")))
    if diffs:
        raise UsageError(
            f"cannot resume {where}: these settings differ from the stored run and would make its results "
            f"wrong: {'; '.join(diffs)}. Use the stored settings, or a new --experiment-id"
        )
    return json.loads(manifest.read_text())


def _check_identity(path: Path, where: str, identity: dict) -> None:
    diffs = differing_identity(json.loads((path / "config.json").read_text()), identity)
    if diffs:
        raise UsageError(f"cannot resume {where}: {'; '.join(diffs)}; the stored "
                         "results were computed otherwise. Use the stored data and dtype, or a new --experiment-id")


def _open_record(ctx: Context, run_dir: RunDirectory, experiment_id: str, previous: dict | None,
                 loaded: LoadedModel, identity: dict) -> RunRecord:
    """The record of an earlier try to continue, or of a new run directory."""
    cfg, rep = ctx.cfg, ctx.rep
    if previous:
        record = RunRecord(run_dir, previous)
        record.set(status="running", resumed=previous.get("resumed", 0) + 1)
        done = [s for s, v in previous.get("stages", {}).items() if v.get("status") == "done"]
        rep.line(f"🔁 Resuming {record.run_dir.where}; stages already done: {', '.join(done) or 'none'}")
        return record
    record = RunRecord(run_dir, {})
    record.set(
        status="running",
        started=dt.datetime.now().isoformat(timespec="seconds"),
        versions=versions(),
        git=git_revision(),
        host=host(),
        device=ctx.device,
        ray={"resources": cluster_resources()},
        model_class=loaded.model_class,
        scored_parameters={n: list(s) for n, s in loaded.shapes.items()},
    )
    record.set(plan=ctx.plan.record(), checkpoint=loaded.origin.record())
    record.run_dir.write_json("config.json", {**_config_record(cfg, experiment_id, ctx.device), **identity,
                                              "plan": ctx.plan.record(), "checkpoint": loaded.origin.record()})
    return record


def _header(ctx: Context, where: str, n_texts: int) -> None:
    cfg, rep = ctx.cfg, ctx.rep
    rep.line("🔬 Critical Weight Analysis (cwa_dist)")
    rep.rule()
    rep.line(f"📅 Started: {dt.datetime.now():%Y-%m-%d %H:%M:%S}")
    rep.line(f"🤖 Model: {cfg.model}")
    rep.line(f"🔧 Device: {ctx.device} ({ctx.plan.device_reason}); dtype {ctx.plan.dtype_name}")
    if ctx.plan.dtype_note:
        rep.line(f"⚠️  {ctx.plan.dtype_note}")
    rep.line(_plan_line(ctx.plan))
    rep.line(f"📊 Metrics: {', '.join(cfg.metrics)}")
    rep.line(f"🏆 Top-K values: {list(cfg.topk)}")
    rep.line(f"📚 Evaluation texts: {n_texts}")
    rep.line(f"💾 Output directory: {where}")
    rep.rule()


def _load(ctx: Context, timings: dict[str, float], origin: Origin) -> LoadedModel:
    """Read what the driver needs of the checkpoint: config, tokenizer, and the parameters' names
    and shapes (from an empty model on the meta device, checked against the tensors' headers). No
    weight is read (or, from the Hub, downloaded) here: workers and actors read them on their nodes."""
    cfg, rep = ctx.cfg, ctx.rep
    with rep.stage("🤖 Loading Model", timings, "model"):
        dtype = ctx.plan.dtype
        rep.line(f"🔄 Loading {cfg.model} ...")
        path, ckpt = origin.directory, origin.checkpoint
        config = load_config(path, trust_remote_code=cfg.trust_remote_code)
        tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
        skeleton = empty_model(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        checkpoint_keys(skeleton, ckpt)  # every parameter is in the files, in its size: refuse now, not in a worker
        params = dict(skeleton.named_parameters())
        scored = select_parameters(skeleton, include_bias=cfg.include_bias, include_norm=cfg.include_norm)
        shapes = {n: tuple(params[n].shape) for n in scored}
        n_params = sum(p.numel() for p in params.values())
        n_scored = sum(numel(s) for s in shapes.values())
        files = len(ckpt.files)
        rep.line(f"✅ Model: {type(skeleton).__name__} ({origin.kind}), dtype {str(dtype).removeprefix('torch.')}")
        at = f" at commit {origin.revision}" if origin.revision else ""
        rep.line(f"✅ Checkpoint: {path}{at} ({ckpt.nbytes() / 2**30:.2f} GiB in {files} safetensors file(s); "
                 "each worker reads its own part" + (", downloaded on its node" if origin.revision else "") + ")")
        rep.line(f"✅ Parameters: {n_params:,}")
        rep.line(f"✅ Scored: {len(scored)} tensors, {n_scored:,} weights")
        if cfg.max_k > n_scored:
            raise UsageError(
                f"--topk {cfg.max_k} is larger than the {n_scored:,} weights being scored; "
                "lower K or score more parameters (--include-bias, --include-norm)"
            )
        # Local sources travel as absolute paths: a worker's working directory may be another.
        where = cfg.model if origin.kind == "hub" else str(Path(cfg.model).expanduser().resolve())
        model = ModelRef(source=where, checkpoint_dir=str(path), dtype=str(dtype).removeprefix("torch."),
                         trust_remote_code=cfg.trust_remote_code, revision=origin.revision)
    return LoadedModel(model=model, tokenizer=tokenizer, scored=scored, shapes=shapes,
                       model_class=type(skeleton).__name__, num_parameters=n_params,
                       model_bytes=n_params * dtype.itemsize, origin=origin)


def _prepare_data(ctx: Context, texts: list[str], tokenizer) -> tuple[Split, dict]:
    """Texts → windows (never spanning two texts) → a split by text, and the facts the summary records."""
    rep = ctx.rep
    documents = tokenize_documents(tokenizer, texts, ctx.cfg.seq_len, ctx.cfg.stride)
    split = split_documents(documents, ctx.cfg.calibration_fraction, ctx.cfg.seed)
    windows = sum(len(d) for d in documents)
    rep.heading("📚 Evaluation Data")
    rolling = f", rolling with stride {ctx.cfg.stride}" if ctx.cfg.stride not in (None, ctx.cfg.seq_len) else ""
    rep.line(f"✅ {len(texts)} texts → {windows} windows of ≤{ctx.cfg.seq_len} tokens (none spans two texts{rolling})")
    facts = {"texts": len(texts), "windows": windows, "seq_len": ctx.cfg.seq_len, "stride": ctx.cfg.stride}
    for name, text_ids, part in (("calibration", split.calibration_texts, split.calibration),
                                 ("evaluation", split.evaluation_texts, split.evaluation)):
        tokens = predicted_tokens(part)
        rep.line(f"✅ {name.capitalize()}: {len(text_ids)} texts, {len(part)} windows ({tokens:,} predicted tokens)")
        facts[name] = {"texts": text_ids, "windows": len(part), "predicted_tokens": tokens}
    return split, facts


def _sensitivity(ctx: Context, record: RunRecord, loaded: LoadedModel, split: Split) -> ShardScores:
    cfg, rep, scored = ctx.cfg, ctx.rep, loaded.scored
    with rep.stage("🧮 Computing Sensitivity Metrics", record.timings, "sensitivity"):
        settings = cfg.zero_settings()
        lay, backend = ctx.plan.layout, ctx.plan.backend
        if backend == "zero3":
            record.run_dir.write_json("deepspeed_config.json", deepspeed_config(settings, ctx.plan.dtype, ctx.device))
        gpus, cpus = lay.gpus_per_worker, lay.cpus_per_worker
        rep.line(f"🔄 {lay.num_workers} gradient worker(s), backend {backend}, "
                 f"{cpus} CPU(s){f' and {gpus} GPU(s)' if gpus else ''} each")
        group = GradientGroup(loaded.model, num_workers=lay.num_workers, backend=backend, device=ctx.device,
                              cpus_per_worker=cpus, gpus_per_worker=gpus, settings=settings,
                              autoscaling=ctx.joined_cluster, call_timeout_s=cfg.stage_timeout_s,
                              placement_timeout_s=_placement_timeout_s(ctx), on_wait=rep.line,
                              node_gpus=ctx.plan.view.gpu_node.gpus if ctx.plan.view.gpu_node else None)
        try:
            with rep.progress(len(split.calibration), "backward", "chunk") as bar:
                result = group.sensitivity(
                    evaluation=split.evaluation, calibration=split.calibration, scored=scored,
                    metrics=list(cfg.metrics), k=cfg.max_k, batch_size=cfg.batch_size,
                    checkpointing=cfg.gradient_checkpointing,
                    # The ablation study reads gradients back from the ranks after scoring.
                    keep_gradients=bool(cfg.ablation_study and not cfg.no_perturbation),
                    on_baseline=lambda b: rep.line(f"📏 Baseline perplexity (evaluation chunks): {b.value:.4f}"),
                    on_step=bar.update,
                )
            if cfg.ablation_study and not cfg.no_perturbation:
                _study_weights(ctx, record, loaded, group, result.merged)
        finally:
            group.shutdown()
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
        for metric in cfg.metrics:
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


def _placement_timeout_s(ctx: Context) -> float:
    """--placement-timeout-s, else 600 s, or an hour where the autoscaler may have to start GPU
    nodes first (a cold GPU node runs its setup commands before it joins)."""
    if ctx.cfg.placement_timeout_s:
        return ctx.cfg.placement_timeout_s
    return 3600.0 if ctx.joined_cluster and ctx.plan.view.gpus_possible else 600.0


def _study_weights(ctx: Context, record: RunRecord, loaded: LoadedModel, group: GradientGroup,
                   merged: ShardScores) -> None:
    """The weights of the single-weight ablation study (the top N of every metric and N random ones)
    with their score under every metric, read from the ranks while their gradients exist, and
    written to ablation_weights.parquet (a resumed run reads them back)."""
    cfg, n = ctx.cfg, ctx.cfg.ablation_study
    chosen: dict[tuple[str, int], list[str]] = {}
    for m in cfg.metrics:
        c = merged.candidates[m]
        for name, flat in zip(c.names()[:n], c.flat_index[:n].tolist()):
            chosen.setdefault((name, flat), []).append(f"top:{m}")
    numels = [numel(loaded.shapes[x]) for x in loaded.scored]
    draw = random_targets(loaded.scored, numels, min(n, sum(numels)), seed=cfg.seed + 7919)
    for i, flat in zip(draw.param.tolist(), draw.flat_index.tolist()):
        chosen.setdefault((loaded.scored[i], flat), []).append("random")
    wanted: dict[str, list[int]] = {}
    for name, flat in chosen:
        wanted.setdefault(name, []).append(flat)
    values = group.values_at({name: torch.tensor(flats, dtype=torch.int64) for name, flats in wanted.items()})
    frame = ablation.weights_frame(chosen, values, list(cfg.metrics), loaded.shapes)
    record.run_dir.write_parquet("ablation_weights.parquet", frame)
    ctx.rep.line(f"📐 Ablation study: {len(frame)} weights chosen (top {n} of each metric, {n} random), "
                 "each to be zeroed alone")


def _export_ablation(ctx: Context, record: RunRecord, weights: pd.DataFrame, rows: dict) -> None:
    cfg = ctx.cfg
    table = ablation.study_table(weights, rows, ablation_key)
    record.run_dir.write_csv("ablation_study.csv", table)
    record.run_dir.write_parquet("ablation_study.parquet", table)
    summary = ablation.study_summary(table, list(cfg.metrics), samples=cfg.bootstrap_samples, seed=cfg.seed)
    record.fact(ablation_study=summary)
    ctx.rep.line(f"📐 Does sensitivity predict impact? {summary['measured']} weights zeroed one at a time:")
    for m, s in summary["metrics"].items():
        ctx.rep.line(f"  {m}: Spearman ρ(score, ΔNLL) = {s['spearman']:.3f} (95% CI {s['spearman_ci'][0]:.3f}–"
                     f"{s['spearman_ci'][1]:.3f}); its top tenth carries {s['top_tenth_share']:.1%} "
                     "of the total |ΔNLL|")


def _export_rankings(ctx: Context, record: RunRecord, merged: ShardScores, shapes) -> pd.DataFrame:
    cfg, rep, out = ctx.cfg, ctx.rep, record.run_dir
    with rep.stage("🏆 Ranking Critical Weights", record.timings, "ranking"):
        frames = []
        for metric in ranked_metrics(cfg.metrics):
            frame = ranking_frame(metric, merged.candidates[metric], shapes)
            frames.append(frame)
            if metric not in cfg.metrics:  # the control's ranking: in rankings.parquet only
                continue
            for k in cfg.topk:
                out.write_csv(f"top_{k}_weights_{metric}.csv", topk_csv_frame(frame, k))
                top = frame.head(k)
                rep.line(f"  {metric} top-{k}: {top['param'].nunique()} tensors, "
                         f"{top['layer_index'].nunique()} blocks; #1 {top['param'].iloc[0]} {top['indices'].iloc[0]}")
        rankings = pd.concat(frames, ignore_index=True)
        out.write_parquet("rankings.parquet", rankings.drop(columns=["indices"]))
        out.write_json(
            "sensitivity_statistics.json",
            {m: s.finalize() for m, s in merged.statistics.items()},
        )
    return rankings


def _read_rankings(ctx: Context, record: RunRecord) -> pd.DataFrame:
    ctx.rep.line("✅ Sensitivity and ranking: done earlier, read from rankings.parquet")
    return pd.read_parquet(record.run_dir.path / "rankings.parquet")


def _perturbation(ctx: Context, record: RunRecord, loaded: LoadedModel, split: Split,
                  rankings: pd.DataFrame) -> pd.DataFrame:
    cfg, rep = ctx.cfg, ctx.rep
    with rep.stage("🎯 Perturbation Analysis", record.timings, "perturbation"):
        candidates = candidates_from_rankings(rankings)
        specs = plan_experiments(
            # `magnitude` asked for as a metric runs once, as the control, unless the control is off.
            rankings={m: candidates[m] for m in cfg.metrics if m != MAGNITUDE.name or cfg.no_magnitude_control},
            magnitude=candidates[MAGNITUDE.name],
            magnitude_control=not cfg.no_magnitude_control,
            param_names=loaded.scored,
            numels=[numel(loaded.shapes[n]) for n in loaded.scored],
            topk=cfg.topk,
            ratios=cfg.perturbation_ratios,
            random_seeds=cfg.random_seeds,
            seed=cfg.seed,
            mode=cfg.perturbation_mode,
            options=cfg.mode_options(),
        )
        by_key = {s.key: s for s in specs}
        log = ResultLog(record.run_dir.path / "perturbation_results.jsonl", on_write=record.run_dir.on_write)
        # Experiments a killed or failed earlier try finished stay; failed ones run again.
        logged = [r for r in log.repair() if r["status"] == "ok"]
        rows = {r["key"]: r for r in logged if r["key"] in by_key}
        extra_rows = {r["key"]: r for r in logged if r["metric"] in (SUPER_WEIGHT, ABLATION)}
        todo = [s for s in specs if s.key not in rows]
        if rows:
            rep.line(f"🔁 {len(rows)} of {len(specs)} experiments finished earlier; running the other {len(todo)}")
        chunks = split.evaluation[: cfg.fast_eval_chunks] if cfg.fast_perturbation else split.evaluation
        intact = True
        need_super = cfg.super_weights > 0 and "super_weights" not in record.summary
        need_ablation = cfg.ablation_study > 0 and "ablation_study" not in record.summary
        study = pd.read_parquet(record.run_dir.path / "ablation_weights.parquet") if need_ablation else None
        if todo or need_super or need_ablation:
            n_extra = cfg.super_weights + (len(study) if need_ablation else 0)
            n_actors = actor_count(cfg, ctx.device, len(todo) + n_extra, loaded.model_bytes, settled_free_resources(),
                                   gpus_per_actor=ctx.plan.layout.gpus_per_eval_actor)
            rep.line(f"📊 Running {len(todo)} perturbation experiments on {n_actors} actor(s), "
                     f"{len(chunks)} evaluation chunk(s) each")
            pool = EvalPool(loaded.model, chunks, num_actors=n_actors, device=ctx.device,
                            gpus_per_actor=ctx.plan.layout.gpus_per_eval_actor, batch_size=cfg.batch_size,
                            replay_budget_bytes=cfg.replay_budget_bytes)
            try:
                described = pool.describe()
                baselines = {round(b.value, 6) for _, b in described}
                tokens = window_tokens(chunks)
                interval = _baseline_interval(tokens, described[0][1], cfg)
                record.fact(baseline_perplexity_ci=interval)
                rep.line(f"📏 Baseline perplexity on the actors: {described[0][1].value:.4f} (95% CI {interval[0]:.4f}–"
                         f"{interval[1]:.4f}, bootstrap over {len(tokens)} evaluation windows)")
                if len(baselines) > 1:
                    rep.line(f"⚠️  actors disagree on the baseline perplexity: {sorted(baselines)}")
                found, extra_specs = [], {}
                if need_super:
                    found = pool.super_weights(split.calibration[:8], cfg.super_weights)
                    extra_specs.update({spec.key: spec for spec in map(super_weight_spec, found)})
                    rep.line(f"🦸 {len(found)} super-weight candidate(s) from MLP down-projection activation outliers; "
                             "each is zeroed alone")
                if need_ablation:
                    extra_specs.update({spec.key: spec for spec in (
                        ablation_spec(r.param, r.flat_index) for r in study.itertuples(index=False))})
                extra_todo = [spec for key, spec in extra_specs.items() if key not in extra_rows]
                every = {**by_key, **extra_specs}
                with rep.progress(len(todo) + len(extra_todo), "experiments", "exp") as bar:
                    def keep(row: dict) -> None:
                        log.append(row)
                        (rows if row["key"] in by_key else extra_rows)[row["key"]] = row
                        bar.update(1)
                        bar.write(f"  {_describe(row)}")

                    pool.run(
                        todo + extra_todo,
                        on_result=lambda r: keep(_result_row(every[r.key], r, tokens, cfg)),
                        on_failure=lambda spec, error: keep(_failed_row(spec, error, min(baselines))),
                        max_retries=cfg.max_retries,
                        timeout_s=cfg.experiment_timeout_s,
                    )
                intact = pool.all_weights_intact()
                actors = pool.memory()
                for a in actors:
                    rep.detail(f"  actor {a['actor']}: loaded in {a['load_s']:.1f}s, peak RSS "
                               f"{a['peak_rss_bytes'] / 2**30:.2f} GiB"
                               + (f", peak GPU {a['peak_device_bytes'] / 2**30:.2f} GiB"
                                  if a["peak_device_bytes"] else ""))
                record.memory(eval_actors=actors)
                if need_super:
                    _export_super_weights(ctx, record, found, extra_rows, rankings)
                if need_ablation:
                    _export_ablation(ctx, record, study, extra_rows)
            finally:
                pool.shutdown()
        results = pd.DataFrame([rows[s.key] for s in specs], columns=list(PERTURBATION_COLUMNS))
        record.run_dir.write_csv("perturbation_results.csv", results)
        record.run_dir.write_parquet("perturbation_results.parquet", results)
        ok = results[results["status"] == "ok"]
        inexact = int((results["restored_exact"] == False).sum())  # noqa: E712 (None: never ran)
        rep.line(f"✅ Completed {len(ok)}/{len(specs)} experiments; {len(results) - len(ok)} failed; "
                 f"{inexact} not restored bit-exactly; all weights intact at the end: {intact}")
        if inexact or not intact:
            raise RuntimeError("a perturbation was not restored exactly; the results after it are not trustworthy")
        record.fact(weights_intact_after_perturbation=intact, experiments_failed=len(results) - len(ok))
    return results


def _export_super_weights(ctx: Context, record: RunRecord, found: list, rows: dict, rankings: pd.DataFrame) -> None:
    """super_weights.csv/.parquet and the summary's list: each candidate, its zeroed-alone
    perplexity, and its rank under every ranking (empty when outside that ranking's top-K)."""
    table = super_weight_table(found, rows, rankings, ranked_metrics(ctx.cfg.metrics))
    record.run_dir.write_csv("super_weights.csv", table)
    record.run_dir.write_parquet("super_weights.parquet", table)
    record.fact(super_weights=json.loads(table.to_json(orient="records")))
    for c in table.itertuples(index=False):
        ranks = ", ".join(f"{m} {getattr(c, 'rank_' + m) if pd.notna(getattr(c, 'rank_' + m)) else '>K'}"
                          for m in ranked_metrics(ctx.cfg.metrics))
        ctx.rep.line(f"  🦸 {c.param} [{c.row}, {c.col}] = {c.weight:.4g}, "
                     f"|activation| in {c.max_input_activation:.4g} → "
                     f"out {c.max_output_activation:.4g}: zeroed alone PPL {c.baseline_ppl:.2f} → {c.zeroed_ppl:.2f} "
                     f"(×{c.ppl_ratio:.3g}); rank: {ranks}")


def _failed_row(spec: PerturbationSpec, error: str, baseline_ppl: float) -> dict:
    """An experiment that kept failing: recorded, not dropped."""
    return {
        "metric": spec.method, "topk": spec.topk, "mask_ratio": spec.mask_ratio,
        "weights_masked": len(spec.targets), "baseline_ppl": baseline_ppl, "perturbed_ppl": float("nan"),
        "ppl_increase": float("nan"), "ppl_ratio": float("nan"), "ppl_ci_low": float("nan"),
        "ppl_ci_high": float("nan"), "ppl_ratio_ci_low": float("nan"), "ppl_ratio_ci_high": float("nan"),
        "is_control": spec.is_control, "seed": spec.seed,
        "mode": spec.mode, "eval_tokens": 0, "wall_s": 0.0, "restored_exact": None, "actor": "", "key": spec.key,
        "status": "failed", "error": error,
    }


def _baseline_interval(tokens: list[int], baseline, cfg: RunConfig) -> list[float]:
    ci = bootstrap_intervals(tokens, baseline.window_nll, baseline.window_nll, samples=cfg.bootstrap_samples,
                             seed=cfg.seed)
    return [ci["ppl_ci_low"], ci["ppl_ci_high"]]


def _result_row(spec: PerturbationSpec, r: ExperimentResult, tokens: list[int], cfg: RunConfig) -> dict:
    base, pert = r.baseline.value, r.perturbed.value
    ci = bootstrap_intervals(tokens, r.baseline.window_nll, r.perturbed.window_nll, samples=cfg.bootstrap_samples,
                             seed=cfg.seed)
    return {
        "metric": spec.method,
        "topk": spec.topk,
        "mask_ratio": spec.mask_ratio,
        "weights_masked": r.weights_masked,
        "baseline_ppl": base,
        "perturbed_ppl": pert,
        "ppl_increase": pert - base,
        "ppl_ratio": pert / base,
        **ci,
        "is_control": spec.is_control,
        "seed": spec.seed,
        "mode": spec.mode,
        "eval_tokens": r.perturbed.tokens,
        "wall_s": round(r.wall_s, 3),
        "restored_exact": r.restored_exact,
        "actor": r.actor,
        "key": r.key,
        # A restore that was not bit-exact leaves the actor's model changed: the run fails, and a
        # resume must run this experiment again rather than keep it.
        "status": "ok" if r.restored_exact else "failed",
        "error": "" if r.restored_exact else "the weights were not restored bit for bit after this experiment",
    }


def _describe(row: dict) -> str:
    if row["metric"] in (SUPER_WEIGHT, ABLATION) and row["status"] == "ok":
        return (f"{row['metric'].replace('_', ' ')} {row['key'].split('|', 1)[1]}: "
                f"PPL {row['baseline_ppl']:.2f} → {row['perturbed_ppl']:.2f} "
                f"(×{row['ppl_ratio']:.3g})")
    seed = f" seed {row['seed']}" if row["seed"] is not None else ""
    if row["status"] != "ok":
        return f"{row['metric']}{seed} Top-{row['topk']} {row['mask_ratio']:.0%}: FAILED ({row['error']})"
    return (f"{row['metric']}{seed} Top-{row['topk']} {row['mask_ratio']:.0%}: "
            f"PPL {row['baseline_ppl']:.2f} → {row['perturbed_ppl']:.2f} ({row['ppl_increase']:+.2f}; "
            f"ratio 95% CI {row['ppl_ratio_ci_low']:.3g}–{row['ppl_ratio_ci_high']:.3g})")


def _finish(ctx: Context, record: RunRecord, rankings: pd.DataFrame, results: pd.DataFrame | None) -> None:
    cfg, rep, out = ctx.cfg, ctx.rep, record.run_dir
    with rep.stage("💾 Exporting Results", record.timings, "export"):
        out.write_figure("plots/topk_by_layer.png", plots.topk_by_layer(rankings[rankings["metric"].isin(cfg.metrics)]))
        final: dict = {}
        ok = None if results is None else results[results["status"] == "ok"]
        final["experiments_completed"] = 0 if ok is None else len(ok)
        if ok is not None and len(ok):
            final.update(_perturbation_summary(ok))
            out.write_figure("plots/ppl_vs_masked.png", plots.perplexity_vs_masked(ok, ok["baseline_ppl"].iloc[0]))
        else:
            final["max_ppl_increase"] = None
        driver_peak = peak_rss_bytes()
        record.memory(driver={"peak_rss_bytes": driver_peak})
        rep.detail(f"  driver: peak RSS {driver_peak / 2**30:.2f} GiB")
        summary = record.complete(**final, run_directory=out.where, stage_timings_s=dict(record.timings))
        _write_report(ctx, out)
        for f in sorted(p.relative_to(out.path) for p in out.path.rglob("*") if p.is_file()):
            rep.detail(f"  ✅ {f}")
    _final_report(ctx, summary)


def _write_report(ctx: Context, out) -> None:
    """report.html, last: every result is already on disk, so a failure here loses nothing."""
    try:
        out.write_text("report.html", html_report.build(out.path))
    except Exception as e:  # noqa: BLE001 - the run's results stand without the page
        ctx.rep.line(f"⚠️  report.html could not be built ({last_line(e, 200)}); the results are complete. "
                     f"Rebuild it with: python -m cwa_dist.html_report {out.path}")


def _perturbation_summary(results: pd.DataFrame) -> dict:
    metric_rows = results[~results["is_control"]]
    # A NaN perplexity (weights made inf or NaN, e.g. by bit_flip) is a destroyed model, not a maximum.
    increases = metric_rows["ppl_increase"].dropna()
    best = metric_rows.loc[increases.idxmax()] if len(increases) else None
    comparison = []
    for (k, r), df in results.groupby(["topk", "mask_ratio"], sort=True):
        entry = {"topk": int(k), "mask_ratio": float(r), "weights_masked": int(df["weights_masked"].iloc[0])}
        for metric, g in df[~df["is_control"]].groupby("metric"):
            entry[metric] = float(g["perturbed_ppl"].iloc[0])
        rnd = df[df["metric"] == "random"]["perturbed_ppl"]
        if len(rnd):
            entry["random_mean"] = float(rnd.mean())
            entry["random_min"] = float(rnd.min())
            entry["random_max"] = float(rnd.max())
            entry["random_std"] = float(rnd.std(ddof=1)) if len(rnd) > 1 else 0.0
        mag = df[df["metric"] == "magnitude"]["perturbed_ppl"]
        if len(mag):
            entry["magnitude"] = float(mag.iloc[0])
        comparison.append(entry)
    out = {
        "max_ppl_increase": float(increases.max()) if len(increases) else None,
        "comparison": comparison,
    }
    if best is not None:
        out["most_impactful_perturbation"] = {
            "metric": best["metric"],
            "topk": int(best["topk"]),
            "mask_ratio": float(best["mask_ratio"]),
            "weights_masked": int(best["weights_masked"]),
            "baseline_ppl": float(best["baseline_ppl"]),
            "perturbed_ppl": float(best["perturbed_ppl"]),
            "ppl_increase": float(best["ppl_increase"]),
        }
    return out


def _final_report(ctx: Context, summary: dict) -> None:
    rep = ctx.rep
    rep.line()
    rep.line("🔬 Analysis Complete - Summary")
    rep.rule()
    rep.line(f"🤖 Model: {summary['model_name']}")
    rep.line(f"📏 Baseline PPL: {summary['baseline_perplexity']:.2f}")
    rep.line(f"🎯 Perturbation experiments: {summary['experiments_completed']}")
    if summary.get("max_ppl_increase") is not None:
        rep.line(f"📈 Max PPL increase: {summary['max_ppl_increase']:.2f}")
    best = summary.get("most_impactful_perturbation")
    if best:
        rep.line("🏆 Most Impactful Perturbation:")
        rep.line(f"  {best['metric']} Top-{best['topk']} at {best['mask_ratio']:.0%} masking "
                 f"({best['weights_masked']} weights)")
        rep.line(f"  PPL: {best['baseline_ppl']:.2f} → {best['perturbed_ppl']:.2f} ({best['ppl_increase']:+.2f})")
        for entry in summary["comparison"]:
            if entry["topk"] == best["topk"] and entry["mask_ratio"] == best["mask_ratio"]:
                controls = []
                if "random_mean" in entry:
                    controls.append(f"random {entry['random_mean']:.2f} (mean; {entry['random_min']:.2f}–"
                                    f"{entry['random_max']:.2f} over the seeds)")
                if "magnitude" in entry:
                    controls.append(f"largest |W| {entry['magnitude']:.2f}")
                if controls:
                    rep.line(f"  Controls, same number of weights: {', '.join(controls)}")
    rep.line(f"📁 Results: {summary['run_directory']}")
    rep.line("🎉 Analysis complete!")
