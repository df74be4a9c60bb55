"""The method on a real pretrained model: SmolLM2-135M (GGUF, dequantised), through the CLI."""

import json

import pandas as pd
import pytest

from cwa_dist.run import main

pytestmark = pytest.mark.slow


def test_top_weights_matter_far_more_than_random_ones(ray_local, smollm2_path, tmp_path):
    code = main([
        "--model", str(smollm2_path), "--metric", "grad_x_weight", "--topk", "50", "--perturbation-ratios", "1.0",
        "--random-seeds", "2", "--eval-limit", "8", "--seq-len", "64", "--batch-size", "4", "--ablation-study", "5",
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
    # Super-weight detection (Yu et al. 2024) finds a weight whose zeroing alone more than triples perplexity.
    sw = pd.read_csv(run_dir / "super_weights.csv")
    assert len(sw) >= 1 and sw["restored_exact"].all() and sw["param"].str.endswith("mlp.down_proj.weight").all()
    assert (sw["ppl_ratio"] > 3).any(), sw.to_string()
    assert summary["super_weights"] and summary["super_weights"][0]["param"] == sw["param"].iloc[0]
    # The correlation study runs end to end: 5 top and 5 random weights, each zeroed alone.
    study = summary["ablation_study"]
    assert study["measured"] == len(pd.read_csv(run_dir / "ablation_study.csv")) >= 6
    assert -1 <= study["metrics"]["grad_x_weight"]["spearman"] <= 1
    ranking = pd.read_csv(run_dir / "top_50_weights_grad_x_weight.csv")
    assert ranking["layer"].str.startswith("model.").all()
    # Texts are documents: no special token is inserted between them, so none of the special
    # tokens' embedding rows can lead the ranking (an end-of-turn EOS between texts once did).
    from cwa_dist.modeling.loading import load_tokenizer
    from cwa_dist.modeling.sources import resolve_checkpoint, resolve_source

    tok = load_tokenizer(resolve_checkpoint(resolve_source(str(smollm2_path)), announce=print), trust_remote_code=False)
    top10 = ranking.head(10)
    rows = set(top10.loc[top10["layer"] == "model.embed_tokens.weight", "row"])
    assert not rows & set(tok.all_special_ids), rows


@pytest.mark.extended
def test_the_gguf_is_converted_once_reused_and_rebuilt_when_corrupt(smollm2_path, tmp_path, monkeypatch):
    """The real .gguf: dequantised into a safetensors cache once (in a child process), reused
    without converting, and converted again when a byte of the cached weights is damaged."""
    from cwa_dist.modeling.checkpoint import Checkpoint
    from cwa_dist.modeling.sources import resolve_checkpoint, resolve_source

    monkeypatch.setenv("CWA_DIST_CACHE", str(tmp_path))
    source, said = resolve_source(str(smollm2_path)), []
    entry = resolve_checkpoint(source, announce=said.append)
    assert "Converting" in said[-1] and entry.parent == tmp_path / "checkpoints"
    ckpt = Checkpoint(entry)
    assert ckpt.tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert sum(t.numel for t in ckpt.tensors.values()) == 134_515_008
    assert resolve_checkpoint(source, announce=said.append) == entry and "Reusing" in said[-1]
    (weights,) = entry.glob("*.safetensors")
    with open(weights, "r+b") as f:  # one damaged byte, far into the data
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    assert resolve_checkpoint(source, announce=said.append) == entry
    assert "corrupt" in said[-2] and "Converting" in said[-1]


@pytest.mark.extended  # about four minutes: 24 examples on the baseline and after each of 3 experiments
def test_zeroing_the_super_weight_reports_its_accuracy_change(ray_local, smollm2_path, sums_task, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    code = main([
        "--model", str(smollm2_path), "--topk", "10", "--perturbation-ratios", "1.0", "--random-seeds", "1",
        "--no-magnitude-control", "--super-weights", "1", "--eval-limit", "8", "--seq-len", "64",
        "--eval-tasks", "cwa_sums", "--eval-tasks-include", str(sums_task),
        "--output", str(tmp_path), "--experiment-id", "smol_tasks",
    ])
    assert code == 0
    run_dir = tmp_path / "smol_tasks"
    sw = pd.read_csv(run_dir / "super_weights.csv")
    assert len(sw) == 1 and sw["restored_exact"].all()
    row = sw.iloc[0]
    assert row["cwa_sums.acc_change_ci_low"] <= row["cwa_sums.acc_change"] <= row["cwa_sums.acc_change_ci_high"]
    assert row["cwa_sums.acc_change"] == pytest.approx(row["cwa_sums.acc"] - row["cwa_sums.acc_baseline"])
    summary = json.loads((run_dir / "experiment_summary.json").read_text())
    assert summary["weights_intact_after_perturbation"] and summary["baseline_tasks"]["cwa_sums"]["examples"] == 24
    # Which way accuracy moves is the data's answer; the figures go to the README.
    with capsys.disabled():
        print(f"\nSmolLM2 super weight {row['param']}[{row['row']}, {row['col']}] zeroed: cwa_sums acc "
              f"{row['cwa_sums.acc_baseline']:.3f} → {row['cwa_sums.acc']:.3f} "
              f"(change {row['cwa_sums.acc_change']:+.3f}, "
              f"95% CI {row['cwa_sums.acc_change_ci_low']:+.3f} to {row['cwa_sums.acc_change_ci_high']:+.3f}); "
              f"acc_norm {row['cwa_sums.acc_norm_baseline']:.3f} → {row['cwa_sums.acc_norm']:.3f}")
