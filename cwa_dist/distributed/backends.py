"""Sharding backends of the gradient workers.

Each backend loads the model on one rank, runs forward/backward on micro-batches, and yields the
`ParamShard`s that rank owns: (parameter name, flat offset, local weights, local gradient). Nothing
above this interface knows which backend ran; the scoring and top-K code is the same for all.

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

import os
from dataclasses import dataclass
from typing import Iterator

import torch

from cwa_dist.evaluate import batch_nll_sum
from cwa_dist.models import ModelBlob
from cwa_dist.sensitivity import (
    ParamShard,
    check_loss_finite,
    checkpoint_blocks,
    full_shards,
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
    param_persistence_threshold: int = 100_000


def deepspeed_config(settings: ZeroSettings, dtype: torch.dtype) -> dict:
    zero: dict = {
        "stage": 3,
        "reduce_bucket_size": settings.reduce_bucket_size,
        "stage3_prefetch_bucket_size": settings.prefetch_bucket_size,
        "stage3_max_live_parameters": settings.max_live_parameters,
        "stage3_param_persistence_threshold": settings.param_persistence_threshold,
        "contiguous_gradients": True,
        "overlap_comm": False,  # nothing to overlap with: no optimizer step ever runs
    }
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if settings.offload_optimizer:
        # Moves DeepSpeed's fp32 master partitions and fp32 gradient partitions to CPU memory.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16, "loss_scale": 1.0},
        "zero_allow_untested_optimizer": True,
        # Our optimizer never steps, so DeepSpeed's warning that a client optimizer is slow under
        # offload does not apply.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Backend:
    """What every backend shares: the loss of a micro-batch, its backward, and the dummy passes
    that keep ranks without data in step. Subclasses set `model` (and `runner`, the module that
    forward is called on, when it is a wrapper such as DeepSpeed's engine)."""

    world_size = 1

    @property
    def runner(self) -> torch.nn.Module:
        return self.model

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def forward_backward(self, ids, mask, scale: float) -> float:
        loss = batch_nll_sum(self.runner, ids, mask) * scale
        check_loss_finite(loss)
        # Sharded backends average gradients over ranks; multiplying by the world size undoes that.
        self._backward(loss * self.world_size)
        return float(loss.detach())

    def nll_sum(self, ids, mask) -> float:
        with torch.no_grad():
            return float(batch_nll_sum(self.runner, ids, mask))

    def dummy(self, backward: bool) -> None:
        """A pass over a throwaway batch, so a rank without data still joins the collectives."""
        if self.world_size == 1:
            return
        ids, mask = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)
        if backward:
            self._backward(batch_nll_sum(self.runner, ids, mask) * 0.0)
        else:
            self.nll_sum(ids, mask)

    def teardown(self) -> None:
        pass


class ReplicaBackend(Backend):
    """The whole model in one process: world size 1, no sharding."""

    name = "none"

    def load(self, blob: ModelBlob, *, device: str, rank: int, world_size: int, settings: ZeroSettings) -> None:
        if world_size != 1:
            raise ValueError("--shard-backend none runs one worker; use zero3 or fsdp2 for more")
        self.model = blob.build(device)

    def prepare(self, scored: list[str], checkpointing: bool) -> None:
        if checkpointing:
            checkpoint_blocks(self.model)
        prepare_gradients(self.model, scored)

    def shards(self, scored: list[str]) -> Iterator[ParamShard]:
        return full_shards(self.model, scored)

    def local_numel(self) -> tuple[int, int]:
        n = sum(p.numel() for p in self.model.parameters())
        return n, sum(p.grad.numel() for p in self.model.parameters() if p.grad is not None)


class Zero3Backend(Backend):
    name = "zero3"

    def load(self, blob: ModelBlob, *, device: str, rank: int, world_size: int, settings: ZeroSettings) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        self.rank, self.world_size = rank, world_size
        dtype = blob.float_dtype()
        self.config = deepspeed_config(settings, dtype)
        build = lambda: AutoModelForCausalLM.from_config(  # noqa: E731
            blob.config, dtype=dtype, trust_remote_code=blob.trust_remote_code
        )
        # A first build on the meta device imports the model's modules (and torch's lazy ones)
        # outside zero.Init, whose patched tensor constructors break imports made inside it.
        with torch.device("meta"):
            build()
        # No weight init (every value is overwritten below, and init code indexes partitioned,
        # empty tensors).
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=self.config, dtype=dtype):
            net = build()
            # Building without init also skips tying: tie before ZeRO lays out the gradient
            # partitions, so a tied matrix stays one parameter with both uses in its gradient.
            net.tie_weights()
        # Each rank copies only its own partition out of the object store: no rank, and no
        # collective, ever holds a whole parameter, let alone the model.
        params = dict(net.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                start, length = self._span(p)
                p.ds_tensor.view(-1)[:length].copy_(blob.flat_slice(name, start, length))
            # Buffers are not partitioned; zero.Init may have created them in the wrong dtype
            # (rotary tables), so put the loaded model's own tensors in their place.
            _put_buffers(net, blob, device, strict=False)
        # ZeRO keeps partitioned gradients only under an optimizer; this one never steps.
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
        self.engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=self.config)
        self.engine.eval()
        self.model = self.engine.module

    def _span(self, p) -> tuple[int, int]:
        partition = p.partition_numel()
        start = self.rank * partition
        return start, max(0, min(partition, p.ds_numel - start))

    def prepare(self, scored: list[str], checkpointing: bool) -> None:
        # Every parameter keeps requires_grad: ZeRO-3's gradient partitions are laid out for the
        # parameters the optimizer was built with.
        if checkpointing:
            checkpoint_blocks(self.model)
        self.model.eval()

    @property
    def runner(self) -> torch.nn.Module:
        return self.engine

    def _backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def shards(self, scored: list[str]) -> Iterator[ParamShard]:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

        params = dict(self.model.named_parameters())
        for name in scored:
            p = params[name]
            start, length = self._span(p)
            grad = safe_get_local_grad(p)
            weight = safe_get_local_fp32_param(p)
            yield ParamShard(
                name=name,
                offset=start,
                weight=weight.detach().reshape(-1)[:length],
                grad=None if grad is None else grad.detach().reshape(-1)[:length],
            )

    def local_numel(self) -> tuple[int, int]:
        """Elements of parameters and of gradients this rank holds (partitions, padding included)."""
        params = [p for p in self.model.parameters()]
        return sum(p.ds_tensor.numel() for p in params), sum(p.partition_numel() for p in params if p.requires_grad)

    def teardown(self) -> None:
        if hasattr(self.engine, "destroy"):
            self.engine.destroy()


class Fsdp2Backend(Backend):
    name = "fsdp2"

    def load(self, blob: ModelBlob, *, device: str, rank: int, world_size: int, settings: ZeroSettings) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from transformers import AutoModelForCausalLM

        self.rank, self.world_size = rank, world_size
        mesh = init_device_mesh(device, (world_size,))
        dtype = blob.float_dtype()
        with torch.device("meta"):  # no rank ever allocates the whole model
            net = AutoModelForCausalLM.from_config(blob.config, dtype=dtype, trust_remote_code=blob.trust_remote_code)
        for block in transformer_blocks(net):
            fully_shard(block, mesh=mesh)
        fully_shard(net, mesh=mesh)
        net.to_empty(device=_device(device))
        with torch.no_grad():
            for name, p in net.named_parameters():
                local = p.to_local()
                start, _ = self._rows(p)
                per_row = p.numel() // p.shape[0]
                local.copy_(blob.flat_slice(name, start * per_row, local.numel()).view(local.shape))
            # to_empty left the buffers uninitialised; the loaded model's own tensors go in.
            _put_buffers(net, blob, device, strict=True)
        self.model = net.eval()

    def _rows(self, p) -> tuple[int, int]:
        per_rank = -(-p.shape[0] // self.world_size)
        start = min(self.rank * per_rank, p.shape[0])
        return start, min(per_rank, p.shape[0] - start)

    def prepare(self, scored: list[str], checkpointing: bool) -> None:
        if checkpointing:
            # Recomputing a block outside FSDP's own hooks would see the resharded parameters.
            raise ValueError("--gradient-checkpointing is not supported with --shard-backend fsdp2; use zero3")
        self.model.eval()

    def shards(self, scored: list[str]) -> Iterator[ParamShard]:
        params = dict(self.model.named_parameters())
        for name in scored:
            p = params[name]
            start, _ = self._rows(p)
            grad = p.grad.to_local().detach().reshape(-1) if p.grad is not None else None
            yield ParamShard(name=name, offset=start * (p.numel() // p.shape[0]),
                             weight=p.to_local().detach().reshape(-1), grad=grad)

    def local_numel(self) -> tuple[int, int]:
        params = list(self.model.parameters())
        return (sum(p.to_local().numel() for p in params),
                sum(p.grad.to_local().numel() for p in params if p.grad is not None))


def _put_buffers(net: torch.nn.Module, blob: ModelBlob, device: str, *, strict: bool) -> None:
    """Replace the model's buffers by the loaded model's own tensors. `strict`: every buffer must
    be in the blob (one left out would stay uninitialised memory)."""
    for name, _ in list(net.named_buffers()):
        if strict or name in blob.arrays:
            owner, _, leaf = name.rpartition(".")
            net.get_submodule(owner)._buffers[leaf] = blob.tensor(name).to(_device(device))


def _device(device: str) -> torch.device:
    # A GPU worker sees only its own GPU(s) (Ray sets CUDA_VISIBLE_DEVICES): index 0 is its own.
    return torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")


BACKENDS = {"none": ReplicaBackend, "zero3": Zero3Backend, "fsdp2": Fsdp2Backend}
