"""The plan every run makes first (cwa_dist/planning/run_plan.py, dry_run.py): dtype, default workers and
actors on GPU clusters, host memory per node, plans from a cluster file without Ray, and real
runs refused before any worker starts. Clusters with GPUs are Ray's logical GPUs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_llama_config

from cwa_dist.config import RunConfig
from cwa_dist.distributed.worker_group import placement_strategy
from cwa_dist.errors import UsageError
from cwa_dist.planning.run_plan import (
    ClusterView,
    NodeShape,
    cluster_file_view,
    dtype_choices,
    rounding_note,
)
from cwa_dist.planning.sizing import GiB, per_node, rank_need
from cwa_dist.stages.plan import plan_run

VENV_BIN = Path(sys.executable).parent
LLAMA2 = {"13b": dict(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40),
          "70b": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8)}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama2")
    return {name: str(write_llama_config(root / name, **shape)) for name, shape in LLAMA2.items()}


def gpu_cluster(gpus: int, *, gpu_gb: float | None = 80, node_memory_gib: float | None = 1000) -> ClusterView:
    node = NodeShape("gpu_8x", 96, 8, int(node_memory_gib * GiB) if node_memory_gib else None)
    return ClusterView(gpus_now=gpus, gpus_possible=0, source="test", free_cpus=96 * (gpus // 8),
                       task_memory_bytes=(node.memory_bytes or 0) * (gpus // 8),
                       gpu_bytes=int(gpu_gb * 1e9) if gpu_gb else None, gpu_node=node)


def test_auto_dtype_keeps_the_stored_values_where_it_can():
    assert dtype_choices("auto", "cpu", torch.float16) == [torch.float32]
    assert dtype_choices("auto", "cuda", torch.bfloat16) == [torch.bfloat16]
    assert dtype_choices("auto", "cuda", torch.float16) == [torch.float32, torch.bfloat16]
    assert dtype_choices("bfloat16", "cuda", torch.float16) == [torch.bfloat16]
    assert rounding_note(torch.float32, torch.float16) is None  # float32 holds every float16 exactly
    assert rounding_note(torch.bfloat16, torch.bfloat16) is None
    note = rounding_note(torch.bfloat16, torch.float16)
    assert "stores float16" in note and "rounds" in note
    # Why the note: float16 → bfloat16 changes most values, float16 → float32 → float16 none.
    x = torch.randn(10_000).to(torch.float16)
    assert torch.equal(x.float().half(), x)
    assert (x.to(torch.bfloat16).half() != x).float().mean() > 0.5


def test_a_float16_checkpoint_on_gpus_runs_in_float32_or_says_it_rounds(configs):
    small = plan_run(RunConfig.of(model=configs["13b"]), gpu_cluster(16))
    assert small.fit.ok and small.dtype == torch.float32 and small.dtype_note is None
    big = plan_run(RunConfig.of(model=configs["70b"], offload_optimizer=True), gpu_cluster(8))
    if big.dtype == torch.bfloat16:  # float32 did not fit: said, once, and recorded
        assert "float32 would not fit" in big.dtype_note and big.record()["dtype_note"] == big.dtype_note
        as_float32 = plan_run(RunConfig.of(model=configs["70b"], offload_optimizer=True, dtype="float32"),
                              gpu_cluster(8))
        assert not as_float32.fit.ok
    else:
        assert big.dtype_note is None
    assert big.fit.ok


def test_13b_on_one_8_gpu_node_plans_a_fitting_run_with_default_flags(configs):
    plan = plan_run(RunConfig.of(model=configs["13b"]), gpu_cluster(8))
    lay = plan.layout
    assert plan.fit.ok and plan.device == "cuda" and plan.backend == "zero3"
    assert lay.num_workers == 8 and lay.gpus_per_worker == 1 and lay.cpus_per_worker == 12  # 96 CPUs / 8 GPUs
    # One float32 replica of 13B (52 GB) fits one 80 GB GPU with its forward; the plan asks for one.
    assert lay.gpus_per_eval_actor == 1 and plan.needs[1].device_bytes <= 80e9
    assert lay.num_eval_actors == 8


def test_default_workers_are_one_nodes_gpus_and_more_nodes_are_a_named_remedy(configs):
    cfg = RunConfig.of(model=configs["70b"], dtype="bfloat16")
    plan = plan_run(cfg, gpu_cluster(32))
    assert plan.layout.num_workers == 8 and not plan.fit.ok
    offload, more = plan.fit.fix.split(" (or ")
    assert offload == "--offload-optimizer"
    n = int(more.removeprefix("--num-workers ").rstrip(")"))
    assert 8 < n <= 32  # the fewest ranks that fit, on more than one node
    assert rank_need(plan.facts, replace(plan.layout, num_workers=n)).device_bytes <= 80e9
    assert rank_need(plan.facts, replace(plan.layout, num_workers=n - 1)).device_bytes > 80e9
    assert plan_run(cfg.replace(num_workers=n), gpu_cluster(32)).fit.ok
    assert plan_run(cfg.replace(offload_optimizer=True), gpu_cluster(32)).fit.ok
    assert plan_run(RunConfig.of(model=configs["13b"]), gpu_cluster(4)).layout.num_workers == 4  # all there is


def test_70b_planned_from_the_shipped_cluster_file_needs_optimizer_offload_and_fits_with_it(configs):
    view = cluster_file_view(str(REPO / "cluster.yaml"), gpu_memory_gb=80)
    assert view.gpus_now == 0 and view.gpus_possible == 16 and view.gpu_node.gpus == 8
    assert view.gpu_node.memory_bytes == 1000 * GiB
    refused = plan_run(RunConfig.of(model=configs["70b"]), view)
    assert not refused.fit.ok and refused.fit.fix.startswith("--offload-optimizer")
    plan = plan_run(RunConfig.of(model=configs["70b"], offload_optimizer=True), view)
    assert plan.fit.ok, plan.fit.problems
    lay = plan.layout
    assert plan.device == "cuda" and lay.num_workers == 8 and lay.cpus_per_worker == 12
    ranks_on_a_node = per_node(plan.needs[0], lay, 8)
    assert ranks_on_a_node == 8 and 8 * plan.needs[0].host_bytes <= 1000 * GiB  # the offloaded buffers fit
    assert lay.gpus_per_eval_actor * 80e9 >= plan.facts.num_parameters * lay.dtype_bytes  # a replica fits its GPUs


def test_host_memory_per_node_is_checked(configs):
    cfg = RunConfig.of(model=configs["70b"], dtype="bfloat16", offload_optimizer=True)
    plan = plan_run(cfg, gpu_cluster(8, node_memory_gib=200))
    assert not plan.fit.ok
    assert any("per node" in p and "host memory" in p for p in plan.fit.problems)


def test_placement_keeps_one_nodes_ranks_together():
    assert placement_strategy(8, 1, 8) == "STRICT_PACK"
    assert placement_strategy(4, 2, 8) == "STRICT_PACK"
    assert placement_strategy(16, 1, 8) == "PACK"
    assert placement_strategy(2, 0, None) == "PACK"  # CPU workers


def cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cwa_dist.run", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_a_cluster_file_plan_starts_nothing(configs, tmp_path):
    # RAY_ADDRESS points nowhere: a plan that started or joined Ray would fail to connect.
    args = ["--model", configs["70b"], "--dry-run", "--cluster", REPO / "cluster.yaml", "--gpu-memory-gb", 80,
            "--topk", 100, 1000]
    env = {"RAY_ADDRESS": "127.0.0.1:1"}
    refused = cli(*args, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "; --offload-optimizer (or --num-workers 11) would make it fit" in refused.stderr, refused.stderr
    accepted = cli(*args, "--offload-optimizer", env=env)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "8 more GPU" not in accepted.stdout and "up to 16 more from the autoscaler" in accepted.stdout
    assert "✅ The plan fits" in accepted.stdout
    with pytest.raises(UsageError, match="needs --dry-run"):
        RunConfig.of(model=configs["70b"], cluster=str(REPO / "cluster.yaml"))


def test_a_cpu_run_whose_plan_cannot_fit_is_refused_before_any_worker(configs, tmp_path):
    out = tmp_path / "runs"
    proc = cli("--model", configs["13b"], "--device", "cpu", "--output", out, "--experiment-id", "big")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the plan does not fit" in proc.stderr and "memory for tasks" in proc.stderr
    assert not (out / "big").exists()  # refused before the run directory, any download or worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HEAD_ENV = {"RAY_AUTH_MODE": "token"}  # Ray 2.60 serves a head with token authentication once a token exists


@pytest.fixture(scope="module")
def gpu_head(tmp_path_factory):
    """`ray start --head` with 8 logical GPUs and 8 CPUs, in its own process group (stopped by PID)."""
    root = tmp_path_factory.mktemp("gpu_head")
    port = _free_port()
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **HEAD_ENV}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=8", "--num-gpus=8", "--include-dashboard=false",
         f"--dashboard-agent-listen-port={_free_port()}"],
        env=env, stdout=open(root / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(VENV_BIN / "ray"), "status", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, (root / "head.log").read_text()[-2000:]
            time.sleep(1)
        yield address
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(head.pid, signal.SIGKILL)
        record = Path("/tmp/ray/ray_current_cluster")
        if record.is_file() and record.read_text().strip().endswith(f":{port}"):
            record.unlink()


def test_a_head_with_8_logical_gpus_plans_13b_with_default_flags(gpu_head, configs):
    proc = cli("--model", configs["13b"], "--ray-address", gpu_head, "--dry-run", "--gpu-memory-gb", 80, env=HEAD_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Device: cuda (the cluster has 8 GPU(s))" in proc.stdout
    assert "gradient rank     8" in proc.stdout and "✅ The plan fits" in proc.stdout


def test_a_gpu_run_whose_plan_cannot_fit_is_refused_before_its_workers_start(gpu_head, configs, tmp_path):
    out = tmp_path / "runs"
    proc = cli("--model", configs["70b"], "--ray-address", gpu_head, "--gpu-memory-gb", 80, "--output", out,
               "--experiment-id", "refused", env=HEAD_ENV)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the plan does not fit: gradient rank: " in proc.stderr and "per GPU" in proc.stderr
    # This head's own memory (Ray's share of a laptop's) holds no 70B offload either: nothing to suggest.
    assert "nothing cwa_dist can set makes it fit" in proc.stderr
    assert not (out / "refused").exists()
    # Nothing was placed: every logical GPU is still free.
    status = subprocess.run([str(VENV_BIN / "ray"), "status", "--address", gpu_head], capture_output=True,
                            text=True, env={**os.environ, **HEAD_ENV})
    assert "0.0/8.0 GPU" in status.stdout, status.stdout
