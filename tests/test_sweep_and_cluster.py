"""Sweeps (jobs/*.yaml) and the cluster file."""

import re
from pathlib import Path

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
    assert configs and all(c.output == str(directory) for c in configs)
    assert len({c.experiment_id for c in configs}) == len(configs)


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


def test_sweep_runs_each_model_compares_them_and_resumes(ray_local, tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "tiny.yaml"
    f.write_text(
        f"name: tiny\noutput: {tmp_path / 'out'}\n"
        "defaults: {topk: [5], no_perturbation: true, seq_len: 32, eval_limit: 8}\n"
        f"runs:\n  - model: {tiny_model_dir['llama']}\n  - model: {tiny_model_dir['gpt2']}\n    metrics: [grad_squared]\n"
    )
    assert main([str(f)]) == 0
    table = pd.read_csv(tmp_path / "out" / "tiny" / "comparison.csv")
    assert list(table["experiment_id"]) == ["01_llama", "02_gpt2"]
    assert (table["baseline_perplexity"] > 1).all()
    assert (tmp_path / "out" / "tiny" / "02_gpt2" / "top_5_weights_grad_squared.csv").is_file()
    capsys.readouterr()
    assert main([str(f)]) == 0  # again: both runs are complete, nothing is recomputed
    assert capsys.readouterr().out.count("already complete") == 2
