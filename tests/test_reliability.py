"""Faults survived with real processes, resumable runs, numerics, secrets and determinism."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest
import torch
from conftest import SMALL, build_tiny_model, calibration_chunks, random_specs, saved_model

from cwa_dist.analysis.evaluate import Perplexity
from cwa_dist.analysis.sensitivity import (
    NonFiniteGradientError,
    accumulate_gradients,
    full_shards,
    prepare_gradients,
    score_shards,
    select_parameters,
)
from cwa_dist.distributed.backends import ZeroSettings
from cwa_dist.distributed.eval_actors import EvalPool
from cwa_dist.distributed.grad_workers import GradientGroup
from cwa_dist.distributed.worker_group import GradientWorkerError
from cwa_dist.modeling.loading import ModelRef
from cwa_dist.modeling.sources import resolve_checkpoint, resolve_source
from cwa_dist.run import main


def _pid(actor_name: str) -> int:
    return int(actor_name.rsplit(":", 1)[1])


def test_killed_eval_actor_is_replaced_and_every_experiment_runs_once(ray_local):
    net = build_tiny_model("llama")
    pool = EvalPool(saved_model(net), calibration_chunks(6, 24), num_actors=2, device="cpu", gpus_per_actor=0,
                    batch_size=2)
    specs = random_specs(net, 10)
    results, failures, killed = [], [], []
    try:
        names = [name for name, _ in pool.describe()]

        def on_result(r):
            results.append(r)
            if not killed:  # kill the other actor, which is busy with an experiment
                victim = next(n for n in names if n != r.actor)
                os.kill(_pid(victim), signal.SIGKILL)
                killed.append(victim)

        pool.run(specs, on_result=on_result, on_failure=lambda s, e: failures.append((s.key, e)), max_retries=2)
        assert pool.all_weights_intact()
    finally:
        pool.shutdown()
    assert not failures
    assert sorted(r.key for r in results) == sorted(s.key for s in specs)  # each exactly once
    assert all(r.restored_exact for r in results)
    # The dead actor produced nothing more, except at most the experiment it may have finished in
    # the moment between the first result and the signal.
    assert sum(r.actor == killed[0] for r in results[1:]) <= 1
    assert len({r.perturbed.value for r in results if r.key == "random|seed=3"}) == 1


def test_experiment_is_recorded_as_failed_after_its_retries(ray_local):
    net = build_tiny_model("llama")
    pool = EvalPool(saved_model(net), calibration_chunks(4, 16), num_actors=1, device="cpu", gpus_per_actor=0,
                    batch_size=2)
    results, failures = [], []
    try:
        (name, _), = pool.describe()

        def on_result(r):
            results.append(r)
            if len(results) == 1:
                os.kill(_pid(r.actor), signal.SIGKILL)  # the next experiment finds its actor dead

        pool.run(random_specs(net, 4), on_result=on_result, on_failure=lambda s, e: failures.append((s.key, e)),
                 max_retries=0)
    finally:
        pool.shutdown()
    assert len(failures) == 1 and "died 1 time" in failures[0][1]
    assert len(results) + len(failures) == 4  # the replacement actor ran the rest


def test_dead_gradient_worker_fails_fast_naming_its_rank_and_leaves_no_process(ray_local):
    net = build_tiny_model("llama")
    names = select_parameters(net, include_bias=False, include_norm=False)
    group = GradientGroup(saved_model(net), num_workers=2, backend="zero3",
                          device="cpu", cpus_per_worker=1, gpus_per_worker=0, settings=ZeroSettings())
    pids = [_pid(n) for n in group.nodes]
    group.call("begin", names, False)
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    chunks = calibration_chunks(2, 10)
    with pytest.raises(GradientWorkerError, match=rf"gradient worker rank 1 on .*:{pids[1]} died.*--resume"):
        group.each("backward", [[chunks[0]], [chunks[1]]], total_tokens=18)
    assert time.monotonic() - start < 60  # not the process group's 30-minute timeout
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, "a gradient worker outlived its group"
        time.sleep(0.5)
    group.shutdown()


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "cwa_dist.run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


PERTURB = ["--topk", "10", "40", "--perturbation-ratios", "0.25", "0.5", "1.0", "--random-seeds", "3",
           "--num-eval-actors", "1"]


@pytest.mark.extended
def test_driver_killed_mid_perturbation_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path):
    common = ["--model", str(tiny_model_dir["llama"]), *SMALL, *PERTURB, "--output", str(tmp_path)]
    # The driver in its own session, so SIGKILL to the group also takes the local Ray it started.
    victim = _run_cli([*common, "--experiment-id", "killed"], start_new_session=True)
    log = tmp_path / "killed" / "perturbation_results.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert victim.poll() is None, victim.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    done_before = len(log.read_text().splitlines())
    assert json.loads((tmp_path / "killed" / "manifest.json").read_text())["status"] == "running"
    assert not (tmp_path / "killed" / "experiment_summary.json").exists()

    resumed = _run_cli([*common, "--experiment-id", "killed", "--resume"])
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert "finished earlier" in out and "Sensitivity and ranking: done earlier" in out
    reference = _run_cli([*common, "--experiment-id", "clean"])
    assert reference.wait(timeout=600) == 0

    timing = ["wall_s", "actor"]
    a = pd.read_csv(tmp_path / "killed" / "perturbation_results.csv").drop(columns=timing)
    b = pd.read_csv(tmp_path / "clean" / "perturbation_results.csv").drop(columns=timing)
    # 2 K x 3 ratios, each: the metric, 3 random seeds, |W| and the same-tensor control.
    assert a["key"].is_unique and len(a) == 6 * 6
    pd.testing.assert_frame_equal(a, b)
    for f in ("top_40_weights_grad_x_weight.csv", "top_10_weights_grad_x_weight.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "killed" / f), pd.read_csv(tmp_path / "clean" / f))
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert len({r["key"] for r in rows}) == len(rows)  # no experiment ran twice (super weights included)
    assert len([r for r in rows if r["metric"] != "super_weight"]) == 36
    assert done_before >= 3
    summary = json.loads((tmp_path / "killed" / "experiment_summary.json").read_text())
    assert summary["experiments_completed"] == 36
    assert json.loads((tmp_path / "killed" / "manifest.json").read_text())["resumed"] == 1


def test_resume_refuses_changed_settings_and_finished_runs_are_left_alone(ray_local, tiny_model_dir, tmp_path, capsys):
    common = ["--model", str(tiny_model_dir["gpt2"]), *SMALL, "--no-perturbation", "--output", str(tmp_path)]
    assert main([*common, "--topk", "7", "--experiment-id", "r"]) == 0
    # Make it look interrupted, then change a result-affecting setting.
    manifest = tmp_path / "r" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["status"] = "running"
    manifest.write_text(json.dumps(m))
    capsys.readouterr()
    assert main([*common, "--topk", "8", "--seed", "3", "--experiment-id", "r", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "topk (stored [7], now [8])" in err and "seed (stored 0, now 3)" in err
    # Operational settings may change; the finished stages are reused.
    assert main([*common, "--topk", "7", "--resume", "--num-eval-actors", "1"]) == 0  # newest unfinished run
    assert "done earlier" in capsys.readouterr().out
    assert main([*common, "--topk", "7", "--experiment-id", "r"]) == 0
    assert "already complete" in capsys.readouterr().out
    # A gradient stage that never finished (say its worker died) is run again on resume.
    m = json.loads(manifest.read_text())
    m["status"] = "failed"
    for stage in ("sensitivity", "ranking", "export"):
        m["stages"].pop(stage)
    manifest.write_text(json.dumps(m))
    before = pd.read_csv(tmp_path / "r" / "top_7_weights_grad_x_weight.csv")
    assert main([*common, "--topk", "7", "--experiment-id", "r"]) == 0
    out = capsys.readouterr().out
    assert "Computing Sensitivity Metrics" in out and "Sensitivity and ranking: done earlier" not in out
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "r" / "top_7_weights_grad_x_weight.csv"), before)
    assert main([*common, "--topk", "7", "--experiment-id", "never", "--resume"]) == 2
    assert "holds no run to continue" in capsys.readouterr().err


def test_non_finite_loss_and_gradients_are_named():
    net = build_tiny_model("llama")
    names = [n for n, _ in net.named_parameters()]
    prepare_gradients(net, names)
    accumulate_gradients(net, calibration_chunks(2, 8), batch_size=2, total_tokens=14)
    net.model.layers[1].mlp.up_proj.weight.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*--dtype"):
        score_shards(full_shards(net, names), ["grad_x_weight"], 10)  # what every rank runs
    with torch.no_grad():
        net.model.embed_tokens.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteGradientError, match="calibration loss is nan"):
        accumulate_gradients(net, calibration_chunks(2, 8), batch_size=2, total_tokens=14)


def test_overflowing_perplexity_is_a_value():
    assert Perplexity(nll_sum=1e6, tokens=10).value == float("inf")


@pytest.mark.extended
def test_token_never_reaches_outputs_and_runs_are_deterministic(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    token = "hf_cwaDistFakeToken1234567890abcdef"
    monkeypatch.setenv("HF_TOKEN", token)
    common = ["--model", str(tiny_model_dir["llama"]), *SMALL, "--topk", "15", "--perturbation-ratios", "1.0",
              "--random-seeds", "2", "--output", str(tmp_path)]
    assert main([*common, "--experiment-id", "a", "--verbose"]) == 0
    assert main([*common, "--experiment-id", "b"]) == 0
    for f in (tmp_path / "a").rglob("*"):
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["trust_remote_code"] is False
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / "rankings.parquet"),
                                  pd.read_parquet(tmp_path / "b" / "rankings.parquet"))
    ra = pd.read_csv(tmp_path / "a" / "perturbation_results.csv")
    rb = pd.read_csv(tmp_path / "b" / "perturbation_results.csv")
    pd.testing.assert_frame_equal(ra.drop(columns=["wall_s", "actor"]), rb.drop(columns=["wall_s", "actor"]))


def test_safetensors_wins_over_a_pickle_checkpoint(ray_local, tiny_model_dir, tmp_path):
    """A directory with both formats is read from its safetensors files; the pickle is never
    unpickled (a tampered one changes nothing) and nothing is converted."""
    import shutil

    d = tmp_path / "both"
    shutil.copytree(tiny_model_dir["llama"], d)
    net = build_tiny_model("llama")
    torch.save({k: torch.zeros_like(v) for k, v in net.state_dict().items()}, d / "pytorch_model.bin")
    assert resolve_checkpoint(resolve_source(str(d)), announce=print) == d
    pool = EvalPool(ModelRef(str(d), str(d), "float32"), calibration_chunks(2, 16), num_actors=1,
                    device="cpu", gpus_per_actor=0, batch_size=2)
    try:
        (_, baseline), = pool.describe()
    finally:
        pool.shutdown()
    from cwa_dist.analysis.evaluate import perplexity

    assert baseline == perplexity(net, calibration_chunks(2, 16), 2)  # the real weights, not the zeros
