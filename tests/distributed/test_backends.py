"""The sharding backends: the ZeRO-3 fence around DeepSpeed's internals (backends/zero3.py), and the
order of a backend's steps (backends/base.py)."""

from __future__ import annotations

import functools

import pytest
import torch

from cwa_dist.distributed.backends import (
    PARTITION_GRADS_PARAMETERS,
    ZeroSettings,
    check_wrapped_signature,
    deepspeed_config,
)


def test_the_wrapped_deepspeed_method_has_the_signature_the_backend_expects():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    check_wrapped_signature(DeepSpeedZeroOptimizer_Stage3.partition_grads, PARTITION_GRADS_PARAMETERS)


def test_a_changed_signature_is_refused_in_one_line():
    def decorate(func):  # as DeepSpeed's instrument_w_nvtx does: no functools.wraps
        def wrapped_fn(*args, **kwargs):
            return func(*args, **kwargs)
        return wrapped_fn

    class Future:
        @decorate
        def partition_grads(self, params_to_release, grad_partitions, stream):
            pass

        @functools.wraps(partition_grads)
        def wrapped_twice(self, *a):
            pass

    expected = r"takes \(self, params_to_release, grad_partitions, stream\).*deepspeed==0.19.8"
    with pytest.raises(RuntimeError, match=expected):
        check_wrapped_signature(Future().partition_grads, PARTITION_GRADS_PARAMETERS)
    with pytest.raises(RuntimeError, match="stream"):
        check_wrapped_signature(Future.wrapped_twice, PARTITION_GRADS_PARAMETERS)


@pytest.mark.parametrize("device,pinned", [("cpu", False), ("cuda", True)])
def test_the_deepspeed_config_is_the_ranks_whatever_the_driver_has(device, pinned):
    """The driver (often on a node without GPUs) records the config the ranks run with."""
    config = deepspeed_config(ZeroSettings(offload_params=True, offload_optimizer=True), torch.bfloat16, device)
    zero = config["zero_optimization"]
    assert zero["offload_param"]["pin_memory"] is pinned and zero["offload_optimizer"]["pin_memory"] is pinned
    assert config["bf16"]["enabled"] is True


def test_backend_steps_run_only_in_order(tiny_model_dir):
    """loaded → start → steps → finish_scoring → scored: a step before start, or after scoring
    without a fresh start, is refused in one line; a fresh start makes the next stage possible."""
    from cwa_dist.analysis.sensitivity import select_parameters
    from cwa_dist.distributed.backends import ReplicaBackend
    from cwa_dist.modeling.loading import ModelRef

    d = str(tiny_model_dir["llama"])
    backend = ReplicaBackend()
    backend.load(ModelRef(source=d, checkpoint_dir=d, dtype="float32"), device="cpu", rank=0, world_size=1,
                 settings=ZeroSettings())
    with pytest.raises(RuntimeError, match="a step needs phase 'started', but the backend is 'loaded'"):
        backend.step_start(final=True)
    names = select_parameters(backend.model, include_bias=False, include_norm=False)
    ids = torch.randint(0, backend.model.config.vocab_size, (2, 12))
    for _ in range(2):  # two stages on one backend, each started afresh
        backend.prepare(names, False, metrics=["grad_x_weight"], k=5)
        backend.step_start(final=True)
        backend.forward_backward(ids, torch.ones_like(ids), total_tokens=22)
        backend.step_end(None)
        scorer = backend.finish_scoring(["grad_x_weight"], 5)
        assert len(scorer.done) == len(names)
        with pytest.raises(RuntimeError, match="is 'scored'; call start"):
            backend.step_start()
        with pytest.raises(RuntimeError, match="scoring needs phase 'started'"):
            backend.finish_scoring(["grad_x_weight"], 5)
