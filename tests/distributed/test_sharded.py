"""Sharded gradients: DeepSpeed ZeRO-3 across real Ray actors over gloo equals one process."""

import math

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, calibration_chunks, run_gradient_group

from cwa_dist.analysis.evaluate import predicted_tokens
from cwa_dist.analysis.sensitivity import (
    accumulate_gradients,
    full_shards,
    prepare_gradients,
    score_shards,
    select_parameters,
)
from cwa_dist.distributed.backends import ZeroSettings

K = 150
METRICS = ["grad_x_weight", "grad_squared"]


def single_process(net, chunks, names):
    prepare_gradients(net, names)
    accumulate_gradients(net, chunks, batch_size=2, total_tokens=predicted_tokens(chunks))
    return score_shards(full_shards(net, names), METRICS, K)


def sharded(ray, net, chunks, names, world_size, backend="zero3", settings=ZeroSettings()):
    return run_gradient_group(ray, net, chunks, names, world_size=world_size, backend=backend, metrics=METRICS, k=K,
                              settings=settings)


def assert_same_ranking(got, ref, rtol):
    """Same entries in the same order; where neighbouring reference scores are closer than the
    tolerance their order is not determined by the model, so those groups compare as sets."""
    np.testing.assert_allclose(got.score.numpy(), ref.score.numpy(), rtol=rtol)
    g = list(zip(got.names(), got.flat_index.tolist()))
    r = list(zip(ref.names(), ref.flat_index.tolist()))
    s = ref.score.numpy()
    cuts = [0] + [i for i in range(1, len(s)) if abs(s[i] - s[i - 1]) > rtol * abs(s[i - 1])] + [len(s)]
    groups = list(zip(cuts, cuts[1:]))
    for lo, hi in groups:
        if hi == len(s) and hi - lo > 1:
            continue  # a near-tie group at the K-th place may be cut by K differently
        assert set(g[lo:hi]) == set(r[lo:hi]), (lo, hi)
    assert sum(hi - lo == 1 for lo, hi in groups) > len(s) // 2  # mostly a strict order


def _layouts(default: list[tuple[str, int]]) -> list:
    """Every (family, world size): those in `default` run by default, the rest with -m extended
    (each is about a minute of Ray workers on two cores; the float64 exactness tests cover every
    world size by default)."""
    combos = [(f, w) for w in (2, 3) for f in ("llama", "llama_tied", "llama_odd")]
    return [pytest.param(f, w, marks=() if (f, w) in default else pytest.mark.extended) for f, w in combos]


@pytest.mark.parametrize("family,world_size", _layouts([("llama_tied", 2), ("llama_odd", 3)]))
def test_zero3_topk_equals_single_process(ray_local, family, world_size):
    net = build_tiny_model(family)
    chunks = calibration_chunks(5, 14, ragged=True)  # 5 chunks: ranks get unequal shares
    names = select_parameters(net, include_bias=False, include_norm=False)
    ref = single_process(build_tiny_model(family), chunks, names)
    merged, reports = sharded(ray_local, net, chunks, names, world_size)
    for metric in METRICS:
        assert_same_ranking(merged.candidates[metric], ref.candidates[metric], rtol=1e-5)
        assert merged.statistics[metric].overall().count == ref.statistics[metric].overall().count
    # the weights each rank reported are the model's exact values
    assert torch.equal(merged.candidates["grad_x_weight"].weight, ref.candidates["grad_x_weight"].weight)
    assert len({r.rank for r in reports}) == world_size


@pytest.mark.parametrize("world_size", [pytest.param(2, marks=pytest.mark.extended), 3])
def test_no_rank_holds_more_than_its_partition(ray_local, world_size):
    net = build_tiny_model("llama_odd")
    names = select_parameters(net, include_bias=False, include_norm=False)
    _, reports = sharded(ray_local, net, calibration_chunks(3, 10), names, world_size)
    sizes = [p.numel() for p in net.parameters()]
    total = sum(sizes)
    per_rank = sum(math.ceil(n / world_size) for n in sizes)  # 1/N of each tensor, padding included
    for r in reports:
        assert r.local_param_numel == per_rank and r.local_grad_numel == per_rank
        assert r.local_param_numel < total / world_size + len(sizes)


@pytest.mark.extended  # the float64 exactness tests compare both, at world 1, with a reference
def test_backend_none_matches_zero3_at_world_one(ray_local):
    net = build_tiny_model("gpt2")
    chunks = calibration_chunks(4, 12)
    names = select_parameters(net, include_bias=True, include_norm=True)
    replica, _ = sharded(ray_local, net, chunks, names, 1, backend="none")
    zero, _ = sharded(ray_local, net, chunks, names, 1, backend="zero3")
    for metric in METRICS:
        assert_same_ranking(zero.candidates[metric], replica.candidates[metric], rtol=1e-5)


@pytest.mark.parametrize("family,world_size", _layouts([("llama", 2), ("llama_tied", 3)]))
def test_fsdp2_topk_equals_single_process_and_zero3(ray_local, family, world_size):
    net = build_tiny_model(family)
    chunks = calibration_chunks(5, 14, ragged=True)
    names = select_parameters(net, include_bias=False, include_norm=False)
    ref = single_process(build_tiny_model(family), chunks, names)
    fsdp, reports = sharded(ray_local, net, chunks, names, world_size, backend="fsdp2")
    zero, _ = sharded(ray_local, net, chunks, names, world_size, backend="zero3")
    for metric in METRICS:
        assert_same_ranking(fsdp.candidates[metric], ref.candidates[metric], rtol=1e-5)
        assert_same_ranking(fsdp.candidates[metric], zero.candidates[metric], rtol=1e-5)
    sizes = [p.shape for p in net.parameters()]
    rows = sum(math.ceil(s[0] / world_size) * math.prod(s[1:]) for s in sizes)
    assert max(r.local_param_numel for r in reports) <= rows
    assert sum(r.local_param_numel for r in reports) == sum(math.prod(s) for s in sizes)  # rows, no padding


@pytest.mark.parametrize("settings", [ZeroSettings(offload_params=True), ZeroSettings(offload_optimizer=True),
                                      ZeroSettings(reduce_bucket_size=1000, prefetch_bucket_size=1000,
                                                   max_live_parameters=5000, param_persistence_threshold=10)],
                         ids=["offload_params", "offload_optimizer", "small_buckets"])
def test_zero3_memory_knobs_keep_the_ranking(ray_local, settings):
    net = build_tiny_model("llama_odd")
    chunks = calibration_chunks(4, 12)
    names = select_parameters(net, include_bias=False, include_norm=False)
    ref = single_process(build_tiny_model("llama_odd"), chunks, names)
    merged, _ = sharded(ray_local, net, chunks, names, 2, settings=settings)
    for metric in METRICS:
        assert_same_ranking(merged.candidates[metric], ref.candidates[metric], rtol=1e-5)


@pytest.mark.parametrize("backend,world_size", [("none", 1), ("zero3", 1), ("zero3", 2), ("fsdp2", 2)])
def test_every_parameter_is_scored_inside_the_final_backward(ray_local, backend, world_size):
    """The path runs use: each rank scores a parameter from a hook the moment its last gradient has
    arrived (autograd's, FSDP2's after its reduce-scatter, ZeRO-3's after a bucket's partitioning),
    with the same ranking as one process scoring afterwards; freed gradients cannot be read back."""
    from cwa_dist.distributed.grad_workers import GradientGroup

    net = build_tiny_model("llama_tied")
    chunks = calibration_chunks(5, 14, ragged=True)
    names = select_parameters(net, include_bias=False, include_norm=False)
    ref = single_process(build_tiny_model("llama_tied"), chunks, names)
    from conftest import saved_model

    group = GradientGroup(saved_model(net), num_workers=world_size, backend=backend, device="cpu", cpus_per_worker=1,
                          gpus_per_worker=0, settings=ZeroSettings())
    try:
        result = group.sensitivity(evaluation=chunks[:1], calibration=chunks, scored=names, metrics=METRICS, k=K,
                                   batch_size=2, checkpointing=False)
        with pytest.raises(RuntimeError, match="freed as they were scored"):
            group.values_at({names[0]: torch.tensor([0])})
    finally:
        group.shutdown()
    unscored = sum(p.numel() for n, p in net.named_parameters() if n not in names)  # norms: FSDP2 keeps theirs
    for r in result.reports:
        assert r.scored_in_backward == len(names), (r.rank, r.scored_in_backward)
        if backend != "zero3":  # ZeRO-3's gradient partitions are one buffer, allocated up front
            assert r.local_grad_numel <= unscored
    for metric in METRICS:
        assert_same_ranking(result.merged.candidates[metric], ref.candidates[metric], rtol=1e-5)


def test_gradients_kept_for_reading_back_when_asked(ray_local):
    from conftest import saved_model

    from cwa_dist.distributed.grad_workers import GradientGroup

    net = build_tiny_model("llama")
    chunks = calibration_chunks(3, 12)
    names = select_parameters(net, include_bias=False, include_norm=False)
    single_process(net, chunks, names)
    want = dict(net.named_parameters())[names[1]].grad.reshape(-1)[:4]
    group = GradientGroup(saved_model(net), num_workers=2, backend="zero3", device="cpu", cpus_per_worker=1,
                          gpus_per_worker=0, settings=ZeroSettings())
    try:
        result = group.sensitivity(evaluation=chunks[:1], calibration=chunks, scored=names, metrics=METRICS, k=K,
                                   batch_size=2, checkpointing=False, keep_gradients=True)
        index, grad, *_ = group.values_at({names[1]: torch.arange(4)})[names[1]]
    finally:
        group.shutdown()
    assert all(r.scored_in_backward > 0 for r in result.reports)
    torch.testing.assert_close(grad.float(), want, rtol=1e-5, atol=1e-8)
