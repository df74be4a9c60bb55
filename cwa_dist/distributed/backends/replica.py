"""`none`: one process holds the whole model (world size 1 only)."""

from __future__ import annotations

import torch

from cwa_dist.analysis.devices import compute_device
from cwa_dist.analysis.sensitivity import (
    GradientHooks,
    GradientSums,
    ParamShard,
    back_to_inference,
    checkpoint_blocks,
    full_shard,
    prepare_gradients,
)
from cwa_dist.distributed.backends.base import (
    Backend,
)
from cwa_dist.modeling.loading import ModelRef, load_replica
from cwa_dist.sharding import ZeroSettings


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
            return n, self.sums.numel()
        return n, sum(p.grad.numel() for p in self.model.parameters() if p.grad is not None)

    def evaluation_model(self) -> torch.nn.Module:
        """Hand the replica on, as a freshly loaded one, to be evaluated in this process (the worker
        serving as an evaluation actor); this backend computes no more gradients."""
        self.release_stage()
        model, self.model, self.params = back_to_inference(self.model), None, {}
        return model
