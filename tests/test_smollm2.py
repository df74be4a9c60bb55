"""The method on a real pretrained model: SmolLM2-135M (GGUF, dequantised), through the CLI."""

import json

import pandas as pd
import pytest

from cwa_dist.run import main

pytestmark = pytest.mark.slow


def test_top_weights_matter_far_more_than_random_ones(ray_local, smollm2_path, tmp_path):
    code = main([
        "--model", str(smollm2_path), "--metric", "grad_x_weight", "--topk", "50", "--perturbation-ratios", "1.0",
        "--random-seeds", "2", "--eval-limit", "8", "--seq-len", "64", "--batch-size", "4",
        "--output", str(tmp_path), "--experiment-id", "smol",
    ])
    assert code == 0
    run_dir = tmp_path / "smol"
    res = pd.read_csv(run_dir / "perturbation_results.csv").set_index("key")
    top = res.loc["grad_x_weight|k=50|r=1"]
    randoms = res[res["metric"] == "random"]
    assert len(randoms) == 2 and res["restored_exact"].all()
    # Zeroing the 50 weights with the largest |g·w| must hurt; 50 random weights of 134M must not.
    assert top["ppl_ratio"] > 1.5, top
    assert (randoms["ppl_ratio"] - 1).abs().max() < 0.01, randoms
    summary = json.loads((run_dir / "experiment_summary.json").read_text())
    assert summary["num_parameters"] == 134_515_008
    assert 1 < summary["baseline_perplexity"] < 1000  # a trained model, not random init (~49k)
    ranking = pd.read_csv(run_dir / "top_50_weights_grad_x_weight.csv")
    assert ranking["layer"].str.startswith("model.").all()
