"""Cluster operation as users run it, on one machine: a real `ray start --head` with Ray's fake
multi-node autoscaler (RAY_FAKE_CLUSTER=1), real `ray job submit`, and a real S3 API on loopback
(moto's server). The test starts each of them in its own process group and stops only those groups.

The head offers no CPUs, so anything that runs must run on nodes the autoscaler adds: a worker type
of 2 CPUs, and a worker type with 8 logical GPUs (never launched: no test asks for GPUs; it exists
so `--device auto` sees that the autoscaler could add GPU nodes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_llama_config

VENV_BIN = Path(sys.executable).parent
BUCKET = "cwa-test-bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a process group this test started: SIGTERM, then SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        proc.poll()
        time.sleep(0.5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _wait_for(check, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def autoscaling_config(gcs_port: int) -> dict:
    none: list = []
    return {
        "cluster_name": "cwa-fake",
        "max_workers": 3,
        "idle_timeout_minutes": 0.1,  # nodes idle for 6 s are released
        "upscaling_speed": 1.0,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_2": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
            "gpu_8": {"resources": {"CPU": 1, "GPU": 8}, "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": none, "file_mounts_sync_continuously": False,
        "initialization_commands": none, "setup_commands": none, "head_setup_commands": none,
        "worker_setup_commands": none, "head_start_ray_commands": none, "worker_start_ray_commands": none,
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A fake autoscaling Ray cluster, an S3 server with a bucket, and the environment clients need."""
    root = tmp_path_factory.mktemp("cluster")
    gcs_port, dash_port, s3_port = _free_port(), _free_port(), _free_port()
    config = root / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config(gcs_port)))
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # jobs run `python` from this venv
        "RAY_AUTH_MODE": "token",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "CWA_DIST_STAGING": str(root / "staging"),
    }
    env.pop("RAY_ADDRESS", None)
    s3 = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], env=env,
                          stdout=open(root / "moto.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--num-cpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         # Its own agent port: another Ray on this machine (the tests' local one) holds the default 52365,
         # and a head whose agent cannot bind has no job API.
         f"--dashboard-agent-listen-port={_free_port()}",
         f"--autoscaling-config={config}"],
        env={**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
        stdout=open(root / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
    )
    try:
        import boto3

        def bucket():
            try:
                boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                             aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=BUCKET)
                return True
            except Exception:
                return False

        _wait_for(bucket, 60, "the S3 server")
        address = f"http://127.0.0.1:{dash_port}"
        _wait_for(lambda: subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env,
                                         capture_output=True).returncode == 0, 120, "the Ray head's job API", 2)
        yield {"env": env, "gcs": f"127.0.0.1:{gcs_port}", "dashboard": address, "root": root}
    finally:
        _stop_group(head)
        _stop_group(s3)
        # `ray start` records its cluster for `ray.init()` to join; a killed head leaves the record behind,
        # and later runs of the embedded default would try to join the dead cluster.
        record = Path("/tmp/ray/ray_current_cluster")
        if record.is_file() and record.read_text().strip().endswith(f":{gcs_port}"):
            record.unlink()


def cli(cluster, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cwa_dist.run", "--ray-address", cluster["gcs"], *map(str, args)],
                          env=cluster["env"], capture_output=True, text=True, timeout=timeout, cwd=cluster["root"])


def ray_cli(cluster, *args, timeout=300, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(VENV_BIN / "ray"), *args], env=cluster["env"], capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def submit(cluster, *args) -> subprocess.CompletedProcess:
    """`ray job submit ARGS`, asked again while the head's job agent is not reachable yet ("No available
    agent to submit job, please try again later": Ray waits only 10 s for it, a loaded machine takes longer)."""
    deadline = time.monotonic() + 60
    while True:
        p = ray_cli(cluster, "job", "submit", "--address", cluster["dashboard"], *args, check=False)
        if p.returncode == 0 or "No available agent" not in p.stdout + p.stderr or time.monotonic() > deadline:
            assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
            return p
        time.sleep(3)


def nodes(cluster) -> list[dict]:
    p = ray_cli(cluster, "list", "nodes", "--address", cluster["dashboard"], "--format", "json", "--detail")
    return json.loads(p.stdout)


def s3_client(cluster):
    import boto3

    return boto3.client("s3", endpoint_url=cluster["env"]["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def s3_keys(cluster, prefix: str) -> set[str]:
    listing = s3_client(cluster).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix):] for o in listing.get("Contents", [])}


def s3_json(cluster, key: str) -> dict:
    return json.loads(s3_client(cluster).get_object(Bucket=BUCKET, Key=key)["Body"].read())


SMALL_RUN = ["--device", "cpu", "--seq-len", 32, "--eval-limit", 8, "--topk", 5]


def test_autoscaler_adds_nodes_for_two_workers_and_releases_them(cluster, tiny_model_dir, tmp_path):
    p = cli(cluster, "--model", tiny_model_dir["llama"], *SMALL_RUN, "--num-workers", 2, "--random-seeds", 1,
            "--perturbation-ratios", 1.0, "--output", tmp_path, "--experiment-id", "scaled")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((tmp_path / "scaled" / "experiment_summary.json").read_text())
    assert summary["experiments_completed"] == 4 and len(summary["sensitivity"]["workers"]) == 2
    manifest = json.loads((tmp_path / "scaled" / "manifest.json").read_text())
    assert manifest["ray"]["resources"].get("CPU", 0) == 0  # the run began with no CPU anywhere
    added = [n for n in nodes(cluster) if not n["is_head_node"]]
    assert added and all(n["resources_total"].get("CPU") == 2 for n in added), added  # the 2-CPU type, not the GPU one
    # Released after the idle timeout (6 s; the autoscaler looks every second).
    _wait_for(lambda: all(n["state"] == "DEAD" for n in nodes(cluster) if not n["is_head_node"]), 90,
              "the added nodes to be released", 3)


def test_dry_run_of_70b_resolves_to_gpus_the_autoscaler_can_add_and_needs_optimizer_offload(cluster, tmp_path):
    model = write_llama_config(tmp_path / "llama-2-70b", hidden=8192, intermediate=28672, layers=80, heads=64,
                               kv_heads=8)
    args = ["--model", model, "--dry-run", "--num-workers", 8, "--gpus-per-worker", 1, "--gpus-per-eval-actor", 2,
            "--gpu-memory-gb", 80, "--topk", 100, 1000]
    refused = cli(cluster, *args)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--offload-optimizer would make it fit" in refused.stderr
    accepted = cli(cluster, *args, "--offload-optimizer")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    out = accepted.stdout
    assert "68,976,648,192 parameters" in out
    assert "Device: cuda (the autoscaler can add up to 8 GPU(s)" in out
    assert "dtype bfloat16; backend zero3; nccl" in out
    assert "✅ The plan fits" in out
    assert not (tmp_path / "outputs").exists() and not (cluster["root"] / "outputs").exists()


def test_ray_job_submit_with_a_relative_output_warns_and_keeps_the_results(cluster, tiny_model_dir):
    run_id = f"relative_{os.getpid()}"
    kept = Path.home() / "outputs" / run_id
    try:
        p = submit(cluster, "--working-dir", ".", "--", "python", "-m", "cwa_dist.run",
                   "--model", str(tiny_model_dir["gpt2"]), *map(str, SMALL_RUN),
                   "--no-perturbation", "--experiment-id", run_id)
        logs = p.stdout + p.stderr
        assert "succeeded" in logs.lower()
        assert "🧮 Computing Sensitivity Metrics" in logs and "🏆 Ranking Critical Weights" in logs
        warnings = [line for line in logs.splitlines() if line.startswith("⚠️  --output outputs is relative")]
        assert len(warnings) == 1 and f"writing to {kept.parent}" in warnings[0], logs[-3000:]
        # Ray deletes the job's working directory; the results are where the warning said.
        manifest = json.loads((kept / "manifest.json").read_text())
        assert manifest["status"] == "complete"
        assert (kept / "rankings.parquet").is_file() and (kept / "top_5_weights_grad_x_weight.csv").is_file()
    finally:
        shutil.rmtree(kept, ignore_errors=True)
        if kept.parent.is_dir() and not any(kept.parent.iterdir()):
            kept.parent.rmdir()


@pytest.mark.extended
def test_ray_job_to_s3_stopped_mid_run_then_resumed_from_s3(cluster, tiny_model_dir):
    run = ["python", "-m", "cwa_dist.run", "--model", str(tiny_model_dir["llama"]), *map(str, SMALL_RUN),
           "--topk", "5", "10", "20", "--perturbation-ratios", "0.2", "0.4", "0.6", "0.8", "1.0",
           "--random-seeds", "8", "--num-eval-actors", "1", "--output", f"s3://{BUCKET}/jobs"]
    submit(cluster, "--no-wait", "--submission-id", "cwa-first", "--working-dir", ".", "--", *run,
           "--experiment-id", "stopped")
    prefix = "jobs/stopped/"
    # Stop the job once perturbation results have started to arrive in S3.
    _wait_for(lambda: "perturbation_results.jsonl" in s3_keys(cluster, prefix), 240, "the first results in S3", 0.2)
    ray_cli(cluster, "job", "stop", "--address", cluster["dashboard"], "cwa-first")
    status = ray_cli(cluster, "job", "status", "--address", cluster["dashboard"], "cwa-first").stdout
    assert "was stopped" in status, status
    manifest = s3_json(cluster, prefix + "manifest.json")
    assert manifest["status"] != "complete" and manifest["stages"]["ranking"]["status"] == "done"
    logged = s3_client(cluster).get_object(Bucket=BUCKET, Key=prefix + "perturbation_results.jsonl")["Body"].read()
    rows = [json.loads(line) for line in logged.splitlines() if line.strip()]
    done_before = len([r for r in rows if r["metric"] != "super_weight"])
    experiments = 3 * 5 * (1 + 8 + 1 + 1)  # the metric, 8 random, |W|, one same-tensor draw
    assert 0 < done_before < experiments, (len(logged), [(r["metric"], r["status"]) for r in rows])

    # --resume without an id continues the newest unfinished run under the S3 output.
    p = submit(cluster, "--submission-id", "cwa-resume", "--working-dir", ".", "--", *run, "--resume")
    logs = p.stdout + p.stderr
    assert "🔁 Resuming s3://" in logs and "stages already done: model, sensitivity, ranking" in logs
    assert f"{done_before} of {experiments} experiments finished earlier" in logs, logs[-3000:]
    status = ray_cli(cluster, "job", "status", "--address", cluster["dashboard"], "cwa-resume")
    assert "succeeded" in (status.stdout + status.stderr), status.stdout + status.stderr

    keys = s3_keys(cluster, prefix)
    expected = {"config.json", "manifest.json", "experiment_summary.json", "rankings.parquet",
                "sensitivity_statistics.json", "perturbation_results.csv", "perturbation_results.parquet",
                "perturbation_results.jsonl", "plots/topk_by_layer.png", "plots/ppl_vs_masked.png", "super_weights.csv",
                *(f"top_{k}_weights_grad_x_weight.csv" for k in (5, 10, 20))}
    assert expected <= keys, expected - keys
    manifest = s3_json(cluster, prefix + "manifest.json")
    assert manifest["status"] == "complete" and manifest["resumed"] == 1
    summary = s3_json(cluster, prefix + "experiment_summary.json")
    assert summary["experiments_completed"] == experiments
    assert summary["run_directory"] == f"s3://{BUCKET}/jobs/stopped"
