"""Zero-shot tasks through the real lm-evaluation-harness on in-memory models: per-example scores,
their standard errors and paired intervals, checked against the harness run on its own and against
independent formulas; the one-line refusals."""

import math
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from cwa_dist.analysis.zero_shot import TaskScores, check_tasks, evaluate_tasks, paired_change
from cwa_dist.errors import UsageError

pytest.importorskip("lm_eval")


def test_the_standard_error_is_the_sample_deviation_over_root_n():
    values = (1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0)
    s = TaskScores("t", {"acc": values})
    assert s.mean("acc") == pytest.approx(4 / 7)
    assert s.stderr("acc") == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))


def test_the_paired_interval_matches_normal_theory_on_many_examples():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.7
    pert = np.where(rng.random(400) < 0.15, ~base, base)  # 15% of answers flip
    change, low, high = paired_change(base.astype(float), pert.astype(float), samples=4000, seed=1)
    d = pert.astype(float) - base.astype(float)
    assert change == pytest.approx(d.mean())
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert low == pytest.approx(d.mean() - half, abs=0.01) and high == pytest.approx(d.mean() + half, abs=0.01)
    same = paired_change(base.astype(float), base.astype(float), samples=200, seed=1)
    assert same == (0.0, 0.0, 0.0)  # the same answers: no change, and no doubt about it
    with pytest.raises(ValueError, match="same examples"):
        paired_change([1.0, 0.0], [1.0], samples=10, seed=0)


def test_scores_equal_the_harness_run_on_its_own_fresh_model(tiny_model_dir, sums_task):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir["llama"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = evaluate_tasks(model, AutoTokenizer.from_pretrained(path), ["cwa_sums"], limit=None,
                          include=str(sums_task), batch_size=4)["cwa_sums"]
    assert ours.examples == 24 and set(ours.metrics) == {"acc", "acc_norm"}
    # The harness loading the model itself, by name, in its own way.
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32", tasks=["cwa_sums"],
                             task_manager=TaskManager(include_path=str(sums_task)), batch_size=4,
                             bootstrap_iters=0, device="cpu")["results"]["cwa_sums"]
    assert ours.mean("acc") == theirs["acc,none"] and ours.mean("acc_norm") == theirs["acc_norm,none"]
    limited = evaluate_tasks(model, AutoTokenizer.from_pretrained(path), ["cwa_sums"], limit=5,
                             include=str(sums_task), batch_size=4)["cwa_sums"]
    assert limited.examples == 5 and limited.metrics["acc"] == ours.metrics["acc"][:5]


def test_an_unknown_task_is_refused_with_its_close_matches(sums_task):
    with pytest.raises(UsageError, match=r"no task 'cwa_sum'.*close matches: cwa_sums"):
        check_tasks(["cwa_sum"], str(sums_task))
    check_tasks(["cwa_sums"], str(sums_task))  # known: no error


def test_a_missing_harness_is_one_line_and_exit_2(tmp_path):
    shadow = tmp_path / "shadow" / "lm_eval"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no lm_eval here')\n")
    env = {"PYTHONPATH": str(tmp_path / "shadow"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "cwa_dist.run", "--model", str(tmp_path), "--eval-tasks", "piqa",
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "needs lm-evaluation-harness" in lines[0] and "cwa_dist[eval]" in lines[0]
    assert not (tmp_path / "out").exists()


def test_an_unknown_task_on_the_command_line_is_one_line_and_exit_2(tmp_path, sums_task):
    proc = subprocess.run([sys.executable, "-m", "cwa_dist.run", "--model", str(tmp_path), "--eval-tasks",
                           "cwa_sum", "--eval-tasks-include", str(sums_task), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no task 'cwa_sum'" in lines[0] and "cwa_sums" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
