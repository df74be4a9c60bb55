"""The gradient worker of the `none` backend serving as the first evaluation actor, on the replica
it already holds: every perplexity bit for bit a freshly loaded actor's, the next actors placed in
what its bundle has left, a killed worker replaced, and nothing left behind."""

import os
import signal

import pytest
import ray
from conftest import build_tiny_model, calibration_chunks, random_specs, saved_model

from cwa_dist.analysis.sensitivity import select_parameters
from cwa_dist.distributed.backends import ZeroSettings
from cwa_dist.distributed.eval_actors import EvalPool
from cwa_dist.distributed.grad_workers import GradientGroup


def _run_all(pool: EvalPool, specs, on_result=lambda r: None) -> dict:
    results, failures = {}, []

    def keep(r):
        results[r.key] = r
        on_result(r)

    pool.run(specs, on_result=keep, on_failure=lambda s, e: failures.append((s.key, e)), max_retries=2)
    assert not failures
    return results


def test_gradient_worker_serves_as_first_actor_bit_identical_to_fresh_actors(ray_local):
    net = build_tiny_model("llama")
    model = saved_model(net)
    calibration, evaluation = calibration_chunks(6, 24), calibration_chunks(5, 24, seed=3)
    names = select_parameters(net, include_bias=False, include_norm=False)
    specs = random_specs(net, 6)

    # The reference: a pool of one freshly loaded actor.
    fresh = EvalPool(model, evaluation, num_actors=1, device="cpu", gpus_per_actor=0, batch_size=2)
    try:
        _, fresh_baseline = fresh.first_ready()
        expected = _run_all(fresh, specs)
    finally:
        fresh.shutdown()

    # The test's Ray has 4 CPUs: the worker's bundle takes 3 and the worker claims 1 of them, so the
    # pool's two other actors fit only in the bundle (one CPU is left outside it).
    group = GradientGroup(model, num_workers=1, backend="none", device="cpu", cpus_per_worker=3, gpus_per_worker=0,
                          settings=ZeroSettings(), serve_after=True)
    worker = group.nodes[0]
    # Checkpointed blocks and gradients kept: the worker must undo both before it evaluates.
    group.sensitivity(evaluation=[], calibration=calibration, scored=names, metrics=["grad_x_weight"], k=10,
                      batch_size=2, checkpointing=True, keep_gradients=True)
    kept = group.hand_over()
    assert group.world_size == 0
    group.shutdown()  # a no-op now: the worker and its bundle are the pool's
    pool = EvalPool(model, evaluation, num_actors=3, device="cpu", gpus_per_actor=0, batch_size=2, kept=kept)
    killed = []
    try:
        first, baseline = pool.first_ready()
        ready, _ = ray.wait([a.describe.remote() for a in pool.actors], num_returns=3, timeout=180)
        assert len(ready) == 3, "the actors after the worker were not placed in its bundle"

        def kill_the_worker(r):
            if not killed:
                os.kill(int(worker.rsplit(":", 1)[1]), signal.SIGKILL)
                killed.append(worker)

        got = _run_all(pool, specs, on_result=kill_the_worker)
        intact = pool.all_weights_intact()
        baselines = dict(pool.baselines)
    finally:
        pool.shutdown()
    assert worker in baselines  # it served: its process measured a baseline
    assert baseline.window_nll == fresh_baseline.window_nll
    assert {b.window_nll for b in baselines.values()} == {fresh_baseline.window_nll}
    assert sorted(got) == sorted(expected)
    for key, r in got.items():
        assert r.perturbed.window_nll == expected[key].perturbed.window_nll, key
        assert r.restored_exact
    assert intact
    assert ray.util.placement_group_table(kept.pg)["state"] == "REMOVED"


def test_a_kept_worker_nobody_takes_is_released(ray_local):
    net = build_tiny_model("gpt2")
    group = GradientGroup(saved_model(net), num_workers=1, backend="none", device="cpu", cpus_per_worker=2,
                          gpus_per_worker=0, settings=ZeroSettings(), serve_after=True)
    kept = group.hand_over()
    kept.release()
    assert ray.util.placement_group_table(kept.pg)["state"] == "REMOVED"
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(kept.actor.where.remote(), timeout=30)


def test_only_a_whole_replica_on_cpu_can_serve(ray_local):
    model = saved_model(build_tiny_model("llama"))
    for backend, device in (("zero3", "cpu"), ("fsdp2", "cpu"), ("none", "cuda")):
        with pytest.raises(ValueError, match="replica"):
            GradientGroup(model, num_workers=1, backend=backend, device=device, cpus_per_worker=1, gpus_per_worker=0,
                          settings=ZeroSettings(), serve_after=True)
