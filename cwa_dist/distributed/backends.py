"""Sharding backends of the gradient workers.

Each backend loads the model on one rank, runs forward/backward on micro-batches, and gives the
`ParamShard` that rank owns of each parameter (`shard`): (parameter name, flat offset, local
weights, local gradient), handed to the scorer from inside the final backward as each gradient
completes. Nothing above this interface knows which backend ran; the scoring and top-K code is the
same for all.

- `none`: one process holds the whole model (world size 1 only).
- `zero3`: DeepSpeed ZeRO-3. Parameters are created partitioned (`deepspeed.zero.Init`); rank r
  owns elements [r·P, (r+1)·P) of every flattened parameter, P = ⌈numel / world⌉ (the last
  partition is padded; the padding is cut off here).
- `fsdp2`: PyTorch FSDP2 (`fully_shard` per block and on the root, built on the meta device).
  Rank r owns rows [r·R, (r+1)·R) of every parameter's first dimension, R = ⌈rows / world⌉, which
  is one contiguous flat range starting at r·R·(numel/rows).

Gradient averaging: both backends average gradients over ranks, so each rank's loss is
multiplied by the world size; with every rank dividing its summed NLL by the global token count,
the result is the single-process gradient of the token-weighted mean NLL.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from cwa_dist.checkpoint import Checkpoint
from cwa_dist.devices import colocated, compute_device
from cwa_dist.evaluate import batch_nll_sum
from cwa_dist.feature_norms import FeatureNorms
from cwa_dist.metrics import FEATURE_NORM, FISHER
from cwa_dist.models import ModelRef, buffer_keys, checkpoint_keys, empty_model, load_replica
from cwa_dist.sensitivity import (
    GradientHooks,
    GradientSums,
    ParamShard,
    ShardScorer,
    checkpoint_blocks,
    full_shard,
    gradient_step,
    prepare_gradients,
    transformer_blocks,
)


@dataclass(frozen=True, slots=True)
class ZeroSettings:
    """The ZeRO-3 knobs that matter for memory."""

    offload_params: bool = False
    offload_optimizer: bool = False
    reduce_bucket_size: int = 50_000_000
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 50_000_000
    param_persistence_threshold: int = 100_000


def refuse_float16_gradients(dtype: torch.dtype) -> None:
    """float16 gradients underflow without loss scaling (RunConfig refuses --dtype float16 with
    advice; this guards the backends themselves)."""
    if dtype == torch.float16:
        raise ValueError("float16 gradients underflow without loss scaling; compute them in bfloat16 or float32")


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


class Backend:
    """What every backend shares: the loss of a micro-batch, its backward, the per-window
    accumulation the Fisher needs, the input-feature norms Wanda needs, scoring each parameter as
    soon as its gradient is complete, and the dummy passes that keep ranks without data in step.
    Subclasses set `model` (and `runner`, the module that forward is called on, when it is a
    wrapper such as DeepSpeed's engine) and say how to read (`shard`) and free (`_free`) the part
    of one parameter this rank owns.

    A step is one call of `step_start`, `forward_backward` or `dummy`, then `step_end`. With a
    scorer (`start(..., metrics=...)`), the step marked final is the calibration pass's last: from
    then on a parameter whose gradient has arrived is scored and, unless `keep_gradients`, freed."""

    world_size = 1
    device = torch.device("cpu")  # where this rank computes, and scores
    sums: GradientSums | None = None
    feature_norms: FeatureNorms | None = None
    scorer: ShardScorer | None = None
    hooks: GradientHooks | None = None  # per-parameter gradient hooks, where the backend has them
    final = False

    @property
    def runner(self) -> torch.nn.Module:
        return self.model

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def start(self, scored: list[str], inputs: frozenset[str], metrics: Sequence[str] | None = None,
              k: int = 0, keep_gradients: bool = True) -> None:
        """Fresh accumulators for what the metrics read: per-window sums for the Fisher, forward
        hooks for the input-feature norms; with `metrics`, a scorer fed during the final backward."""
        self.scored = scored
        self.params = dict(self.model.named_parameters())
        if self.hooks is not None:  # a second stage on the same rank: the subclass adds fresh ones
            self.hooks.remove()
            self.hooks = None
        self.sums = GradientSums(per_window=True) if FISHER in inputs else None
        if self.feature_norms is not None:
            self.feature_norms.remove()
        self.feature_norms = FeatureNorms(self.model, scored) if FEATURE_NORM in inputs else None
        self.scorer = ShardScorer(metrics, k, self.feature_norms) if metrics else None
        self.keep_gradients = keep_gradients
        self.freed: set[str] = set()
        self.final = False
        self._norms_reduced = False

    @property
    def per_window(self) -> bool:
        return self.sums is not None and self.sums.per_window

    @property
    def scoring_now(self) -> bool:
        """True inside the final step: a gradient that arrives is complete."""
        return self.final and self.scorer is not None

    def step_start(self, final: bool = False) -> None:
        self.final = final
        if self.hooks is not None:
            self.hooks.final = final
        if self.per_window:
            self.sums.start_window()

    def forward_backward(self, ids, mask, total_tokens: int, window_scale: float | None = None) -> float:
        """One micro-batch's backward. In per-window mode the micro-batch is one window (on one rank;
        the others pass a dummy) and `window_scale` = N / n_c, the same on every rank."""
        return gradient_step(self.runner, ids, mask, total_tokens=total_tokens, world_size=self.world_size,
                             backward=self._final_aware_backward)

    def _final_aware_backward(self, loss: torch.Tensor) -> None:
        # Wanda's norms must be summed over ranks before the first parameter is scored, which in
        # the final step is inside its backward; every rank gets here, with data or a dummy.
        if self.scoring_now:
            self.reduce_feature_norms()
        self._backward(loss)

    def step_end(self, window_scale: float | None) -> None:
        """After a step's backward, real or dummy: in per-window mode, take this rank's slice of the
        window's gradient into `sums`."""
        if self.per_window:
            self._collect_window(window_scale)

    def _collect_window(self, scale: float | None) -> None:
        """Move this window's local gradients into `sums` and clear them (sharded backends)."""

    def reduce_feature_norms(self) -> None:
        """Every rank counted the input features of its own windows: sum them over the group, once."""
        if self.feature_norms is not None and self.world_size > 1 and not self._norms_reduced:
            vector = self.feature_norms.as_vector()
            torch.distributed.all_reduce(vector)
            self.feature_norms.load_vector(vector)
        self._norms_reduced = True

    def score_ready(self, name: str) -> None:
        """Score one parameter whose gradient is complete, then free that gradient."""
        self.scorer.add(self.shard(name))
        if not self.keep_gradients:
            self._free(name)
            self.freed.add(name)

    def finish_scoring(self, metrics: Sequence[str], k: int) -> ShardScorer:
        """Score what backward did not (everything, without a scorer from `start`; parameters the
        loss never reached; per-window sums of sharded ranks) and return the scorer."""
        self.reduce_feature_norms()
        if self.scorer is None:
            self.scorer = ShardScorer(metrics, k, self.feature_norms)
        for name in self.scored:
            if name not in self.scorer.done:
                self.score_ready(name)
        return self.scorer

    def shard(self, name: str) -> ParamShard:
        raise NotImplementedError

    def _free(self, name: str) -> None:
        # A ZeRO-3 parameter's .grad is already None (its gradient lives in DeepSpeed's partition
        # buffer), so only the replica's and FSDP2's shards lose memory here.
        self.params[name].grad = None
        if self.sums is not None:
            self.sums.release(name)

    def shards(self, scored: list[str]) -> Iterator[ParamShard]:
        """The shards this rank owns, gradients included (refused for gradients freed as scored)."""
        freed = sorted(set(scored) & self.freed)
        if freed:
            raise RuntimeError(f"the gradients of {freed[0]} (and {len(freed) - 1} more) were freed as they were "
                               "scored; start with keep_gradients=True to read them afterwards")
        return (self.shard(name) for name in scored)

    def nll_sum(self, ids, mask) -> float:
        with torch.no_grad():
            return float(batch_nll_sum(self.runner, ids, mask))

    def dummy(self, backward: bool) -> None:
        """A pass over a throwaway batch, so a rank without data still joins the collectives."""
        if self.world_size == 1:
            return
        ids, mask = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)
        paused = self.feature_norms.paused() if self.feature_norms is not None else contextlib.nullcontext()
        with paused:
            if backward:
                self._final_aware_backward(batch_nll_sum(self.runner, ids, mask) * 0.0)
            else:
                self.nll_sum(ids, mask)

    def teardown(self) -> None:
        pass

    def local_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter (the part this rank holds) and buffer, for the check of the loaded values."""
        yield from self.model.named_parameters()
        yield from self.model.named_buffers()


class ReplicaBackend(Backend):
    """The whole model in one process: world size 1, no sharding."""

    name = "none"

    def load(self, model: ModelRef, *, device: str, rank: int, world_size: int, settings: ZeroSettings,
             local_index: int = 0) -> None:
        if world_size != 1:
            raise ValueError("--shard-backend none runs one worker; use zero3 or fsdp2 for more")
        self.device = compute_device(device, local_index)
        ckpt, config = model.open()
        self.model = load_replica(ckpt, config, dtype=model.torch_dtype, trust_remote_code=model.trust_remote_code,
                                  device=device, gpus=1 if device == "cuda" else 0, first_gpu=local_index)
        ckpt.close()

    def prepare(self, scored: list[str], checkpointing: bool, inputs: frozenset[str] = frozenset(),
                **scoring) -> None:
        if checkpointing:
            checkpoint_blocks(self.model)
        prepare_gradients(self.model, scored)
        self.start(scored, inputs, **scoring)
        # Hooks take each micro-batch's gradient as it arrives: for the float32 sum of a
        # low-precision model, for the per-window squares of the Fisher, and to score a parameter
        # (and free its gradient) as soon as the final step's backward has completed it.
        low_precision = next(self.model.parameters()).dtype != torch.float32
        if low_precision and self.sums is None:
            self.sums = GradientSums()
        if self.sums is not None or self.scorer is not None:
            self.hooks = GradientHooks(self.model, scored, self.sums,
                                       ready=self.score_ready if self.scorer is not None else None)

    def forward_backward(self, ids, mask, total_tokens: int, window_scale: float | None = None) -> float:
        if self.hooks is not None:
            self.hooks.scale = window_scale
        return super().forward_backward(ids, mask, total_tokens, window_scale)

    def shard(self, name: str) -> ParamShard:
        return full_shard(name, self.params[name], self.sums)

    def local_numel(self) -> tuple[int, int]:
        n = sum(p.numel() for p in self.model.parameters())
        if self.sums is not None:
            return n, sum(g.numel() for g in self.sums.sums.values())
        return n, sum(p.grad.numel() for p in self.model.parameters() if p.grad is not None)


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
            _put_buffers(net, skeleton, ckpt, self.device)
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
        original = getattr(optimizer, "_cwa_partition_grads", None) or optimizer.partition_grads
        check_wrapped_signature(original, PARTITION_GRADS_PARAMETERS)
        optimizer._cwa_partition_grads = original
        wanted = set(self.scored)
        # The backend's own table, not an attribute on DeepSpeed's parameter objects.
        names = {id(p): name for name, p in self.params.items()}

        def partition_grads(params_to_release, grad_partitions):
            out = original(params_to_release, grad_partitions)
            if self.scoring_now and not self.per_window:
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
        # gradient is: _shard brings both to this rank's device.
        return _shard(name, start, weight, self._local_grad(p), self.sums if self.per_window else None, self.device)

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


class Fsdp2Backend(Backend):
    name = "fsdp2"

    def load(self, model: ModelRef, *, device: str, rank: int, world_size: int, settings: ZeroSettings,
             local_index: int = 0) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.rank, self.world_size = rank, world_size
        self.device = compute_device(device, local_index)
        mesh = init_device_mesh(device, (world_size,))
        dtype = model.torch_dtype
        ckpt, config = model.open()
        refuse_float16_gradients(dtype)
        # The shards are kept in float32, so gradients are reduced and accumulated in float32; a
        # bfloat16 model computes in bfloat16 on the gathered values, which are its own values
        # exactly (bfloat16 -> float32 -> bfloat16 is lossless).
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        # Parameters on the meta device (no rank ever allocates the whole model); buffers real.
        net = empty_model(config, dtype=torch.float32, trust_remote_code=model.trust_remote_code)
        skeleton = empty_model(config, dtype=dtype, trust_remote_code=model.trust_remote_code)
        keys = checkpoint_keys(net, ckpt)
        # Units: each block, the input embedding and the LM head on their own (gathered only while
        # used; in the root unit they would stay gathered through the whole step), then the root.
        units = list(transformer_blocks(net))
        inputs, outputs = net.get_input_embeddings(), net.get_output_embeddings()
        if outputs is None or outputs.weight is not inputs.weight:  # a tied matrix stays in the root
            units += [m for m in (inputs, outputs) if m is not None]
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(net, mesh=mesh, mp_policy=policy)
        net.to_empty(device=self.device)
        with torch.no_grad():
            for name, p in net.named_parameters():
                local = p.to_local()
                start, _ = self._rows(p)
                per_row = p.numel() // p.shape[0]
                local.copy_(ckpt.read_flat(keys[name], start * per_row, local.numel(), torch.float32).view(local.shape))
            # to_empty left the buffers uninitialised; the skeleton's (in the model's dtype) go in.
            _put_buffers(net, skeleton, ckpt, self.device)
        ckpt.close()
        self.model = net.eval()

    def _rows(self, p) -> tuple[int, int]:
        per_rank = -(-p.shape[0] // self.world_size)
        start = min(self.rank * per_rank, p.shape[0])
        return start, min(per_rank, p.shape[0] - start)

    def prepare(self, scored: list[str], checkpointing: bool, inputs: frozenset[str] = frozenset(),
                **scoring) -> None:
        if checkpointing:
            # Recomputing a block outside FSDP's own hooks would see the resharded parameters.
            raise ValueError("--gradient-checkpointing is not supported with --shard-backend fsdp2; use zero3")
        self.model.eval()
        # The root unit stays unsharded after a forward (the baseline's): reshard every unit, so
        # the modules hold (and `start` records) the sharded DTensors that FSDP2 assigns reduced
        # gradients to.
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        self.start(scored, inputs, **scoring)
        # FSDP2 runs a sharded parameter's post-accumulate-grad hooks itself, right after its
        # unit's reduce-scatter has summed the rank's slice: there, in the final step, it is scored.
        self.hooks = (GradientHooks(self.model, scored, ready=self.score_ready)
                      if self.scorer is not None and not self.per_window else None)

    def _collect_window(self, scale: float | None) -> None:
        for name in self.scored:
            p = self.params[name]
            if p.grad is not None:
                self.sums.add(name, p.grad.to_local().reshape(-1), scale)
                p.grad = None

    def shard(self, name: str) -> ParamShard:
        p = self.params[name]
        start, _ = self._rows(p)
        grad = p.grad.to_local().detach().reshape(-1) if p.grad is not None else None
        return _shard(name, start * (p.numel() // p.shape[0]), p.to_local().detach().reshape(-1), grad,
                      self.sums if self.per_window else None, self.device)

    def local_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.model.named_parameters():
            yield name, p.to_local()
        yield from self.model.named_buffers()

    def local_numel(self) -> tuple[int, int]:
        params = list(self.model.parameters())
        return (sum(p.to_local().numel() for p in params),
                sum(p.grad.to_local().numel() for p in params if p.grad is not None))


def _shard(name: str, offset: int, weight: torch.Tensor, grad: torch.Tensor | None,
           sums: GradientSums | None, device: torch.device) -> ParamShard:
    """A rank's shard, every tensor on `device`; in per-window mode its gradient and Fisher come
    from `sums`."""
    fisher = None
    if sums is not None:
        grad, fisher = sums.sums.get(name), sums.fisher(name, weight)
    return ParamShard(name, offset, *colocated(device, weight, grad, fisher))


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


def check_parameter_dtype(net: torch.nn.Module, dtype: torch.dtype, dtype_of=lambda p: p.dtype) -> None:
    """Refuse a model whose floating parameters were not built in `dtype`: loading the checkpoint
    into them would round (or widen) every value without a word."""
    wrong = {n: dtype_of(p) for n, p in net.named_parameters()
             if dtype_of(p).is_floating_point and dtype_of(p) != dtype}
    if wrong:
        name, got = next(iter(wrong.items()))
        raise RuntimeError(f"{len(wrong)} parameter(s) were built in {got} instead of {dtype} (first: {name}); "
                           "loading the weights into them would change their values")


def _put_buffers(net: torch.nn.Module, skeleton: torch.nn.Module, ckpt: Checkpoint, device: torch.device) -> None:
    """Give `net` the buffers of `skeleton` (an `empty_model`, whose buffers are real), or the
    checkpoint's where it stores them. Every buffer is replaced: one left alone could be
    uninitialised memory or in the wrong dtype."""
    source = dict(skeleton.named_buffers())
    stored = buffer_keys(skeleton, ckpt)
    for name, _ in list(net.named_buffers()):
        value = ckpt.read(stored[name], source[name].dtype) if name in stored else source[name]
        owner, _, leaf = name.rpartition(".")
        net.get_submodule(owner)._buffers[leaf] = value.to(device)


BACKENDS = {"none": ReplicaBackend, "zero3": Zero3Backend, "fsdp2": Fsdp2Backend}
