"""Cross-model sweeps: a jobs/*.yaml file → one run per entry, run concurrently where the cluster
has room → a cross-model comparison (cwa_dist.compare).

    python -m cwa_dist.sweep jobs/pythia_scaling.yaml [--max-concurrent N]

A sweep file (its first line is the command that launches it):

    name: pythia_scaling          # the sweep's directory under `output`
    output: outputs/sweeps        # optional; a URI (s3://...) works as for --output
    defaults: {topk: [100], eval_limit: 50}   # any run setting, by its RunConfig name
    runs:
      - model: EleutherAI/pythia-70m
      - model: EleutherAI/pythia-160m
        topk: [100, 1000]

The whole file is checked before anything runs. Each run gets a fixed experiment id, so running
the same sweep again resumes unfinished runs and leaves finished ones alone. A run that fails does
not stop the others; failures are listed at the end (exit status 1) and each run's console output
is in <sweep>/logs/<experiment id>.log.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from cwa_dist.config import RunConfig, config_from_mapping
from cwa_dist.errors import UsageError, one_line
from cwa_dist.run import quiet_libraries, report_errors
from cwa_dist.settings import check_run_id, path_component

SWEEP_KEYS = {"name", "output", "defaults", "runs"}


def load_sweep(path: str) -> tuple[str, str, list[RunConfig]]:
    """(name, sweep directory, run configurations), or a UsageError naming what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"sweep file {path} does not exist")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"sweep file {path} is not valid YAML: {one_line(e)}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"sweep file {path} must be a mapping with 'name' and 'runs'")
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise UsageError(f"sweep file {path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                         f"allowed: {', '.join(sorted(SWEEP_KEYS))}")
    name = spec.get("name")
    if not isinstance(name, str):
        raise UsageError(f"sweep file {path}: 'name' must be a string")
    check_run_id(name, f"sweep file {path}: 'name'")
    runs, defaults = spec.get("runs"), spec.get("defaults") or {}
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise UsageError(f"sweep file {path}: 'runs' must be a non-empty list of mappings, each with a 'model'")
    if not isinstance(defaults, dict):
        raise UsageError(f"sweep file {path}: 'defaults' must be a mapping of run settings")
    for fixed in ("output", "experiment_id", "resume"):
        if fixed in defaults or any(fixed in r for r in runs):
            raise UsageError(f"sweep file {path}: {fixed!r} is set by the sweep itself; remove it from the runs")
    directory = f"{str(spec.get('output', 'outputs/sweeps')).rstrip('/')}/{name}"
    configs = []
    for i, run in enumerate(runs):
        where = f"sweep file {path}, run {i + 1}"
        cfg = config_from_mapping({**defaults, **run}, where)
        configs.append(cfg)
    for i, cfg in enumerate(configs):  # fixed ids make a re-run of the sweep a resume
        cfg.run.experiment_id = f"{i + 1:02d}_{path_component(Path(cfg.model.name).name)}"
        cfg.run.output = directory
    return name, directory, configs


def default_concurrency(configs: list[RunConfig], joined_cluster: bool) -> int:
    """All runs at once on a cluster (their demand queues in Ray, where the autoscaler sees it);
    on the local Ray, as many as its free CPUs hold at one CPU per gradient worker."""
    if joined_cluster:
        return len(configs)
    from cwa_dist.distributed.runtime import available_cpus

    widest = max((c.sharding.num_workers or 1) * (c.sharding.cpus_per_worker or 1) for c in configs)
    return max(1, min(len(configs), available_cpus() // widest))


def share_the_machine(configs: list[RunConfig], concurrent: int) -> None:
    """On the local Ray, give each of the `concurrent` runs its share of the CPUs (where a run does not
    set its own), so one run's workers and actors do not take the whole machine while the others wait."""
    from cwa_dist.distributed.runtime import available_cpus

    free = available_cpus()
    for cfg in configs:
        if cfg.sharding.cpus_per_worker is None:
            cfg.sharding.cpus_per_worker = max(1, free // (concurrent * (cfg.sharding.num_workers or 1)))
        if cfg.perturbation.num_eval_actors is None:
            cfg.perturbation.num_eval_actors = max(1, free // concurrent)


def run_logged(cfg, log) -> str | None:
    """One sweep run, its console output into `log`: where its directory is (None for a dry run,
    which plans and writes no directory). Runs in the run's coordinating Ray task."""
    from cwa_dist import pipeline
    from cwa_dist.reporting.console import Reporter

    run_dir = pipeline.run(cfg, Reporter(cfg.run.verbose, stream=log))
    return None if run_dir is None else run_dir.where


def run_sweep(path: str, *, check: bool, verbose: bool, max_concurrent: int | None = None) -> int:
    name, directory, configs = load_sweep(path)
    print(f"🧪 Sweep {name}: {len(configs)} run(s) into {directory}")
    for cfg in configs:
        print(f"  {cfg.run.experiment_id}: {cfg.model.name}")
    if check:
        return 0
    from cwa_dist.compare import compare
    from cwa_dist.distributed.runtime import start_ray, stop_ray
    from cwa_dist.distributed.sweep_runner import run_all
    from cwa_dist.reporting.storage import Output, durable_output

    directory = durable_output(directory, print)
    output = Output(directory)
    output.check_writable()
    for cfg in configs:
        cfg.run.output = directory
    started = start_ray(None, verbose=verbose)
    try:
        joined = not started or bool(os.environ.get("RAY_ADDRESS"))
        concurrent = max_concurrent or default_concurrency(configs, joined)
        print(f"🚀 Up to {concurrent} run(s) at a time; each run's console output: {output.local / 'logs'}")
        for cfg in configs:
            cfg.run.verbose = cfg.run.verbose or verbose
        if not joined and concurrent > 1:
            share_the_machine(configs, concurrent)

        def done(o) -> None:
            if o.error is not None:
                print(f"  ❌ {o.experiment_id}: {o.error}", flush=True)
            elif o.where is None:
                print(f"  📝 {o.experiment_id}: planned (dry run; the plan is in {output.local / 'logs'})", flush=True)
            else:
                print(f"  ✅ {o.experiment_id}: {o.where}", flush=True)

        outcomes = run_all(configs, run_one=run_logged, max_concurrent=concurrent, log_dir=output.local / "logs",
                           on_done=done)
    finally:
        if started:
            stop_ray()
    order = {cfg.run.experiment_id: i for i, cfg in enumerate(configs)}
    outcomes = sorted(outcomes, key=lambda o: order[o.experiment_id])  # the file's order, not the finishing order
    finished = [o for o in outcomes if o.error is None and o.where is not None]  # dry runs have no results
    for o in finished:
        output.pull(o.experiment_id)  # a run stored under a URI: its files, for the comparison
    if finished:
        table = compare([output.local / o.experiment_id for o in finished], output.local / "comparison")
        upload = output.uploader("comparison")
        if upload:
            for f in sorted((output.local / "comparison").rglob("*")):
                if f.is_file():
                    upload(f)
        print(f"\n📊 Comparison: {output.where('comparison')}\n{table.to_string(index=False)}")
    failed = [o for o in outcomes if o.error is not None]
    if failed:
        print(f"\n❌ {len(failed)} of {len(outcomes)} run(s) failed (running the sweep again resumes them):")
        for o in failed:
            print(f"  {o.experiment_id} ({o.model}): {o.error}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cwa_dist.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_file")
    ap.add_argument("--check", action="store_true", help="validate the file and list its runs, run nothing")
    ap.add_argument("--max-concurrent", type=int, default=None,
                    help="runs at a time (default: all on a cluster, as many as the free CPUs hold on the local Ray)")
    ap.add_argument("--verbose", action="store_true")
    ns = ap.parse_args(argv)
    quiet_libraries(ns.verbose)
    if ns.max_concurrent is not None and ns.max_concurrent < 1:
        ap.error("--max-concurrent must be at least 1")
    status = {}

    def work() -> None:
        status["code"] = run_sweep(ns.sweep_file, check=ns.check, verbose=ns.verbose, max_concurrent=ns.max_concurrent)

    return report_errors(work, ns.verbose) or status.get("code", 0)


if __name__ == "__main__":
    sys.exit(main())
