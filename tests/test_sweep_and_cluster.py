"""Sweeps (jobs/*.yaml) and the cluster file."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cwa_dist.sweep import load_sweep, main

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_jobs_start_with_their_command_and_validate(job):
    first = job.read_text().splitlines()[0]
    assert first.startswith("# Launch: ") and "cwa_dist.sweep jobs/" + job.name in first
    name, directory, configs = load_sweep(str(job))
    assert configs and all(c.run.output == directory for c in configs)
    assert len({c.run.experiment_id for c in configs}) == len(configs)


def test_cluster_file_passes_rays_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]


MALFORMED = [
    ("runs: [\n  - model: x\n", "not valid YAML"),
    ("- just\n- a list\n", "must be a mapping"),
    ("name: s\nruns: []\n", "non-empty list"),
    ("name: s\nrun:\n  - model: m\n", "unknown key"),
    ("name: 's p a c e'\nruns:\n  - model: m\n", "'name' 's p a c e' must be one path component"),
    ("name: s\nruns:\n  - model: m\n    topkk: [3]\n", "run 1: unknown setting 'topkk'. Did you mean 'topk'"),
    ("name: s\nruns:\n  - model: m\n  - model: m\n    topk: three\n", "run 2: topk should be int"),
    ("name: s\nruns:\n  - seq_len: 8\n", "no 'model' given"),
    ("name: s\ndefaults: {output: elsewhere}\nruns:\n  - model: m\n", "set by the sweep itself"),
    ("name: s\nruns:\n  - model: m\n    perturbation_ratios: [2.0]\n", r"outside \(0, 1\]"),
]


@pytest.mark.parametrize("text,message", MALFORMED)
def test_malformed_sweep_files_are_refused_before_anything_runs(tmp_path, capsys, text, message):
    f = tmp_path / "sweep.yaml"
    f.write_text(f"{text}")
    assert main([str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.extended
def test_sweep_runs_two_at_a_time_survives_a_failure_compares_and_resumes(ray_local, tiny_model_dir, tmp_path,
                                                                           capsys):
    import datetime as dt

    from cwa_dist.compare import COMPARISON_COLUMNS

    f = tmp_path / "tiny.yaml"
    f.write_text(
        f"name: tiny\noutput: {tmp_path / 'out'}\n"
        "defaults: {topk: [5], perturbation_ratios: [1.0], random_seeds: 1, seq_len: 32, eval_limit: 8}\n"
        f"runs:\n  - model: {tiny_model_dir['llama']}\n  - model: {tiny_model_dir['gpt2']}\n"
        "    metrics: [grad_squared]\n"
        f"  - model: {tmp_path / 'no_such_model'}\n"  # fails when its run starts, not when the file is read
    )
    assert main([str(f), "--max-concurrent", "2"]) == 1
    out = capsys.readouterr().out
    sweep = tmp_path / "out" / "tiny"
    assert "❌ 1 of 3 run(s) failed" in out
    failure = [line for line in out.splitlines() if line.strip().startswith("03_no_such_model (")]
    assert failure and "UsageError: model directory" in failure[0] and "does not exist" in failure[0], out
    # The two good runs overlapped in time: they ran concurrently.
    spans = []
    for run in ("01_llama", "02_gpt2"):
        m = json.loads((sweep / run / "manifest.json").read_text())
        assert m["status"] == "complete"
        spans.append((dt.datetime.fromisoformat(m["started"]), dt.datetime.fromisoformat(m["finished"])))
    assert spans[0][0] <= spans[1][1] and spans[1][0] <= spans[0][1], spans
    assert (sweep / "logs" / "01_llama.log").read_text().count("Analysis complete") == 1

    table = pd.read_csv(sweep / "comparison" / "comparison.csv")
    assert list(table.columns) == list(COMPARISON_COLUMNS)
    assert list(table["experiment_id"]) == ["01_llama", "02_gpt2"]
    assert list(table["metric"]) == ["grad_x_weight", "grad_squared"]
    shares = table[["top_share_mlp", "top_share_attention", "top_share_embedding", "top_share_other"]].sum(axis=1)
    assert np.allclose(shares, 1.0)
    assert (table["baseline_perplexity"] > 1).all() and (table["max_ppl_ratio"] > 0).all()
    data = pd.read_parquet(sweep / "comparison" / "dataset")
    assert set(data["model"].astype(str)) == {"llama", "gpt2"} and set(data["kind"]) == {"ranking", "perturbation"}
    for run in ("01_llama", "02_gpt2"):  # every ranking and result row of each run is in the dataset
        rows = data[data["experiment_id"] == run]
        assert (rows["kind"] == "ranking").sum() == len(pd.read_parquet(sweep / run / "rankings.parquet"))
        results = pd.read_parquet(sweep / run / "perturbation_results.parquet")
        assert (rows["kind"] == "perturbation").sum() == len(results)
    for png in ("topk_depth_by_module.png", "perplexity_vs_masked.png"):
        assert (sweep / "comparison" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (sweep / "comparison" / "comparison.md").read_text().startswith("| model | experiment_id |")

    assert main([str(f)]) == 1  # again: the finished runs are kept, the failed one is tried again
    out = capsys.readouterr().out
    assert out.count("✅ 0") == 2 and "❌ 1 of 3 run(s) failed" in out
    assert "already complete" in (sweep / "logs" / "01_llama.log").read_text()


def test_a_sweep_of_dry_runs_prints_each_plan_and_writes_no_run(ray_local, tiny_model_dir, tmp_path, capsys):
    """`dry_run: true` in a sweep entry plans that run in its coordinator: a plan in its log, no run
    directory, no comparison (there are no results to compare), and exit 0."""
    f = tmp_path / "plans.yaml"
    f.write_text(f"name: plans\noutput: {tmp_path / 'out'}\ndefaults: {{dry_run: true}}\n"
                 f"runs:\n  - model: {tiny_model_dir['llama']}\n  - model: {tiny_model_dir['gpt2']}\n")
    assert main([str(f)]) == 0
    out = capsys.readouterr().out
    sweep = tmp_path / "out" / "plans"
    for run, model in (("01_llama", "llama"), ("02_gpt2", "gpt2")):
        assert f"📝 {run}: planned (dry run" in out, out
        log = (sweep / "logs" / f"{run}.log").read_text()
        assert "🧭 Plan (--dry-run" in log and str(tiny_model_dir[model]) in log
        assert not (sweep / run).exists()
    assert not (sweep / "comparison").exists() and "❌" not in out
