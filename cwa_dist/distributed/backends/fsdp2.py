"""`fsdp2`: PyTorch FSDP2 (`fully_shard` per block and on the root, built on the meta device).

Rank r owns rows [r·R, (r+1)·R) of every parameter's first dimension, R = ⌈rows / world⌉, which is
one contiguous flat range starting at r·R·(numel/rows).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cwa_dist.analysis.devices import compute_device
from cwa_dist.analysis.sensitivity import (
    GradientHooks,
    ParamShard,
    transformer_blocks,
)
from cwa_dist.distributed.backends.base import (
    Backend,
    make_shard,
    put_buffers,
    refuse_float16_gradients,
)
from cwa_dist.modeling.loading import ModelRef, checkpoint_keys, empty_model
from cwa_dist.sharding import ZeroSettings


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
            put_buffers(net, skeleton, ckpt, self.device)
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
                      if self.scorer is not None and not self.collects else None)

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
        return make_shard(name, start * (p.numel() // p.shape[0]), p.to_local().detach().reshape(-1), grad,
                      self.sums if self.collects else None, self.device)

    def local_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.model.named_parameters():
            yield name, p.to_local()
        yield from self.model.named_buffers()

    def local_numel(self) -> tuple[int, int]:
        params = list(self.model.parameters())
        return (sum(p.to_local().numel() for p in params),
                sum(p.grad.to_local().numel() for p in params if p.grad is not None))
