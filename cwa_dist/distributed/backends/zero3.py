"""`zero3`: DeepSpeed ZeRO-3, and everything of DeepSpeed's that cwa_dist touches: its config,
the private method the backend wraps (its signature checked), the master copy it frees.

Parameters are created partitioned (`deepspeed.zero.Init`); rank r owns elements [r·P, (r+1)·P)
of every flattened parameter, P = ⌈numel / world⌉ (the last partition is padded; the padding is
cut off here).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from cwa_dist.analysis.devices import compute_device
from cwa_dist.analysis.sensitivity import (
    ParamShard,
    checkpoint_blocks,
)
from cwa_dist.distributed.backends.base import (
    Backend,
    check_parameter_dtype,
    make_shard,
    put_buffers,
    refuse_float16_gradients,
)
from cwa_dist.modeling.loading import ModelRef, checkpoint_keys, empty_model
from cwa_dist.sharding import ZeroSettings


def deepspeed_config(settings: ZeroSettings, dtype: torch.dtype, device: str) -> dict:
    """DeepSpeed's config for a rank computing on `device` (the same on the driver, which records
    it, as on the ranks: so it says nothing of the driver's own lack of GPUs)."""
    # Offloaded partitions are pinned where there is a GPU to copy them to: the pinned allocator
    # keeps large blocks at their size (see grad_workers.exact_pinned_blocks).
    pin = device == "cuda"
    zero: dict = {
        "stage": 3,
        "reduce_bucket_size": settings.reduce_bucket_size,
        "stage3_prefetch_bucket_size": settings.prefetch_bucket_size,
        "stage3_max_live_parameters": settings.max_live_parameters,
        "stage3_max_reuse_distance": settings.max_reuse_distance,
        "stage3_param_persistence_threshold": settings.param_persistence_threshold,
        "contiguous_gradients": True,
        "overlap_comm": False,  # nothing to overlap with: no optimizer step ever runs
    }
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if settings.offload_optimizer:
        # Moves DeepSpeed's fp32 master partitions and fp32 gradient partitions to CPU memory.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    refuse_float16_gradients(dtype)
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        # The dtype of the parameters zero.Init builds comes from these sections, not from a dtype
        # argument: DeepSpeed 0.19.8 drops that argument on an accelerator without fp16 support.
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        # Micro-batch gradients are reduced and summed in float32, whatever the weights' dtype.
        "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_allow_untested_optimizer": True,
        # Our optimizer never steps, so DeepSpeed's warning that a client optimizer is slow under
        # offload does not apply.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Zero3Backend(Backend):
    name = "zero3"

    def load(self, model: ModelRef, *, device: str, rank: int, world_size: int, settings: ZeroSettings,
             local_index: int = 0) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        self.rank, self.world_size = rank, world_size
        self.device = compute_device(device, local_index)
        dtype = model.torch_dtype
        ckpt, config = model.open()
        self.config = deepspeed_config(settings, dtype, device)
        build = lambda: AutoModelForCausalLM.from_config(  # noqa: E731
            config, dtype=dtype, trust_remote_code=model.trust_remote_code
        )
        # A first, empty build imports the model's modules (and torch's lazy ones) outside
        # zero.Init, whose patched tensor constructors break imports made inside it; it also
        # computes the buffers (rotary tables) as the model's own __init__ does, in their dtype.
        skeleton = empty_model(config, dtype=dtype, trust_remote_code=model.trust_remote_code)
        keys = checkpoint_keys(skeleton, ckpt)
        # No weight init (every value is overwritten below, and init code indexes partitioned,
        # empty tensors). The dtype comes from the config's bf16 section: see deepspeed_config.
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=self.config):
            net = build()
            # Building without init also skips tying: tie before ZeRO lays out the gradient
            # partitions, so a tied matrix stays one parameter with both uses in its gradient.
            net.tie_weights()
        check_parameter_dtype(net, dtype, lambda p: p.ds_tensor.dtype)
        # Each rank reads only its own partition of each parameter from the checkpoint files: no
        # rank, and no collective, ever holds a whole parameter, let alone the model.
        params = dict(net.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                start, length = self._span(p)
                p.ds_tensor.view(-1)[:length].copy_(ckpt.read_flat(keys[name], start, length, dtype))
            # Buffers are not partitioned; zero.Init may have created them in the wrong dtype
            # (rotary tables), so the skeleton's (and the checkpoint's persistent ones) go in.
            put_buffers(net, skeleton, ckpt, self.device)
        ckpt.close()
        # ZeRO keeps partitioned gradients only under an optimizer; this one never steps.
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
        self.engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=self.config)
        _drop_master_copy(self.engine.optimizer)
        self.engine.eval()
        self.model = self.engine.module

    def _span(self, p) -> tuple[int, int]:
        partition = p.partition_numel()
        start = self.rank * partition
        return start, max(0, min(partition, p.ds_numel - start))

    def prepare(self, scored: list[str], checkpointing: bool, inputs: frozenset[str] = frozenset(),
                **scoring) -> None:
        # Every parameter keeps requires_grad: ZeRO-3's gradient partitions are laid out for the
        # parameters the optimizer was built with.
        if checkpointing:
            checkpoint_blocks(self.model)
        self.model.eval()
        self.start(scored, inputs, **scoring)
        self._watch_partitions()
        # A fresh start: the next backward overwrites the gradient partitions instead of adding.
        self.engine.optimizer.zero_grad(set_to_none=True)

    def _watch_partitions(self) -> None:
        """ZeRO-3's equivalent of a post-accumulate-grad hook: DeepSpeed reduce-scatters gradients
        in buckets during backward and calls `partition_grads` with each bucket's parameters once
        their partitions are summed into its float32 buffer; in the final step each of those
        parameters is scored there, while backward goes on. (Its gradient partitions live in one
        buffer DeepSpeed allocates up front, so scoring frees nothing here.) `partition_grads` is
        a private method: its signature is checked before it is wrapped."""
        optimizer = self.engine.optimizer
        # DeepSpeed's own method, kept by the backend (a second stage wraps it again, not our wrapper).
        original = self._partition_grads = getattr(self, "_partition_grads", None) or optimizer.partition_grads
        check_wrapped_signature(original, PARTITION_GRADS_PARAMETERS)
        wanted = set(self.scored)
        # The backend's own table, not an attribute on DeepSpeed's parameter objects.
        names = {id(p): name for name, p in self.params.items()}

        def partition_grads(params_to_release, grad_partitions):
            out = original(params_to_release, grad_partitions)
            if self.scoring_now and not self.collects:
                for p in params_to_release:
                    name = names.get(id(p))
                    if name in wanted and self._span(p)[1] > 0:
                        self.score_ready(name)
            return out

        optimizer.partition_grads = partition_grads

    def _local_grad(self, p) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_local_grad

        grad = safe_get_local_grad(p)  # the float32 accumulation buffer
        return None if grad is None else grad.detach().reshape(-1)[: self._span(p)[1]]

    def _collect_window(self, scale: float | None) -> None:
        # After the reduce-scatter, this rank's partition holds its slice of the window's
        # gradient (the other ranks added zeros): square it, then start the next window afresh.
        for name in self.scored:
            grad = self._local_grad(self.params[name])
            if grad is not None:
                self.sums.add(name, grad, scale)
        self.engine.optimizer.zero_grad(set_to_none=True)

    @property
    def runner(self) -> torch.nn.Module:
        return self.engine

    def _backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def shard(self, name: str) -> ParamShard:
        p = self.params[name]
        start, length = self._span(p)
        weight = p.ds_tensor.detach().reshape(-1)[:length]  # the loaded values themselves
        # With --offload-params the partition is in host memory, with --offload-optimizer the
        # gradient is: make_shard brings both to this rank's device.
        return make_shard(name, start, weight, self._local_grad(p), self.sums if self.collects else None, self.device)

    def local_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.model.named_parameters():
            yield name, p.ds_tensor.reshape(-1)[: self._span(p)[1]]
        yield from self.model.named_buffers()

    def local_numel(self) -> tuple[int, int]:
        """Elements of parameters and of gradients this rank holds (partitions, padding included)."""
        params = [p for p in self.model.parameters()]
        return sum(p.ds_tensor.numel() for p in params), sum(p.partition_numel() for p in params if p.requires_grad)

    def teardown(self) -> None:
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()


PARTITION_GRADS_PARAMETERS = ("self", "params_to_release", "grad_partitions")
"""DeepSpeed 0.19's DeepSpeedZeroOptimizer_Stage3.partition_grads(self, params_to_release, grad_partitions)."""


def _innermost(fn):
    """The function under decorators: `__wrapped__` where functools.wraps left it, else the `func`
    a closure wraps (DeepSpeed's instrument_w_nvtx keeps no __wrapped__)."""
    fn = getattr(fn, "__func__", fn)
    while True:
        if hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
            continue
        code = getattr(fn, "__code__", None)
        cells = dict(zip(code.co_freevars, fn.__closure__ or ())) if code is not None else {}
        inner = cells["func"].cell_contents if "func" in cells else None
        if not callable(inner):
            return fn
        fn = inner


def check_wrapped_signature(method, expected: tuple[str, ...]) -> None:
    """Refuse, in one line, to wrap a private DeepSpeed method whose parameters changed."""
    import inspect

    import deepspeed

    got = tuple(inspect.signature(_innermost(method)).parameters)
    if got != expected:
        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__}: {getattr(method, '__qualname__', method)} takes ({', '.join(got)}), "
            f"not ({', '.join(expected)}) as the ZeRO-3 backend expects; install the tested deepspeed==0.19.8 "
            "(pyproject.toml bounds it) or use --shard-backend fsdp2")


def _drop_master_copy(zero_optimizer) -> None:
    """Free DeepSpeed's float32 master partitions: a copy of the parameter partitions kept for
    optimizer steps, which never happen here (4 bytes per parameter of the rank's share, on the GPU,
    or in host memory under --offload-optimizer). Their `.grad` stays: under offload it is the host
    buffer safe_get_local_grad reads the gradient from (benchmarks/bench_offload_host.py measures
    what is left: 8 bytes per parameter on the host with offload, 4 on the device without)."""
    for flat in getattr(zero_optimizer, "fp32_partitioned_groups_flat", []):
        flat.data = torch.empty(0, dtype=flat.dtype, device=flat.device)
