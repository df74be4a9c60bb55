"""A whole run on a mixture-of-experts model, as a user starts it: the tiny Mixtral saved by
transformers (experts stored one by one), every output naming the expert of a fused tensor."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SMALL

pytestmark = pytest.mark.ray  # the run starts its own Ray


@pytest.fixture(scope="module")
def moe_run(tiny_moe_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_cli")
    cmd = [sys.executable, "-m", "cwa_dist.run", "--model", str(tiny_moe_dir["mixtral"]), *SMALL,
           "--metric", "grad_x_weight", "wanda", "--topk", "30", "--perturbation-ratios", "1.0",
           "--random-seeds", "1", "--quantization-study", "4", "--quant-block-size", "8",
           "--output", str(out), "--experiment-id", "moe"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "moe", tiny_moe_dir["mixtral"]


@pytest.fixture(scope="module")
def model(moe_run):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(moe_run[1], dtype=torch.float32).eval()


def test_rankings_address_one_element_of_a_fused_experts_tensor(moe_run, model):
    rankings = pd.read_parquet(moe_run[0] / "rankings.parquet")
    params = dict(model.named_parameters())
    fused = rankings[rankings["param"].str.contains(r"\.experts\.")]
    assert len(fused) and fused["expert"].notna().all()
    assert rankings.loc[~rankings.index.isin(fused.index), "expert"].isna().all()
    for r in rankings.itertuples(index=False):
        p = params[r.param].detach()
        where = np.unravel_index(r.flat_index, p.shape)
        if p.ndim == 3:
            assert (r.expert, r.row, r.col) == tuple(int(i) for i in where)
            assert r.module.endswith(r.param.rsplit(".", 1)[1])  # mlp.experts.gate_up_proj
        assert r.weight == float(p[where])  # the loaded model's value, bit for bit


def test_super_weights_name_their_expert_and_the_export_round_trips(moe_run, model):
    from cwa_dist.export import load_masks

    run_dir = moe_run[0]
    params = dict(model.named_parameters())
    sw = pd.read_csv(run_dir / "super_weights.csv")
    assert len(sw) >= 1 and sw["restored_exact"].all()
    for r in sw.itertuples(index=False):
        p = params[r.param].detach()
        if pd.notna(r.expert):
            assert p.ndim == 3 and p[int(r.expert), r.row, r.col] == p.reshape(-1)[r.flat_index]
        assert abs(float(p.reshape(-1)[r.flat_index]) - r.weight) <= 1e-6 * abs(r.weight)
    rankings = pd.read_parquet(run_dir / "rankings.parquet")
    for metric in ("grad_x_weight", "wanda"):
        masks = load_masks(run_dir / "critical_weights.safetensors", model, metric)
        ranked = rankings[rankings["metric"] == metric]
        assert sum(int(m.sum()) for m in masks.values()) == len(ranked)
        for r in ranked.itertuples(index=False):
            assert masks[r.param].reshape(-1)[r.flat_index]


def test_the_quantization_study_covers_the_experts(moe_run):
    q = pd.read_csv(moe_run[0] / "quantization_results.csv")
    assert {"none", "grad_x_weight", "wanda", "random", "magnitude", "super_weights"} <= set(q["kept"])
    assert q["restored_exact"].all() and (q["perplexity"] > 0).all()
    results = pd.read_csv(moe_run[0] / "perturbation_results.csv")
    assert (results["status"] == "ok").all() and results["restored_exact"].all()
