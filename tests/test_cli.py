"""The command line end to end, through real Ray, on tiny local models."""

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SMALL, brute_force_topk

from cwa_dist.analysis.data import load_texts, split_documents, tokenize_documents
from cwa_dist.analysis.sensitivity import select_parameters
from cwa_dist.reporting.outputs import PERTURBATION_COLUMNS, RANKING_COLUMNS, TOPK_CSV_COLUMNS
from cwa_dist.run import main


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    """One complete run as a user would start it: a fresh process that starts its own Ray."""
    out = tmp_path_factory.mktemp("cli")
    cmd = [sys.executable, "-m", "cwa_dist.run", "--model", str(tiny_model_dir["llama"]), *SMALL,
           "--metric", "grad_x_weight", "grad_squared", "--topk", "5", "20", "--perturbation-ratios", "0.5", "1.0",
           "--random-seeds", "2", "--output", str(out), "--experiment-id", "e2e"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "e2e", proc


def test_every_output_file_is_written(full_run):
    run_dir, _ = full_run
    expected = {
        "config.json", "manifest.json", "experiment_summary.json", "rankings.parquet",
        "perturbation_results.csv", "perturbation_results.parquet", "sensitivity_statistics.json",
        "plots/topk_by_layer.png", "plots/ppl_vs_masked.png", "perturbation_results.jsonl",
        "super_weights.csv", "super_weights.parquet", "report.html",
        "critical_weights.safetensors", "critical_weights.json",
    } | {f"top_{k}_weights_{m}.csv" for k in (5, 20) for m in ("grad_x_weight", "grad_squared")}
    present = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}
    assert expected == present
    from cwa_dist.reporting.outputs import SUPER_WEIGHT_COLUMNS

    sw = pd.read_csv(run_dir / "super_weights.csv")
    declared = [c for c in SUPER_WEIGHT_COLUMNS if c != "rank_<metric>"]
    assert list(sw.columns) == declared + ["rank_grad_x_weight", "rank_grad_squared", "rank_magnitude"]
    assert len(sw) >= 1 and sw["restored_exact"].all() and (sw["zeroed_ppl"] > 0).all()
    for png in ("plots/topk_by_layer.png", "plots/ppl_vs_masked.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_exported_masks_select_exactly_the_ranked_weights(full_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from cwa_dist.export import load_masks

    run_dir, _ = full_run
    net = AutoModelForCausalLM.from_pretrained(tiny_model_dir["llama"], dtype=torch.float32)
    rankings = pd.read_parquet(run_dir / "rankings.parquet")
    meta = json.loads((run_dir / "critical_weights.json").read_text())
    assert meta["metrics"] == list(dict.fromkeys(rankings["metric"])) and meta["k"] == 20
    assert meta["model"] == str(tiny_model_dir["llama"]) and meta["dtype"] == "float32"
    for metric in meta["metrics"]:
        masks = load_masks(run_dir / "critical_weights.safetensors", net, metric)
        chosen = {(name, int(i)) for name, m in masks.items() for i in torch.nonzero(m.view(-1)).view(-1)}
        ranked = rankings[rankings["metric"] == metric]
        assert chosen == set(zip(ranked["param"], ranked["flat_index"].astype(int)))
        assert all(m.shape == dict(net.named_parameters())[n].shape for n, m in masks.items())
    supers = pd.read_csv(run_dir / "super_weights.csv")
    assert [(s["param"], s["row"], s["col"]) for s in meta["super_weights"]] == list(
        zip(supers["param"], supers["row"], supers["col"]))


def test_ranking_files_have_documented_columns_and_agree(full_run):
    run_dir, _ = full_run
    top20 = pd.read_csv(run_dir / "top_20_weights_grad_x_weight.csv")
    top5 = pd.read_csv(run_dir / "top_5_weights_grad_x_weight.csv")
    assert list(top20.columns) == TOPK_CSV_COLUMNS
    assert list(top20["rank"]) == list(range(1, 21))
    pd.testing.assert_frame_equal(top5, top20.head(5))
    assert (np.diff(top20["sensitivity"]) <= 0).all()
    rankings = pd.read_parquet(run_dir / "rankings.parquet")
    assert list(rankings.columns) == list(RANKING_COLUMNS)
    assert set(rankings["metric"]) == {"grad_x_weight", "grad_squared", "magnitude"}
    gxw = rankings[rankings["metric"] == "grad_x_weight"].reset_index(drop=True)
    assert list(gxw["param"]) == list(top20["layer"]) and list(gxw["flat_index"]) == list(top20["flat_index"])
    np.testing.assert_allclose(gxw["score"], np.abs(gxw["weight"] * gxw["grad"]), rtol=1e-6)


def test_cli_ranking_equals_plain_pytorch_reference(full_run, tiny_model_dir):
    """Recompute the whole analysis in one process with plain PyTorch and compare."""
    run_dir, _ = full_run
    cfg = json.loads((run_dir / "config.json").read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    net = AutoModelForCausalLM.from_pretrained(tiny_model_dir["llama"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir["llama"])
    documents = tokenize_documents(tok, load_texts(None, cfg["eval_limit"]), cfg["seq_len"])
    split = split_documents(documents, cfg["calibration_fraction"], cfg["seed"])
    tokens = sum(len(c) - 1 for c in split.calibration)
    loss = sum(torch.nn.functional.cross_entropy(net(input_ids=c[None]).logits[0, :-1], c[1:], reduction="sum")
               for c in split.calibration) / tokens
    loss.backward()
    params = dict(net.named_parameters())
    names, flat, score = brute_force_topk({n: (params[n].grad * params[n].detach()).abs()
                                           for n in select_parameters(net, include_bias=False, include_norm=False)}, 20)
    got = pd.read_csv(run_dir / "top_20_weights_grad_x_weight.csv")
    assert list(zip(got["layer"], got["flat_index"])) == list(zip(names, flat.tolist()))
    np.testing.assert_allclose(got["sensitivity"], score, rtol=1e-4)


def test_perturbation_results(full_run):
    run_dir, _ = full_run
    res = pd.read_csv(run_dir / "perturbation_results.csv")
    assert list(res.columns) == list(PERTURBATION_COLUMNS)
    # 2 K × 2 ratios × (2 metrics + 2 random seeds + magnitude + one same-tensor draw per metric)
    assert len(res) == 28 and res["key"].is_unique
    assert res["restored_exact"].all()
    assert set(res["weights_masked"]) == {3, 5, 10, 20}
    assert (res["baseline_ppl"] == res["baseline_ppl"].iloc[0]).all()
    np.testing.assert_allclose(res["ppl_increase"], res["perturbed_ppl"] - res["baseline_ppl"])
    # Each perplexity and ratio lies inside its bootstrap interval, and the intervals have width.
    assert (res["ppl_ci_low"] <= res["perturbed_ppl"]).all() and (res["perturbed_ppl"] <= res["ppl_ci_high"]).all()
    assert (res["ppl_ratio_ci_low"] <= res["ppl_ratio"] * (1 + 1e-12)).all()
    assert (res["ppl_ratio"] <= res["ppl_ratio_ci_high"] * (1 + 1e-12)).all()
    assert (res["ppl_ci_high"] > res["ppl_ci_low"]).all()
    pq = pd.read_parquet(run_dir / "perturbation_results.parquet")
    assert list(pq["key"]) == list(res["key"])


def test_summary_manifest_and_config(full_run):
    run_dir, proc = full_run
    summary = json.loads((run_dir / "experiment_summary.json").read_text())
    for key in ("model_name", "baseline_perplexity", "num_parameters", "experiments_completed", "max_ppl_increase",
                "most_impactful_perturbation", "comparison", "data"):
        assert key in summary
    assert summary["experiments_completed"] == 28
    low, high = summary["baseline_perplexity_ci"]
    assert low < summary["baseline_perplexity"] < high
    # Measured once, by the evaluation actors' first pass: the gradient worker makes no pass of its own.
    results = pd.read_csv(run_dir / "perturbation_results.csv")
    assert summary["baseline_perplexity"] == results["baseline_ppl"].iloc[0]
    assert "Baseline perplexity (evaluation chunks)" not in proc.stdout
    for entry in summary["comparison"]:
        assert entry["random_min"] <= entry["random_mean"] <= entry["random_max"] and entry["random_std"] >= 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    done = {s for s, v in manifest["stages"].items() if v["status"] == "done"}
    assert done >= {"sensitivity", "perturbation", "export"}
    assert manifest["versions"]["torch"] and manifest["versions"]["ray"]
    # Every key written is declared (and documented) beside the column schemas; nothing else is.
    from cwa_dist.reporting.outputs import MANIFEST_FIELDS, SUMMARY_FIELDS, RunDirectory, RunRecord

    assert set(manifest) <= set(MANIFEST_FIELDS) and set(summary) <= set(SUMMARY_FIELDS)
    assert {"memory", "stages", "summary"} <= set(manifest)
    assert {"driver", "gradient_ranks", "eval_actors"} <= set(manifest["memory"])
    # On one machine the gradient worker, which holds the whole replica, served as the first actor.
    served = [a for a in manifest["memory"]["eval_actors"] if a["from_gradient_worker"]]
    assert [a["actor"] for a in served] == [manifest["memory"]["gradient_ranks"][0]["node"]]
    assert served[0]["load_s"] == 0
    # The timeline: every phase in order, each stage's CPU where its processes spent it.
    phases = {p["phase"]: p for p in manifest["timeline"]}
    order = [p["phase"] for p in manifest["timeline"] if p["phase"] != "driver between stages"]
    assert order == ["python start and imports", "read input", "Ray start-up", "plan", "model", "data", "sensitivity",
                     "ranking", "perturbation", "export", "Ray shutdown"]
    assert phases["sensitivity"]["cpu_s"]["gradient worker"] > 0
    # The worker serving as the first actor keeps its process, and its name in the timeline.
    assert phases["perturbation"]["cpu_s"]["gradient worker"] > 0
    assert "Ray raylet" in phases["Ray start-up"]["cpu_s"]
    for stage, seconds in summary["stage_timings_s"].items():  # the stages' own clocks agree
        assert phases[stage]["wall_s"] == pytest.approx(seconds, abs=0.1)
    with pytest.raises(KeyError, match="undeclared manifest field"):
        RunRecord(RunDirectory(run_dir), {}).set(bogus=1)
    stats = json.loads((run_dir / "sensitivity_statistics.json").read_text())
    assert stats["grad_x_weight"]["overall"]["count"] == summary["num_scored_weights"]
    assert "Analysis complete" in proc.stdout and "Baseline perplexity" in proc.stdout



def test_no_perturbation_run(ray_local, tiny_model_dir, tmp_path):
    code = main(["--model", str(tiny_model_dir["gpt2"]), *SMALL, "--topk", "7", "--no-perturbation",
                 "--output", str(tmp_path), "--experiment-id", "np"])
    assert code == 0
    run_dir = tmp_path / "np"
    assert (run_dir / "top_7_weights_grad_x_weight.csv").is_file()
    assert not (run_dir / "perturbation_results.csv").exists()
    summary = json.loads((run_dir / "experiment_summary.json").read_text())
    assert summary["experiments_completed"] == 0 and summary["max_ppl_increase"] is None
    assert summary["baseline_perplexity"] > 1  # with no actors, the gradient worker measures it


ALL_METRICS = ["grad_x_weight", "grad_squared", "fisher", "obd", "wanda", "magnitude"]


@pytest.mark.extended  # two minutes; the report's run (tests/reporting/test_report.py) runs the study by default
def test_a_perturbation_mode_and_the_ablation_study_on_two_zero3_ranks(ray_local, tiny_model_dir, tmp_path):
    """Every metric, rolling windows, a bit-flip mode and the ablation study, on two ZeRO-3 ranks."""
    code = main(["--model", str(tiny_model_dir["llama"]), *SMALL, "--metric", *ALL_METRICS, "--stride", "24",
                 "--topk", "10", "--perturbation-ratios", "0.5", "--random-seeds", "1", "--super-weights", "0",
                 "--perturbation-mode", "bit_flip", "--perturbation-bit", "23",
                 "--ablation-study", "4", "--num-workers", "2", "--output", str(tmp_path), "--experiment-id", "abl"])
    assert code == 0
    run = tmp_path / "abl"
    # The mode runs through the actor pool: the five most critical weights, each doubled or halved by
    # their lowest exponent bit, change perplexity more than five random ones.
    results = pd.read_csv(run / "perturbation_results.csv")
    assert (results["mode"] == "bit_flip").all() and results["restored_exact"].all()
    assert (results["status"] == "ok").all()
    # Asked for as a metric, |w| is still run once, as the control it also is.
    assert results["key"].is_unique and (results["metric"] == "magnitude").sum() == 1
    assert results[results["metric"] == "magnitude"]["is_control"].all()
    for metric in ALL_METRICS:
        assert (run / f"top_10_weights_{metric}.csv").exists()
    change = (results["perturbed_ppl"] / results["baseline_ppl"] - 1).abs()
    assert change[results["metric"] == "grad_x_weight"].iloc[0] > change[results["metric"] == "random"].iloc[0]
    # The ablation study zeroes each weight alone whatever the mode of the main experiments.
    study = pd.read_csv(run / "ablation_study.csv")
    assert 6 <= len(study) <= 4 * len(ALL_METRICS) + 4 and study["source"].str.contains("random").sum() == 4
    rankings = pd.read_parquet(run / "rankings.parquet")
    for metric in ALL_METRICS:
        top = study[study["source"].str.contains(f"top:{metric}")]
        assert len(top) == 4
        # The gradient, weight, Fisher and input norms read back from the two ranks give the
        # ranking's scores, bit for bit.
        ranked = rankings[rankings["metric"] == metric].set_index(["param", "flat_index"])
        for r in top.itertuples(index=False):
            hit = ranked.loc[(r.param, r.flat_index)]
            assert (hit["grad"], hit["weight"], hit["score"]) == (r.grad, r.weight, getattr(r, f"score_{metric}"))
    assert np.allclose(study["delta_nll"], np.log(study["zeroed_ppl"] / study["baseline_ppl"]))
    full = json.loads((run / "experiment_summary.json").read_text())
    summary = full["ablation_study"]
    assert summary["measured"] == len(study)
    data = full["data"]
    assert data["stride"] == 24 and data["evaluation"]["predicted_tokens"] > 0
    for m in ALL_METRICS:
        s = summary["metrics"][m]
        assert -1 <= s["spearman"] <= 1 and s["spearman_ci"][0] <= s["spearman"] <= s["spearman_ci"][1]


def _bad_inputs(model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"text\x00\x01\x02")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    short = tmp_path / "short.txt"
    short.write_text("a\n")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(100))
    not_a_dir = tmp_path / "plain_file"
    not_a_dir.write_text("x")
    return [
        (["--model", str(tmp_path / "nope")], "model directory .*nope does not exist"),
        (["--model", "no-such-org/no-such-model"], "not a local path|unreachable"),
        (["--model", str(tmp_path / "missing.gguf")], "does not exist"),
        (["--model", model_dir, "--data-file", str(tmp_path / "missing.txt")], "does not exist"),
        (["--model", model_dir, "--data-file", str(empty)], "holds no text"),
        (["--model", model_dir, "--metric", "grad_x_wieght"], "Did you mean 'grad_x_weight'"),
        (["--model", model_dir, "--topk", "0"], "not positive"),
        (["--model", model_dir, "--topk", "-3"], "not positive"),
        (["--model", model_dir, "--topk", "10000000"], "larger than the"),
        (["--model", model_dir, "--perturbation-ratios", "0"], r"outside \(0, 1\]"),
        (["--model", model_dir, "--perturbation-ratios", "1.5"], r"outside \(0, 1\]"),
        (["--model", str(corrupt)], "cannot read GGUF file"),
        (["--model", model_dir, "--data-file", str(binary)], "looks binary"),
        (["--model", model_dir, "--data-file", str(latin1)], "not UTF-8"),
        (["--model", model_dir, "--data-file", str(short)], "need one each"),
        (["--model", model_dir, "--perturbation-mode", "zeros"], "Did you mean 'zero'"),
        (["--model", model_dir, "--output", str(not_a_dir / "sub")], "cannot write to"),
        (["--model", model_dir, "--num-workers", "3", "--shard-backend", "none"], "runs one worker"),
        (["--model", model_dir, "--resume"], "no unfinished run"),
        (["--model", model_dir, "--device", "cuda"], "has no GPUs"),
        (["--model", model_dir, "--dtype", "float16"], "float16 is not supported"),
        (["--model", model_dir, "--stage-timeout-s", "0"], "positive number of seconds"),
        (["--model", model_dir, "--dry-run", "--gpu-memory-gb", "0"], "positive number of GB"),
        (["--model", model_dir, "--perturbation-mode", "bit_flip", "--perturbation-bit", "40"], "outside 0..31"),
        (["--model", model_dir, "--output", "nosuch://bucket/x"], "--output nosuch://bucket/x"),
        (["--model", model_dir, "--stability-folds", "1"], "nothing to compare"),
        (["--model", model_dir, "--stability-folds", "50"], "needs at least 50 calibration texts"),
    ]


def test_bad_input_table(ray_local, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    for args, message in _bad_inputs(str(tiny_model_dir["llama"]), tmp_path):
        defaults = [] if "--output" in args else ["--output", str(out)]
        # (--resume without an id looks for an unfinished run to continue, so it gets none)
        named = [] if "--resume" in args else ["--experiment-id", "bad"]
        code = main([*args, *SMALL, *defaults, *named])
        err = capsys.readouterr().err
        assert code == 2, args
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert re.search(message, lines[0]), (args, lines[0])
        assert "Traceback" not in err
        assert not (out / "bad" / "experiment_summary.json").exists()


def test_bad_input_in_a_real_process_exits_nonzero_without_traceback(tiny_model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cwa_dist.run", "--model", str(tiny_model_dir["llama"]), "--metric", "nope",
         "--output", str(tmp_path)], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown metric 'nope'") and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_verbose_shows_the_traceback(tiny_model_dir, tmp_path, capsys):
    assert main(["--model", str(tiny_model_dir["llama"]), "--topk", "0", "--verbose", "--output", str(tmp_path)]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_two_zero3_workers_write_the_same_ranking_as_one(ray_local, tiny_model_dir, tmp_path):
    common = ["--model", str(tiny_model_dir["llama_tied"]), *SMALL, "--metric", "grad_x_weight", "grad_squared",
              "--topk", "30", "--no-perturbation", "--output", str(tmp_path), "--cpus-per-worker", "1"]
    assert main([*common, "--num-workers", "1", "--shard-backend", "zero3", "--experiment-id", "w1"]) == 0
    assert main([*common, "--num-workers", "2", "--experiment-id", "w2"]) == 0
    for metric in ("grad_x_weight", "grad_squared"):
        one = pd.read_csv(tmp_path / "w1" / f"top_30_weights_{metric}.csv")
        two = pd.read_csv(tmp_path / "w2" / f"top_30_weights_{metric}.csv")
        assert list(zip(one["layer"], one["flat_index"])) == list(zip(two["layer"], two["flat_index"]))
        np.testing.assert_allclose(two["sensitivity"], one["sensitivity"], rtol=1e-5)
        assert (one["weight"] == two["weight"]).all()
    ds = json.loads((tmp_path / "w2" / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert main([*common, "--experiment-id", "w0"]) == 0  # auto: one CPU worker runs the plain replica
    one = pd.read_csv(tmp_path / "w1" / "top_30_weights_grad_x_weight.csv")
    plain = pd.read_csv(tmp_path / "w0" / "top_30_weights_grad_x_weight.csv")
    assert list(zip(one["layer"], one["flat_index"])) == list(zip(plain["layer"], plain["flat_index"]))
    summary = json.loads((tmp_path / "w0" / "experiment_summary.json").read_text())
    assert summary["sensitivity"]["backend"] == "none" and not (tmp_path / "w0" / "deepspeed_config.json").exists()
    workers = json.loads((tmp_path / "w2" / "experiment_summary.json").read_text())["sensitivity"]["workers"]
    assert sorted(w["rank"] for w in workers) == [0, 1]


def test_more_workers_than_the_cluster_holds_is_refused_at_once(ray_local, tiny_model_dir, tmp_path, capsys):
    code = main(["--model", str(tiny_model_dir["llama"]), *SMALL, "--num-workers", "9", "--cpus-per-worker", "1",
                 "--no-perturbation", "--output", str(tmp_path), "--experiment-id", "big"])
    assert code == 2
    assert "need 9 CPU in all, but the Ray cluster has 4" in capsys.readouterr().err
    assert not (tmp_path / "big" / "experiment_summary.json").exists()


def test_the_plan_and_the_checkpoint_are_recorded(full_run, tiny_model_dir):
    from cwa_dist.modeling.checkpoint import Checkpoint
    from cwa_dist.modeling.sources import headers_digest

    run_dir, proc = full_run
    config = json.loads((run_dir / "config.json").read_text())
    plan = config["plan"]
    assert plan["device"] == "cpu" and plan["dtype"] == "float32" and plan["dtype_note"] is None
    assert plan["num_workers"] == 1 and plan["backend"] == "none" and plan["num_eval_actors"] >= 1
    assert "🧭 Plan: 1 gradient worker(s)" in proc.stdout
    checkpoint = config["checkpoint"]
    assert checkpoint["kind"] == "local" and checkpoint["revision"] is None
    assert checkpoint["headers_sha256"] == headers_digest(Checkpoint(tiny_model_dir["llama"]))
    # The weights' identity is their bytes: sha256 over each file's name and sha256, by name.
    content = hashlib.sha256()
    for f in sorted(Checkpoint(tiny_model_dir["llama"]).files):
        content.update(f"{f}\0{hashlib.sha256((tiny_model_dir['llama'] / f).read_bytes()).hexdigest()}\n".encode())
    assert checkpoint["content_sha256"] == content.hexdigest() == config["weights"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["plan"] == plan and manifest["checkpoint"] == checkpoint


def _float64_gradients(net, windows):
    """Plain PyTorch: the gradient of the token-weighted mean NLL over `windows`, per parameter."""
    net.zero_grad()
    tokens = sum(len(c) - 1 for c in windows)
    loss = sum(torch.nn.functional.cross_entropy(net(input_ids=c[None]).logits[0, :-1], c[1:], reduction="sum")
               for c in windows) / tokens
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def test_stability_folds_match_plain_pytorch_on_each_fold(ray_local, tiny_model_dir, tmp_path):
    """--stability-folds 3: each fold's ranking, the overlaps, Spearman's ρ and the inclusion
    frequencies, all recomputed from float64 plain PyTorch on the recorded folds' texts."""
    from scipy.stats import spearmanr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cwa_dist.reporting.outputs import STABILITY_COLUMNS

    metrics = {"grad_x_weight": lambda g, w: (g * w).abs(), "grad_squared": lambda g, w: g * g}
    code = main(["--model", str(tiny_model_dir["llama"]), *SMALL, "--no-perturbation", "--metric", *metrics,
                 "--topk", "5", "20", "--stability-folds", "3", "--output", str(tmp_path), "--experiment-id", "st"])
    assert code == 0
    run = tmp_path / "st"
    summary = json.loads((run / "experiment_summary.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    calibration = summary["data"]["calibration"]
    folds = calibration["folds"]
    assert len(folds) == 3 and sorted(t for f in folds for t in f["texts"]) == calibration["texts"]
    assert sum(f["predicted_tokens"] for f in folds) == calibration["predicted_tokens"]

    net = AutoModelForCausalLM.from_pretrained(tiny_model_dir["llama"], dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir["llama"])
    documents = tokenize_documents(tok, load_texts(None, cfg["eval_limit"]), cfg["seq_len"])
    params = dict(net.named_parameters())
    names = select_parameters(net, include_bias=False, include_norm=False)
    texts = {"all": calibration["texts"], **{f"fold_{i + 1}": f["texts"] for i, f in enumerate(folds)}}
    scores, tops = {}, {}
    for ranking, ids in texts.items():
        grads = _float64_gradients(net, [w for t in ids for w in documents[t]])
        for m, fn in metrics.items():
            per = {n: fn(grads[n], params[n].detach()).reshape(-1) for n in names}
            scores[m, ranking] = per
            top_names, top_flat, _ = brute_force_topk(per, 20)
            tops[m, ranking] = list(zip(top_names, top_flat.tolist()))

    fold_rankings = pd.read_parquet(run / "fold_rankings.parquet")
    for (m, fold), rows in fold_rankings.groupby(["metric", "fold"]):
        assert list(zip(rows["param"], rows["flat_index"])) == tops[m, fold]
        want = [float(scores[m, fold][n][i]) for n, i in tops[m, fold]]
        np.testing.assert_allclose(rows["score"], want, rtol=1e-5)

    table = pd.read_csv(run / "stability.csv")
    assert list(table.columns) == list(STABILITY_COLUMNS)
    assert len(table) == len(metrics) * 2 * (3 + 3)  # per metric and K: 3 folds against all, 3 pairs of folds
    for r in table.itertuples(index=False):
        a, b = set(tops[r.metric, r.a][: r.k]), set(tops[r.metric, r.b][: r.k])
        assert (r.shared, r.union) == (len(a & b), len(a | b)) and r.overlap == pytest.approx(len(a & b) / r.k)
        union = sorted(a | b)
        rho = spearmanr([float(scores[r.metric, r.a][n][i]) for n, i in union],
                        [float(scores[r.metric, r.b][n][i]) for n, i in union]).statistic
        assert r.spearman_rho == pytest.approx(rho, abs=1e-9) and r.rho_low <= r.spearman_rho <= r.rho_high

    rankings = pd.read_parquet(run / "rankings.parquet")
    for m in metrics:
        rows = rankings[rankings["metric"] == m]
        want = [sum((n, i) in set(tops[m, f"fold_{j + 1}"]) for j in range(3)) / 3
                for n, i in zip(rows["param"], rows["flat_index"])]
        np.testing.assert_allclose(rows["inclusion_frequency"], want)
    assert rankings[rankings["metric"] == "magnitude"]["inclusion_frequency"].isna().all()

    for m in metrics:
        for k in ("5", "20"):
            s = summary["stability"][m][k]
            mutual = table[(table["metric"] == m) & (table["k"] == int(k)) & (table["b"] != "all")]
            assert s["fold_overlap_mean"] == pytest.approx(mutual["overlap"].mean())
            assert s["unstable"] == (mutual["overlap"].mean() < 0.8)
            assert any(f"The top {k} by {m} is {'unstable' if s['unstable'] else 'stable'} over 3 disjoint folds"
                       in line for line in summary["findings"]["sentences"])
    assert "Ranking stability" in (run / "report.html").read_text()


def test_quantization_study_keeps_the_main_experiments_sets(ray_local, tiny_model_dir, tmp_path):
    """--quantization-study 4: one row per kept set, each the same weights as the matching main
    experiment at the largest K (ratio 1), restored exactly; the summary and the page show it."""
    from cwa_dist.reporting.outputs import QUANTIZATION_COLUMNS

    code = main(["--model", str(tiny_model_dir["llama"]), *SMALL, "--topk", "4", "12", "--perturbation-ratios", "1.0",
                 "--random-seeds", "2", "--super-weights", "1", "--quantization-study", "4", "--quant-block-size", "8",
                 "--output", str(tmp_path), "--experiment-id", "q"])
    assert code == 0
    run = tmp_path / "q"
    table = pd.read_csv(run / "quantization_results.csv")
    assert list(table.columns) == list(QUANTIZATION_COLUMNS)
    supers = pd.read_csv(run / "super_weights.csv")
    sets = ["none", "grad_x_weight", "random", "random", "magnitude", "random_same_tensor[grad_x_weight]"]
    assert sorted(table["kept"]) == sorted(sets + ["super_weights"] * (len(supers) > 0))
    assert (table["status"] == "ok").all() and table["restored_exact"].all()
    assert (table["bits"] == 4).all() and (table["block_size"] == 8).all()
    kept = table.set_index(["kept", table["seed"].fillna(-1)])["weights_kept"]
    assert kept[("none", -1)] == 0 and kept[("grad_x_weight", -1)] == 12 and kept[("random", 0)] == 12
    none = table[table["kept"] == "none"].iloc[0]
    np.testing.assert_allclose(table["vs_nothing_kept"], table["perplexity"] / none["perplexity"])
    # Paired against nothing kept, on the same resampled windows: nothing kept against itself is exactly 1.
    assert (none["vs_nothing_kept_ci_low"], none["vs_nothing_kept_ci_high"]) == (1.0, 1.0)
    assert ((table["vs_nothing_kept_ci_low"] <= table["vs_nothing_kept"])
            & (table["vs_nothing_kept"] <= table["vs_nothing_kept_ci_high"])).all()
    np.testing.assert_allclose(table["ppl_ratio"], table["perplexity"] / table["baseline_ppl"])
    assert ((table["ppl_ci_low"] <= table["perplexity"]) & (table["perplexity"] <= table["ppl_ci_high"])).all()
    main_rows = pd.read_csv(run / "perturbation_results.csv")
    assert table["baseline_ppl"].iloc[0] == main_rows["baseline_ppl"].iloc[0]
    summary = json.loads((run / "experiment_summary.json").read_text())
    assert summary["quantization_study"]["bits"] == 4 and len(summary["quantization_study"]["rows"]) == len(table)
    assert "Quantization study" in (run / "report.html").read_text()
