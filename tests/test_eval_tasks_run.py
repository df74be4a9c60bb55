"""--eval-tasks end to end: a real run whose evaluation actors run the harness on their own
perturbed replicas, checked against the harness run on a freshly loaded model with the same
weights zeroed by hand."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import SMALL

pytest.importorskip("lm_eval")


def _harness_accuracy(model_dir, sums_task, limit, zeroed=()):
    """cwa_sums accuracy of a fresh float32 copy of the model, with `zeroed` (param, flat index)
    set to zero first, through the harness's own HFLM."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, flat in zeroed:
            params[name].view(-1)[flat] = 0.0
    lm = HFLM(pretrained=net, tokenizer=AutoTokenizer.from_pretrained(model_dir), batch_size=4, device="cpu")
    out = simple_evaluate(model=lm, tasks=["cwa_sums"], task_manager=TaskManager(include_path=str(sums_task)),
                          limit=limit, bootstrap_iters=0)["results"]["cwa_sums"]
    return out["acc,none"], out["acc_norm,none"]


@pytest.mark.ray
def test_each_experiment_reports_the_accuracy_of_its_perturbed_model(tiny_model_dir, sums_task, tmp_path):
    model_dir = tiny_model_dir["llama"]
    cmd = [sys.executable, "-m", "cwa_dist.run", "--model", str(model_dir), *SMALL, "--topk", "30",
           "--perturbation-ratios", "1.0", "--random-seeds", "1", "--super-weights", "1",
           "--eval-tasks", "cwa_sums", "--eval-tasks-include", str(sums_task), "--eval-tasks-limit", "12",
           "--output", str(tmp_path), "--experiment-id", "tasks"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "tasks"
    results = pd.read_csv(run / "perturbation_results.csv")
    columns = [f"cwa_sums.acc{s}" for s in ("", "_stderr", "_baseline", "_change", "_change_ci_low",
                                             "_change_ci_high")]
    assert set(columns) <= set(results.columns) and results["restored_exact"].all()
    base_acc, base_norm = _harness_accuracy(model_dir, sums_task, 12)
    summary = json.loads((run / "experiment_summary.json").read_text())
    assert summary["baseline_tasks"]["cwa_sums"]["examples"] == 12
    assert summary["baseline_tasks"]["cwa_sums"]["acc"]["value"] == base_acc
    assert (results["cwa_sums.acc_baseline"] == base_acc).all()
    assert (results["cwa_sums.acc_norm_baseline"] == base_norm).all()
    assert ((results["cwa_sums.acc_change_ci_low"] <= results["cwa_sums.acc_change"])
            & (results["cwa_sums.acc_change"] <= results["cwa_sums.acc_change_ci_high"])).all()
    # The largest-|W| control, zeroed by hand in a fresh model: the harness gives the row's accuracy.
    rankings = pd.read_parquet(run / "rankings.parquet")
    top = rankings[rankings["metric"] == "magnitude"].sort_values("rank").head(30)
    acc, norm = _harness_accuracy(model_dir, sums_task, 12, zip(top["param"], top["flat_index"]))
    row = results[results["metric"] == "magnitude"].iloc[0]
    assert row["cwa_sums.acc"] == acc and row["cwa_sums.acc_norm"] == norm
    assert row["cwa_sums.acc_change"] == pytest.approx(acc - base_acc)
    # Super-weight candidates carry the same columns.
    sw = pd.read_csv(run / "super_weights.csv")
    assert len(sw) == 1 and set(columns) <= set(sw.columns)
    assert "cwa_sums.acc" in proc.stdout and "🧪 Baseline cwa_sums (12 examples)" in proc.stdout
    assert "<h2>Zero-shot accuracy</h2>" in (run / "report.html").read_text()
    # A comparison (and so a sweep's) carries the task columns of the experiment it reports.
    from cwa_dist.compare import compare

    table = compare([run], tmp_path / "comparison")
    best = results[results["metric"] == "grad_x_weight"].sort_values("ppl_ratio").iloc[-1]
    assert table["cwa_sums.acc_baseline"].iloc[0] == base_acc
    assert table["cwa_sums.acc_change"].iloc[0] == best["cwa_sums.acc_change"]
