"""The perturbation stage: experiments planned from the rankings, run on the evaluation actors,
logged as they finish (a resumed run keeps what an earlier try finished), then written as tables;
super-weight candidates, the ablation study's single weights and the quantization study's kept sets
run in the same pool."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from cwa_dist.analysis import ablation
from cwa_dist.analysis.data import Split
from cwa_dist.analysis.evaluate import window_tokens
from cwa_dist.analysis.experiments import (
    ABLATION,
    SUPER_WEIGHT,
    ablation_key,
    ablation_spec,
    plan_experiments,
    super_weight_spec,
)
from cwa_dist.analysis.metrics import MAGNITUDE, ranked_metrics
from cwa_dist.analysis.perturb import PerturbationSpec
from cwa_dist.analysis.quantize import QUANTIZATION
from cwa_dist.analysis.sensitivity import numel
from cwa_dist.distributed.eval_actors import EvalPool
from cwa_dist.distributed.runtime import available_resources, settled_free_resources
from cwa_dist.planning.placement import actor_count
from cwa_dist.planning.resume import ResultLog
from cwa_dist.reporting.outputs import PERTURBATION_COLUMNS, RunRecord, candidates_from_rankings, super_weight_table
from cwa_dist.reporting.results import baseline_interval, describe, failed_row, result_row, with_extra_columns
from cwa_dist.stages import quantization
from cwa_dist.stages.context import Context, LoadedModel


@dataclass
class _Experiments:
    """The stage's experiments and what is known of them: those planned from the rankings, those
    finished (by an earlier try too), and the extra single-weight ones (super weights, ablation)."""

    specs: list[PerturbationSpec]
    log: ResultLog
    rows: dict[str, dict]  # key → row, of the planned experiments
    extra_rows: dict[str, dict]  # key → row, of super-weight and ablation experiments
    by_key: dict[str, PerturbationSpec] = field(init=False)

    def __post_init__(self):
        self.by_key = {s.key: s for s in self.specs}

    @property
    def todo(self) -> list[PerturbationSpec]:
        return [s for s in self.specs if s.key not in self.rows]

    def keep(self, row: dict) -> None:
        self.log.append(row)
        (self.rows if row["key"] in self.by_key else self.extra_rows)[row["key"]] = row


def run(ctx: Context, record: RunRecord, loaded: LoadedModel, split: Split, rankings: pd.DataFrame) -> pd.DataFrame:
    cfg, rep = ctx.cfg, ctx.rep
    with rep.stage("🎯 Perturbation Analysis", record.timings, "perturbation"):
        work = _resume(ctx, record, _plan(ctx, loaded, rankings))
        need_super = cfg.perturbation.super_weights > 0 and "super_weights" not in record.summary
        need_ablation = cfg.perturbation.ablation_study > 0 and "ablation_study" not in record.summary
        need_quant = cfg.perturbation.quantization_study > 0 and "quantization_study" not in record.summary
        intact = True
        if work.todo or need_super or need_ablation or need_quant:
            intact = _on_actors(ctx, record, loaded, split, rankings, work, need_super, need_ablation, need_quant)
        rows = [work.rows[s.key] for s in work.specs]
        results = pd.DataFrame(rows, columns=with_extra_columns(PERTURBATION_COLUMNS, rows))
        record.run_dir.write_csv("perturbation_results.csv", results)
        record.run_dir.write_parquet("perturbation_results.parquet", results)
        ok = results[results["status"] == "ok"]
        if "baseline_perplexity" not in record.summary and len(ok):  # every experiment ran in an earlier try
            record.fact(baseline_perplexity=float(ok["baseline_ppl"].iloc[0]))
        inexact = int((results["restored_exact"] == False).sum())  # noqa: E712 (None: never ran)
        rep.line(f"✅ Completed {len(ok)}/{len(work.specs)} experiments; {len(results) - len(ok)} failed; "
                 f"{inexact} not restored bit-exactly; all weights intact at the end: {intact}")
        if inexact or not intact:
            raise RuntimeError("a perturbation was not restored exactly; the results after it are not trustworthy")
        record.fact(weights_intact_after_perturbation=intact, experiments_failed=len(results) - len(ok))
    return results


def read(record: RunRecord) -> pd.DataFrame:
    """The results of a run whose perturbation stage finished earlier."""
    return pd.read_parquet(record.run_dir.path / "perturbation_results.parquet")


def _plan(ctx: Context, loaded: LoadedModel, rankings: pd.DataFrame, topk=None,
          ratios=None) -> list[PerturbationSpec]:
    """The experiments and controls at every K and ratio (or at the `topk` and `ratios` given)."""
    cfg = ctx.cfg
    candidates = candidates_from_rankings(rankings)
    return plan_experiments(
        rankings={m: candidates[m] for m in cfg.perturbed_metrics},
        magnitude=candidates[MAGNITUDE.name],
        magnitude_control=not cfg.perturbation.no_magnitude_control,
        param_names=loaded.scored,
        numels=[numel(loaded.shapes[n]) for n in loaded.scored],
        topk=topk or cfg.analysis.topk,
        ratios=ratios or cfg.perturbation.ratios,
        random_seeds=cfg.perturbation.random_seeds,
        same_tensor_seeds=cfg.perturbation.same_tensor_seeds,
        seed=cfg.data.seed,
        mode=cfg.perturbation.mode,
        options=cfg.perturbation.options,
    )


def _resume(ctx: Context, record: RunRecord, specs: list[PerturbationSpec]) -> _Experiments:
    """The experiments a killed or failed earlier try finished stay; failed ones run again."""
    by_key = {s.key: s for s in specs}
    log = ResultLog(record.run_dir.path / "perturbation_results.jsonl", on_write=record.run_dir.on_write)
    logged = [r for r in log.repair() if r["status"] == "ok"]
    work = _Experiments(specs, log, rows={r["key"]: r for r in logged if r["key"] in by_key},
                        extra_rows={r["key"]: r for r in logged
                                    if r["metric"] in (SUPER_WEIGHT, ABLATION, QUANTIZATION)})
    if work.rows:
        ctx.rep.line(f"🔁 {len(work.rows)} of {len(specs)} experiments finished earlier; "
                     f"running the other {len(work.todo)}")
    return work


def _on_actors(ctx: Context, record: RunRecord, loaded: LoadedModel, split: Split, rankings: pd.DataFrame,
               work: _Experiments, need_super: bool, need_ablation: bool, need_quant: bool) -> bool:
    """Run what is left on a pool of evaluation actors; True when every actor's weights are intact
    at the end."""
    cfg, rep = ctx.cfg, ctx.rep
    fast = cfg.perturbation.fast_perturbation
    chunks = split.evaluation[: cfg.perturbation.fast_eval_chunks] if fast else split.evaluation
    study = pd.read_parquet(record.run_dir.path / "ablation_weights.parquet") if need_ablation else None
    todo = work.todo
    n_extra = cfg.perturbation.super_weights + (len(study) if need_ablation else 0)
    # The quantization study keeps each top-K set and control of the largest K (ratio 1), besides
    # nothing and the super weights.
    top_sets = _plan(ctx, loaded, rankings, topk=(cfg.analysis.max_k,), ratios=(1.0,)) if need_quant else []
    n_extra += (2 + len(top_sets)) if need_quant else 0
    kept = ctx.handover.take()  # the gradient worker, serving as the first actor
    try:
        n_actors = actor_count(cfg, ctx.device, len(todo) + n_extra, loaded.model_bytes, _free_for_actors(kept),
                               gpus_per_actor=ctx.plan.layout.gpus_per_eval_actor)
        rep.line(f"📊 Running {len(todo)} perturbation experiments on {n_actors} actor(s), "
                 f"{len(chunks)} evaluation chunk(s) each"
                 + ("; the gradient worker is the first, on the replica it holds" if kept else ""))
        pool = EvalPool(loaded.model, chunks, num_actors=n_actors, device=ctx.device,
                        gpus_per_actor=ctx.plan.layout.gpus_per_eval_actor, batch_size=cfg.data.batch_size,
                        replay_budget_bytes=cfg.perturbation.replay_budget_bytes,
                        zero_shot=cfg.perturbation.task_request(cfg.data.batch_size), kept=kept)
    except BaseException:
        if kept is not None:
            kept.release()
        raise
    try:
        # The first actor to load starts the experiments; the others join as they load.
        _, baseline = pool.first_ready()
        tokens = window_tokens(chunks)
        interval = baseline_interval(tokens, baseline, cfg)
        record.fact(baseline_perplexity=baseline.value, baseline_perplexity_ci=interval)
        rep.line(f"📏 Baseline perplexity on the actors: {baseline.value:.4f} (95% CI {interval[0]:.4f}–"
                 f"{interval[1]:.4f}, bootstrap over {len(tokens)} evaluation windows)")
        if cfg.perturbation.eval_tasks:
            _baseline_tasks(ctx, record, pool.baseline_tasks())
        found, extra_specs = [], {}
        if need_super:
            found = pool.super_weights(split.calibration[:8], cfg.perturbation.super_weights)
            extra_specs.update({spec.key: spec for spec in map(super_weight_spec, found)})
            rep.line(f"🦸 {len(found)} super-weight candidate(s) from MLP down-projection activation outliers; "
                     "each is zeroed alone")
        if need_ablation:
            extra_specs.update({spec.key: spec for spec in (
                ablation_spec(r.param, r.flat_index) for r in study.itertuples(index=False))})
        quant_specs = []
        if need_quant:
            quant_specs = quantization.plan(ctx, loaded, top_sets, _super_weight_targets(record, found))
            extra_specs.update({spec.key: spec for spec in quant_specs})
        extra_todo = [spec for key, spec in extra_specs.items() if key not in work.extra_rows]
        every = {**work.by_key, **extra_specs}
        with rep.progress(len(todo) + len(extra_todo), "experiments", "exp") as bar:
            def keep(row: dict) -> None:
                work.keep(row)
                bar.update(1)
                bar.write(f"  {describe(row)}")

            pool.run(
                todo + extra_todo,
                on_result=lambda r: keep(_logged_row(every[r.key], r, tokens, cfg)),
                on_failure=lambda spec, error: keep(failed_row(spec, error, baseline.value)),
                max_retries=cfg.run.max_retries,
                timeout_s=cfg.run.experiment_timeout_s,
            )
        baselines = {round(b.value, 6) for b in pool.baselines.values()}
        if len(baselines) > 1:
            rep.line(f"⚠️  actors disagree on the baseline perplexity: {sorted(baselines)}")
        intact = pool.all_weights_intact()
        actors = pool.memory()
        for a in actors:
            rep.detail(f"  actor {a['actor']}: loaded in {a['load_s']:.1f}s, peak RSS "
                       f"{a['peak_rss_bytes'] / 2**30:.2f} GiB"
                       + (f", peak GPU {a['peak_device_bytes'] / 2**30:.2f} GiB"
                          if a["peak_device_bytes"] else ""))
        record.memory(eval_actors=actors)
        if need_super:
            _export_super_weights(ctx, record, found, work.extra_rows, rankings)
        if need_ablation:
            _export_ablation(ctx, record, study, work.extra_rows)
        if need_quant:
            quantization.export(ctx, record, quant_specs, work.extra_rows, tokens)
    finally:
        pool.shutdown()
    return intact


def _free_for_actors(kept) -> dict:
    """What the actors can use: with a kept gradient worker, what is free now plus its bundle's CPUs
    (the worker and the actors placed there); without, what the gradient stage handed back."""
    if kept is None:
        return settled_free_resources()
    free = dict(available_resources())
    free["CPU"] = free.get("CPU", 0) + kept.bundle_cpus
    return free


def _logged_row(spec: PerturbationSpec, r, tokens: list[int], cfg) -> dict:
    """An experiment's row as logged; a quantization study's keeps its per-window NLLs, which its
    paired interval against nothing kept needs (resumed runs included)."""
    row = result_row(spec, r, tokens, cfg)
    if spec.method == QUANTIZATION:
        row["window_nll"] = list(r.perturbed.window_nll)
    return row


def _super_weight_targets(record: RunRecord, found: list) -> list[tuple[str, int]]:
    """The super-weight candidates as (parameter, flat index): just found, or written by an earlier try."""
    if found:
        return [(c.param, c.flat_index) for c in found]
    path = record.run_dir.path / "super_weights.parquet"
    table = pd.read_parquet(path) if path.is_file() else None
    return [] if table is None else list(zip(table["param"], table["flat_index"].astype(int)))


def _baseline_tasks(ctx: Context, record: RunRecord, scores: dict) -> None:
    facts = {task: {"examples": s.examples, **{m: {"value": s.mean(m), "stderr": s.stderr(m)} for m in s.metrics}}
             for task, s in scores.items()}
    record.fact(baseline_tasks=facts)
    for task, s in scores.items():
        shown = ", ".join(f"{m} {s.mean(m):.4f} ± {s.stderr(m):.4f}" for m in s.metrics)
        ctx.rep.line(f"🧪 Baseline {task} ({s.examples} examples): {shown}")


def _export_super_weights(ctx: Context, record: RunRecord, found: list, rows: dict, rankings: pd.DataFrame) -> None:
    """super_weights.csv/.parquet and the summary's list: each candidate, its zeroed-alone
    perplexity, and its rank under every ranking (empty when outside that ranking's top-K)."""
    table = super_weight_table(found, rows, rankings, ranked_metrics(ctx.cfg.analysis.metrics))
    record.run_dir.write_csv("super_weights.csv", table)
    record.run_dir.write_parquet("super_weights.parquet", table)
    record.fact(super_weights=json.loads(table.to_json(orient="records")))
    for c in table.itertuples(index=False):
        ranks = ", ".join(f"{m} {getattr(c, 'rank_' + m) if pd.notna(getattr(c, 'rank_' + m)) else '>K'}"
                          for m in ranked_metrics(ctx.cfg.analysis.metrics))
        where = f"{c.row}, {c.col}" if pd.isna(c.expert) else f"expert {c.expert}: {c.row}, {c.col}"
        ctx.rep.line(f"  🦸 {c.param} [{where}] = {c.weight:.4g}, "
                     f"|activation| in {c.max_input_activation:.4g} → "
                     f"out {c.max_output_activation:.4g}: zeroed alone PPL {c.baseline_ppl:.2f} → {c.zeroed_ppl:.2f} "
                     f"(×{c.ppl_ratio:.3g}); rank: {ranks}")


def _export_ablation(ctx: Context, record: RunRecord, weights: pd.DataFrame, rows: dict) -> None:
    cfg = ctx.cfg
    table = ablation.study_table(weights, rows, ablation_key)
    record.run_dir.write_csv("ablation_study.csv", table)
    record.run_dir.write_parquet("ablation_study.parquet", table)
    summary = ablation.study_summary(table, list(cfg.analysis.metrics), samples=cfg.perturbation.bootstrap_samples,
                                     seed=cfg.data.seed)
    record.fact(ablation_study=summary)
    ctx.rep.line(f"📐 Does sensitivity predict impact? {summary['measured']} weights zeroed one at a time:")
    for m, s in summary["metrics"].items():
        ctx.rep.line(f"  {m}: Spearman ρ(score, ΔNLL) = {s['spearman']:.3f} (95% CI {s['spearman_ci'][0]:.3f}–"
                     f"{s['spearman_ci'][1]:.3f}); its top tenth carries {s['top_tenth_share']:.1%} "
                     "of the total |ΔNLL|")
