"""A run, as the list of its stages (cwa_dist/stages/): plan → start → model → data → sensitivity →
ranking → perturbation → export.

The driver holds no weights: workers and actors read them and compute; the stages, on the driver,
write the run directory through one RunRecord, which skips the stages an earlier try finished.
"""

from __future__ import annotations

import os

from cwa_dist.analysis.perturb import flip_bit_index
from cwa_dist.analysis.zero_shot import check_tasks
from cwa_dist.config import RunConfig
from cwa_dist.distributed.runtime import start_ray, stop_ray, stop_ray_beside
from cwa_dist.errors import UsageError
from cwa_dist.modeling.corpus import read_corpus
from cwa_dist.modeling.sources import resolve_origin, resolve_source
from cwa_dist.planning import resume
from cwa_dist.planning.run_plan import refusal
from cwa_dist.reporting.console import Reporter
from cwa_dist.reporting.outputs import RunDirectory
from cwa_dist.reporting.process_clock import ProcessClock, timeline_lines
from cwa_dist.reporting.storage import Output, durable_output
from cwa_dist.stages import data, export, model, perturbation, ranking, sensitivity, start
from cwa_dist.stages.context import Context
from cwa_dist.stages.plan import cluster_view, dry_run, plan_run


def run(cfg: RunConfig, rep: Reporter | None = None) -> RunDirectory | None:
    """The stages, in order; None for a dry run, which plans and writes nothing."""
    rep = rep or Reporter(cfg.run.verbose)
    rep.clock = ProcessClock()
    try:
        return _run(cfg, rep)
    finally:
        rep.clock.stop()


def _run(cfg: RunConfig, rep: Reporter) -> RunDirectory | None:
    if cfg.perturbation.eval_tasks:  # a missing harness or an unknown task: refused before any stage
        check_tasks(cfg.perturbation.eval_tasks, cfg.perturbation.eval_tasks_include)
    if cfg.run.dry_run:
        _plan_only(cfg, rep)
        return None
    corpus = read_corpus(cfg.data, rep.line)  # cheap input errors before anything slow
    texts = corpus.texts
    output = Output(durable_output(cfg.run.output, rep.line))
    output.check_writable()
    experiment_id = resume.experiment_id(cfg, output)
    output.pull(experiment_id)  # a run stored under a URI: its files, to continue it
    where, run_path = output.where(experiment_id), output.local / experiment_id
    previous = resume.previous_run(cfg, run_path, where, experiment_id)
    if previous and previous.get("status") == "complete":
        rep.line(f"✅ {where} is already complete; nothing to resume")
        return RunDirectory(run_path, where=where)
    rep.phase("Ray start-up")
    started_ray = start_ray(cfg.run.ray_address, verbose=cfg.run.verbose)
    record, stopper, ctx = None, None, None
    try:
        rep.phase("plan")
        ctx = _context(cfg, rep)
        # The weights' origin: a Hub id's commit (pinned for every node), or the local checkpoint.
        origin = resolve_origin(resolve_source(cfg.model.name), revision=cfg.model.revision, announce=rep.line)
        identity = resume.run_identity(texts, ctx.plan.dtype, origin.identity, corpus.revision)
        if previous:
            resume.check_identity(run_path, where, identity)
        start.header(ctx, where, corpus)
        timings: dict[str, float] = {}
        loaded = model.load(ctx, timings, origin)
        rep.phase("data")
        split, data_facts = data.prepare(ctx, texts, loaded.tokenizer)
        record = start.open_record(ctx, output, experiment_id, previous, loaded, identity, corpus)
        start.record_facts(ctx, record, loaded, timings, data_facts)
        try:
            rankings = record.stage(
                "ranking",
                compute=lambda: ranking.export(ctx, record, sensitivity.run(ctx, record, loaded, split),
                                               loaded.shapes),
                restore=lambda: ranking.read(ctx, record),
            )
            results = None
            if not cfg.perturbation.no_perturbation:
                results = record.stage(
                    "perturbation",
                    compute=lambda: perturbation.run(ctx, record, loaded, split, rankings),
                    restore=lambda: perturbation.read(record),
                )
            ctx.handover.release()  # a gradient worker kept for actors that did not run
            if started_ray:  # nothing after this needs Ray
                stopper = stop_ray_beside()
            export.finish(ctx, record, rankings, results)
        except BaseException as e:
            record.fail(e)
            raise
        return record.run_dir
    finally:
        rep.phase("Ray shutdown")
        if ctx is not None:  # a no-op once the worker was taken or released above
            ctx.handover.release()
        if stopper is not None:
            stopper.join()
        elif started_ray:
            stop_ray()
        if record is not None and record.manifest.get("status") == "complete":
            _record_timeline(record, rep)


def _record_timeline(record, rep: Reporter) -> None:
    """The whole try's timeline, Ray's shutdown included, into manifest.json; on the console with --verbose."""
    phases = rep.clock.stop()
    record.set(timeline=phases)
    record.write()
    rep.detail("⏱️  Timeline (CPU seconds by process):")
    for line in timeline_lines(phases):
        rep.detail("  " + line)


def _plan_only(cfg: RunConfig, rep: Reporter) -> None:
    """--dry-run: the plan, printed; a plan from a cluster file needs no Ray at all."""
    started_ray = not cfg.run.cluster and start_ray(cfg.run.ray_address, verbose=cfg.run.verbose)
    try:
        dry_run(cfg, rep)
    finally:
        if started_ray:
            stop_ray()


def _context(cfg: RunConfig, rep: Reporter) -> Context:
    """The same plan as --dry-run's, from the model's config: device, dtype, backend, workers and
    actors, resolved once. Refused here, before any stage starts a worker, when a process would
    not fit its GPU or its node."""
    plan = plan_run(cfg, cluster_view(cfg))
    if not plan.fit.ok:
        raise UsageError(refusal(plan))
    if cfg.perturbation.mode == "bit_flip":
        # A bit the weights' dtype has, checked before any work.
        flip_bit_index(plan.dtype, cfg.perturbation.options.bit)
    joined = bool(cfg.run.ray_address or os.environ.get("RAY_ADDRESS"))
    return Context(cfg=cfg, rep=rep, plan=plan, joined_cluster=joined)
