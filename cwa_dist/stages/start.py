"""The run's opening: its console header, and its record (a new run directory's, or the record of
an earlier try to continue)."""

from __future__ import annotations

import datetime as dt

from cwa_dist.analysis.sensitivity import numel
from cwa_dist.distributed.runtime import cluster_resources
from cwa_dist.modeling.corpus import Corpus
from cwa_dist.planning.resume import config_record
from cwa_dist.planning.run_plan import RunPlan
from cwa_dist.reporting.outputs import RunDirectory, RunRecord
from cwa_dist.reporting.provenance import git_revision, host, versions
from cwa_dist.reporting.storage import Output
from cwa_dist.stages.context import Context, LoadedModel


def header(ctx: Context, where: str, corpus: Corpus) -> None:
    cfg, rep = ctx.cfg, ctx.rep
    rep.line("🔬 Critical Weight Analysis (cwa_dist)")
    rep.rule()
    rep.line(f"📅 Started: {dt.datetime.now():%Y-%m-%d %H:%M:%S}")
    rep.line(f"🤖 Model: {cfg.model.name}")
    rep.line(f"🔧 Device: {ctx.device} ({ctx.plan.device_reason}); dtype {ctx.plan.dtype_name}")
    if ctx.plan.dtype_note:
        rep.line(f"⚠️  {ctx.plan.dtype_note}")
    rep.line(_plan_line(ctx.plan))
    rep.line(f"📊 Metrics: {', '.join(cfg.analysis.metrics)}")
    rep.line(f"🏆 Top-K values: {list(cfg.analysis.topk)}")
    rep.line(f"📚 Evaluation texts: {len(corpus.texts)} ({corpus.describe()})")
    rep.line(f"💾 Output directory: {where}")
    rep.rule()


def _plan_line(plan: RunPlan) -> str:
    lay = plan.layout
    gpus = f" and {lay.gpus_per_worker} GPU(s)" if lay.gpus_per_worker else ""
    actors = ""
    if lay.num_eval_actors:
        each = f" of {lay.gpus_per_eval_actor} GPU(s)" if plan.device == "cuda" else ""
        actors = f"; {lay.num_eval_actors} evaluation actor(s){each}"
    return f"🧭 Plan: {lay.num_workers} gradient worker(s) of {lay.cpus_per_worker} CPU(s){gpus}{actors}; it fits"


def open_record(ctx: Context, output: Output, experiment_id: str, previous: dict | None, loaded: LoadedModel,
                identity: dict, corpus: Corpus) -> RunRecord:
    """The record of an earlier try to continue, or of a new run directory (config.json written)."""
    cfg, rep = ctx.cfg, ctx.rep
    run_dir = RunDirectory.create(output.local / experiment_id, on_write=output.uploader(experiment_id),
                                  where=output.where(experiment_id), exists_ok=bool(previous))
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
    recorded = {"plan": ctx.plan.record(), "checkpoint": loaded.origin.record(), "corpus": corpus.record}
    record.set(**recorded)
    record.run_dir.write_json("config.json", {**config_record(cfg, experiment_id, ctx.device), **identity,
                                              **recorded})
    return record


def record_facts(ctx: Context, record: RunRecord, loaded: LoadedModel, timings: dict[str, float],
                 data_facts: dict) -> None:
    """What the summary says of the model and the data, once both are known; the model stage is done."""
    record.timings.update(timings)
    record.fact(model_name=ctx.cfg.model.name, num_parameters=loaded.num_parameters,
                num_scored_weights=sum(numel(s) for s in loaded.shapes.values()), data=data_facts)
    record.mark("model")
