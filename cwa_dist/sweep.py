"""Cross-model sweeps: a jobs/*.yaml file → one run per entry → a comparison table.

    python -m cwa_dist.sweep jobs/pythia_scaling.yaml

A sweep file (its first line is the command that launches it):

    name: pythia_scaling          # the sweep's directory under `output`
    output: outputs/sweeps        # optional
    defaults: {topk: [100], eval_limit: 50}   # any run setting, by its RunConfig name
    runs:
      - model: EleutherAI/pythia-70m
      - model: EleutherAI/pythia-160m
        topk: [100, 1000]

The whole file is checked before anything runs. Each run gets a fixed experiment id, so running
the same sweep again resumes unfinished runs and leaves finished ones alone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from cwa_dist.config import RunConfig, check_run_id, config_from_mapping
from cwa_dist.errors import UsageError
from cwa_dist.run import quiet_libraries, report_errors

SWEEP_KEYS = {"name", "output", "defaults", "runs"}


def load_sweep(path: str) -> tuple[str, Path, list[RunConfig]]:
    """(name, sweep directory, run configurations), or a UsageError naming what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"sweep file {path} does not exist")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"sweep file {path} is not valid YAML: {' '.join(str(e).split())}") from None
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
    directory = Path(spec.get("output", "outputs/sweeps")) / name
    configs = []
    for i, run in enumerate(runs):
        where = f"sweep file {path}, run {i + 1}"
        cfg = config_from_mapping({**defaults, **run}, where)
        configs.append(cfg)
    for i, cfg in enumerate(configs):  # fixed ids make a re-run of the sweep a resume
        cfg.experiment_id = f"{i + 1:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(cfg.model).name)}"
        cfg.output = str(directory)
    return name, directory, configs


def comparison_row(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "experiment_summary.json").read_text())
    row = {
        "experiment_id": run_dir.name,
        "model": summary["model_name"],
        "num_parameters": summary["num_parameters"],
        "baseline_perplexity": summary["baseline_perplexity"],
        "experiments_completed": summary["experiments_completed"],
        "max_ppl_increase": summary.get("max_ppl_increase"),
    }
    best = summary.get("most_impactful_perturbation")
    if best:
        row.update(best_metric=best["metric"], best_topk=best["topk"], best_mask_ratio=best["mask_ratio"],
                   best_perturbed_ppl=best["perturbed_ppl"])
    return row


def run_sweep(path: str, *, check: bool, verbose: bool) -> None:
    name, directory, configs = load_sweep(path)
    print(f"🧪 Sweep {name}: {len(configs)} run(s) into {directory}")
    for cfg in configs:
        print(f"  {cfg.experiment_id}: {cfg.model}")
    if check:
        return
    import pandas as pd

    from cwa_dist import pipeline

    for cfg in configs:
        cfg.verbose = cfg.verbose or verbose
        pipeline.run(cfg)
    table = pd.DataFrame([comparison_row(directory / cfg.experiment_id) for cfg in configs])
    table.to_csv(directory / "comparison.csv", index=False)
    print(f"\n📊 Comparison: {directory / 'comparison.csv'}\n{table.to_string(index=False)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cwa_dist.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_file")
    ap.add_argument("--check", action="store_true", help="validate the file and list its runs, run nothing")
    ap.add_argument("--verbose", action="store_true")
    ns = ap.parse_args(argv)
    quiet_libraries(ns.verbose)
    return report_errors(lambda: run_sweep(ns.sweep_file, check=ns.check, verbose=ns.verbose), ns.verbose)


if __name__ == "__main__":
    sys.exit(main())
