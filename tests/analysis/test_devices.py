"""Device handling (cwa_dist/analysis/devices.py and the places that call it), on a stand-in CUDA device.

Scores are computed where the gradient lives; candidates come to the CPU as they are made; what a
worker or actor returns is CPU-only; a shard whose weight and gradient sit on two devices (ZeRO-3
offload) is brought to one. Each is run here on `fake_cuda` tensors, which raise on mixed devices
as CUDA does, and compared value for value with the same work on the CPU.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO

from cwa_dist.analysis.devices import colocated, shared_visibility, to_cpu
from cwa_dist.analysis.perturb import MODES, ModeOptions, Targets, apply, restore, restored_exactly
from cwa_dist.analysis.sensitivity import GradientSums, ParamShard, ShardScorer, merge_scores, values_at
from cwa_dist.distributed.backends.base import make_shard
from cwa_dist.distributed.grad_workers import WorkerReport

# The stand-in device is registered with torch for the whole process, and then torch (autocast, for
# one) treats it as a backend everywhere: the stand-in cases run in a child pytest of their own.
CHILD = os.environ.get("CWA_DIST_FAKE_CUDA_CHILD") == "1"
if CHILD:
    from fake_cuda import CUDA, FakeCuda, MixedDeviceError, fake_cuda, on_fake_cuda
STAND_IN: list[str] = []


def stand_in(test):
    """A case on the stand-in device: run by the child process only."""
    STAND_IN.append(test.__name__)
    return pytest.mark.skipif(not CHILD, reason="runs in the child process of the test below")(test)


class Norms:
    """Wanda's input norms as FeatureNorms gives them (on the CPU, where the counts were kept)."""

    def __init__(self, n: int, seed: int):
        self.values = torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.5

    def expand(self, name, offset, n):
        return self.values[offset:offset + n]

    def at(self, name, flat):
        return self.values[flat]


def shards(seed: int = 0) -> list[ParamShard]:
    """Two parameters, the second in two shards (as two ranks would own it), with ties."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, offset, n in (("a.weight", 0, 3000), ("b.weight", 0, 1700), ("b.weight", 1700, 1300)):
        w, grad, fisher = (torch.randn(n, generator=g) for _ in range(3))
        w[:5] = 1.0  # ties across parameters
        grad[:5] = 2.0
        out.append(ParamShard(name, offset, w, grad, fisher.abs()))
    return out


def score(parts: list[ParamShard], k: int = 50):
    scorer = ShardScorer(METRICS, k, Norms(3000, seed=1))
    for s in parts:
        scorer.add(s)
    return scorer.result()


def gpu_copy(s: ParamShard) -> ParamShard:
    return ParamShard(s.name, s.offset, *(on_fake_cuda(t) for t in (s.weight, s.grad, s.fisher)))


@stand_in
def test_the_stand_in_refuses_mixed_devices_as_cuda_does():
    with fake_cuda():
        x = torch.ones(4, device=CUDA)
        assert isinstance(x, FakeCuda) and x.device == CUDA
        with pytest.raises(MixedDeviceError):
            x + torch.ones(4)
        with pytest.raises(MixedDeviceError):
            torch.arange(4)[torch.tensor([1, 2]).to(CUDA)]
        assert float((x + torch.tensor(1.0)).sum()) == 8.0  # a CPU scalar mixes, as on CUDA
        assert type(x.cpu()) is torch.Tensor
    with pytest.raises(TypeError):
        pickle.dumps(on_fake_cuda(torch.ones(2)))


@stand_in
def test_scoring_on_the_gpu_gives_cpu_candidates_equal_to_the_cpu_run():
    cpu = score(shards())
    with fake_cuda():
        gpu = score([gpu_copy(s) for s in shards()])
    for m in ["magnitude", *METRICS]:
        got, want = gpu.candidates[m], cpu.candidates[m]
        for t in (got.param, got.flat_index, got.score, got.weight, got.grad):
            assert type(t) is torch.Tensor and t.device.type == "cpu"
        assert got.names() == want.names() and torch.equal(got.flat_index, want.flat_index)
        assert torch.equal(got.score, want.score) and torch.equal(got.weight, want.weight)
    for m in METRICS:
        assert gpu.statistics[m].finalize() == cpu.statistics[m].finalize()
    # The driver's merge of two ranks' results (one scored on the GPU) is the single run's.
    with fake_cuda():
        left = score([gpu_copy(s) for s in shards()[:2]])
    merged = merge_scores([left, score(shards()[2:])], 50)
    assert merged.candidates["wanda"].names() == cpu.candidates["wanda"].names()
    assert torch.equal(merged.candidates["wanda"].score, cpu.candidates["wanda"].score)
    pickle.dumps(merged)


@stand_in
def test_a_report_with_gpu_tensors_crosses_the_process_boundary_as_cpu_tensors():
    with fake_cuda():
        scores = score([gpu_copy(s) for s in shards()])
        stray = torch.full((3,), 2.0, device=CUDA)
    report = WorkerReport(rank=0, node="h:1", scores=scores, loss=1.0, backward_s=0.0, scoring_s=0.0,
                          scored_in_backward=3, peak_rss_bytes=0, local_param_numel=0, local_grad_numel=0,
                          peak_device_bytes=0, live_tensor_bytes=0)
    report.scores.candidates["extra"] = report.scores.candidates["wanda"]
    object.__setattr__(report.scores.candidates["extra"], "score", stray)
    with pytest.raises(TypeError):
        pickle.dumps(report)
    moved = pickle.loads(pickle.dumps(to_cpu(report)))
    assert moved.scores.candidates["extra"].score.tolist() == [2.0, 2.0, 2.0]
    plain = {"a": torch.ones(2), "b": [1, "x", (torch.zeros(1),)]}
    assert to_cpu(plain) is plain  # nothing to move: nothing copied


@stand_in
def test_values_at_reads_gpu_shards_into_cpu_columns():
    wanted = {"b.weight": torch.tensor([3, 1699, 1700, 2999]), "a.weight": torch.tensor([0, 2999])}
    cpu = values_at(shards(), wanted, Norms(3000, seed=1))
    with fake_cuda():
        gpu = values_at([gpu_copy(s) for s in shards()], wanted, Norms(3000, seed=1))
    assert set(gpu) == set(cpu)
    for name in cpu:
        for got, want in zip(gpu[name], cpu[name]):
            assert type(got) is torch.Tensor and torch.equal(got, want)


@stand_in
@pytest.mark.parametrize("weight_on,grad_on", [("cpu", "cuda"), ("cuda", "cpu")])
def test_an_offloaded_zero3_shard_is_scored_on_the_ranks_device(weight_on, grad_on):
    """--offload-params leaves the weight partition in host memory, --offload-optimizer the
    gradient; the backend's make_shard brings both (and the Fisher's sums) to the rank's GPU."""
    ref = shards()[0]
    place = {"cpu": lambda t: t.clone(), "cuda": on_fake_cuda}  # noqa: F821 (imported in the child)
    sums = GradientSums(per_window=True)
    sums.start_window()
    sums.add(ref.name, place[grad_on](ref.grad), scale=1.0)
    with fake_cuda():
        for per_window in (None, sums):
            shard = make_shard(ref.name, 0, place[weight_on](ref.weight), place[grad_on](ref.grad), per_window, CUDA)
            assert all(t.device == CUDA for t in (shard.weight, shard.grad))
            scorer = ShardScorer(["grad_x_weight"] + (["fisher"] if per_window else []), 10)
            scorer.add(shard)  # mixed devices would raise here
            want = torch.topk((ref.grad * ref.weight).abs(), 10).values
            assert torch.equal(scorer.result().candidates["grad_x_weight"].score, want)
    assert colocated(torch.device("cpu"), None, ref.weight)[0] is None


@stand_in
@pytest.mark.parametrize("mode", sorted(MODES.names()))
def test_every_perturbation_mode_runs_and_restores_on_the_gpu(mode):
    g = torch.Generator().manual_seed(3)
    values = {"w": torch.randn(40, 30, generator=g) * 0.1, "v": torch.randn(17, generator=g)}
    targets = Targets(["w", "v"], torch.tensor([0, 0, 1, 0]), torch.tensor([5, 1199, 16, 600]))
    cpu = {n: t.clone() for n, t in values.items()}
    saved_cpu = apply(cpu, targets, mode, ModeOptions(seed=7))
    with fake_cuda():
        params = {n: on_fake_cuda(t) for n, t in values.items()}
        saved = apply(params, targets, mode, ModeOptions(seed=7))
        for n in params:  # the perturbed values equal the CPU's, bit for bit
            assert torch.equal(params[n].cpu().view(torch.int32), cpu[n].view(torch.int32))
        restore(params, saved)
        assert restored_exactly(params, saved)
        assert all(torch.equal(params[n].cpu(), values[n]) for n in values)
    restore(cpu, saved_cpu)


def test_ranks_of_one_node_see_every_gpu_of_that_node():
    assigned = [("n1", ["3"]), ("n1", ["1"]), ("n2", ["0"]), ("n1", ["10"]), ("n2", ["5", "4"])]
    assert shared_visibility(assigned) == [("1,3,10", 1), ("1,3,10", 0), ("0,4,5", 0), ("1,3,10", 2),
                                           ("0,4,5", 2)]
    assert shared_visibility([("n", [])]) == [("", 0)]


@pytest.mark.ray
def test_gradient_workers_share_their_nodes_logical_gpus_through_ray():
    """Real Ray with 3 logical GPUs: each rank is given one, then sees all three and keeps its own."""
    script = textwrap.dedent("""
        import json, os, ray
        from cwa_dist.distributed.grad_workers import GradientWorker
        from cwa_dist.analysis.devices import shared_visibility
        ray.init(address="local", num_cpus=3, num_gpus=3, include_dashboard=False, log_to_driver=False)
        workers = [ray.remote(GradientWorker).options(num_cpus=1, num_gpus=1).remote(None) for _ in range(3)]
        assigned = ray.get([w.gpus.remote() for w in workers])
        shown = ray.get([w.see_gpus.remote(v, i) for w, (v, i) in zip(workers, shared_visibility(assigned))])
        print(json.dumps({"assigned": [ids for _, ids in assigned], "shown": shown}))
        ray.shutdown()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    facts = json.loads(out.stdout.strip().splitlines()[-1])
    own = [ids[0] for ids in facts["assigned"]]
    assert sorted(own) == ["0", "1", "2"]  # Ray gave each rank a different GPU
    assert facts["shown"] == ["0,1,2"] * 3
    assert math.prod(len(ids) for ids in facts["assigned"]) == 1


def test_the_stand_in_cases_in_a_process_of_their_own():
    if CHILD:
        pytest.skip("this is the child")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", " or ".join(STAND_IN)],
                         capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "CWA_DIST_FAKE_CUDA_CHILD": "1"})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], out.stdout[-1000:]

METRICS = ["grad_x_weight", "grad_squared", "fisher", "obd", "wanda"]


def test_gradient_workers_keep_pinned_blocks_at_their_size(monkeypatch):
    """Torch rounds pinned blocks to a power of two unless told otherwise; a worker tells it, and keeps
    whatever allocator configuration the user gave."""
    from cwa_dist.distributed.grad_workers import PINNED_ROUNDING, exact_pinned_blocks

    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    exact_pinned_blocks()
    assert os.environ["PYTORCH_ALLOC_CONF"] == PINNED_ROUNDING
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    exact_pinned_blocks()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == f"expandable_segments:True,{PINNED_ROUNDING}"
    assert "PYTORCH_ALLOC_CONF" not in os.environ
    # Torch itself reads the setting (a fresh process: it reads the environment once).
    code = "import torch; print(torch._C._accelerator_getAllocatorSettings())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTORCH_ALLOC_CONF": PINNED_ROUNDING})
    assert PINNED_ROUNDING in out.stdout
