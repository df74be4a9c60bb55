"""Planning a run from the model's config alone, before anything is downloaded or started: what
every run does first, and all that --dry-run does (it prints the plan and exits).

The model's config comes from a local directory, the Hub's config.json, or a .gguf header; the
cluster from the Ray cluster this process joined, or from a cluster file (--cluster, no Ray at all).
`run_plan` does the deciding; this module gathers its inputs and prints what it decided.
"""

from __future__ import annotations

from cwa_dist.analysis.zero_shot import count_examples
from cwa_dist.config import RunConfig
from cwa_dist.errors import UsageError
from cwa_dist.modeling.loading import empty_model, read_config, stored_dtype
from cwa_dist.modeling.sources import resolve_source
from cwa_dist.planning.run_plan import ClusterView, RunPlan, cluster_file_view, make_plan, refusal, summary_lines
from cwa_dist.planning.sizing import GiB, model_facts, plan_table
from cwa_dist.reporting.console import Reporter


def cluster_view(cfg: RunConfig) -> ClusterView:
    """The cluster file's view with --cluster; else the live cluster's (Ray must be running)."""
    if cfg.run.cluster:
        return cluster_file_view(cfg.run.cluster, gpu_memory_gb=cfg.run.gpu_memory_gb)
    from cwa_dist.distributed.capacity import live_view

    return live_view(gpu_memory_gb=cfg.run.gpu_memory_gb)


def plan_run(cfg: RunConfig, view: ClusterView) -> RunPlan:
    """The run's plan, from the model's config (nothing converted or downloaded but config.json)."""
    source = resolve_source(cfg.model.name)
    config = read_config(source, trust_remote_code=cfg.model.trust_remote_code)
    facts = {}

    def facts_for(dtype):
        if dtype not in facts:
            facts[dtype] = model_facts(empty_model(config, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code),
                                       config)
        return facts[dtype]

    return make_plan(cfg, facts_for, stored=stored_dtype(source, config), view=view)


def print_plan(cfg: RunConfig, plan: RunPlan, rep: Reporter) -> None:
    lay, facts = plan.layout, plan.facts
    model_bytes = facts.num_parameters * lay.dtype_bytes
    rep.line(f"🤖 Model: {cfg.model.name}: {facts.num_parameters:,} parameters, {facts.layers} blocks (largest "
             f"{facts.largest_block:,}), {model_bytes / GiB:.1f} GiB in {plan.dtype_name}")
    rep.line(f"🔧 Device: {plan.device} ({plan.device_reason}); dtype {plan.dtype_name}; backend {plan.backend}"
             + (f"; {'nccl' if plan.device == 'cuda' else 'gloo'}" if plan.backend != "none" else ""))
    for line in summary_lines(plan):
        rep.line(line)
    rep.line(f"🎯 Experiments: {plan.experiments}")
    if cfg.perturbation.eval_tasks and plan.experiments:
        _print_task_cost(cfg, plan, rep)
    for line in plan_table(plan.needs):
        rep.line(line)
    if plan.device == "cuda" and not plan.view.gpu_bytes:
        rep.line("⚠️  GPU memory unknown (no GPU node exists yet): give --gpu-memory-gb to check that the plan fits")
    if plan.device == "cuda" and plan.view.gpu_node and not plan.view.gpu_node.memory_bytes:
        rep.line("⚠️  the GPU nodes' host memory is unknown: declare a `memory` resource (bytes) for their node "
                 "type to have it checked")


def _print_task_cost(cfg: RunConfig, plan: RunPlan, rep: Reporter) -> None:
    """Zero-shot examples the run will score: each task's examples on the baseline (once per actor)
    and after every experiment and super-weight candidate."""
    p = cfg.perturbation
    counts = count_examples(p.eval_tasks, limit=p.eval_tasks_limit, include=p.tasks_include)
    evaluations = plan.experiments + p.super_weights + max(plan.layout.num_eval_actors, 1)
    known = [n for n in counts.values() if n is not None]
    shown = ", ".join(f"{t} {n if n is not None else 'unknown (its data is not readable here)'}"
                      for t, n in counts.items())
    rep.line(f"🧪 Zero-shot tasks: {shown} example(s); × {evaluations} evaluations (experiments, super-weight "
             f"candidates, a baseline per actor) = {sum(known) * evaluations:,} examples scored"
             + ("" if len(known) == len(counts) else ", not counting the unknown"))


def dry_run(cfg: RunConfig, rep: Reporter) -> RunPlan:
    """Print the plan; raise UsageError naming the flags that would fix a plan that cannot fit."""
    plan = plan_run(cfg, cluster_view(cfg))
    rep.line("🧭 Plan (--dry-run: nothing is loaded or started)")
    rep.rule()
    print_plan(cfg, plan, rep)
    if not plan.fit.ok:
        raise UsageError(refusal(plan))
    checked = plan.view.gpu_bytes if plan.device == "cuda" else plan.view.task_memory_bytes
    rep.line("✅ The plan fits" if checked else "✅ Plan printed")
    return plan
