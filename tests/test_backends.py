"""The ZeRO-3 backend's fence around DeepSpeed's internals (cwa_dist/distributed/backends.py)."""

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
