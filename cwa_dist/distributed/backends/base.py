"""What every backend shares (Backend), and the checks and helpers the backends use."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from cwa_dist.analysis.devices import colocated
from cwa_dist.analysis.evaluate import batch_nll_sum
from cwa_dist.analysis.feature_norms import FeatureNorms
from cwa_dist.analysis.metrics import FEATURE_NORM, FISHER
from cwa_dist.analysis.sensitivity import (
    GradientHooks,
    GradientSums,
    ParamShard,
    ShardScorer,
    gradient_step,
)
from cwa_dist.modeling.checkpoint import Checkpoint
from cwa_dist.modeling.loading import buffer_keys


def refuse_float16_gradients(dtype: torch.dtype) -> None:
    """float16 gradients underflow without loss scaling (RunConfig refuses --dtype float16 with
    advice; this guards the backends themselves)."""
    if dtype == torch.float16:
        raise ValueError("float16 gradients underflow without loss scaling; compute them in bfloat16 or float32")


class Backend:
    """What every backend shares: the loss of a micro-batch, its backward, the per-window
    accumulation the Fisher needs, the input-feature norms Wanda needs, scoring each parameter as
    soon as its gradient is complete, and the dummy passes that keep ranks without data in step.
    Subclasses set `model` (and `runner`, the module that forward is called on, when it is a
    wrapper such as DeepSpeed's engine) and say how to read (`shard`) and free (`_free`) the part
    of one parameter this rank owns.

    A step is one call of `step_start`, `forward_backward` or `dummy`, then `step_end`. With a
    scorer (`start(..., metrics=...)`), the step marked final is the calibration pass's last: from
    then on a parameter whose gradient has arrived is scored and, unless `keep_gradients`, freed.

    The order is enforced, not assumed (`phase`): loaded → `start` → steps → `finish_scoring` →
    scored; a step or a second scoring without a fresh `start` is refused, since the accumulators
    it would use belong to a finished stage."""

    world_size = 1
    device = torch.device("cpu")  # where this rank computes, and scores
    sums: GradientSums | None = None
    feature_norms: FeatureNorms | None = None
    scorer: ShardScorer | None = None
    hooks: GradientHooks | None = None  # per-parameter gradient hooks, where the backend has them
    final = False
    phase = "loaded"  # loaded | started | scored

    def _require(self, phase: str, what: str) -> None:
        if self.phase != phase:
            raise RuntimeError(f"{type(self).__name__}: {what} needs phase {phase!r}, but the backend is "
                               f"{self.phase!r}; call start (through prepare) first")

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
        self.phase = "started"

    @property
    def per_window(self) -> bool:
        return self.sums is not None and self.sums.per_window

    @property
    def scoring_now(self) -> bool:
        """True inside the final step: a gradient that arrives is complete."""
        return self.final and self.scorer is not None

    def step_start(self, final: bool = False) -> None:
        self._require("started", "a step")
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
        self._require("started", "the end of a step")
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
        self._require("started", "scoring")
        self.reduce_feature_norms()
        if self.scorer is None:
            self.scorer = ShardScorer(metrics, k, self.feature_norms)
        for name in self.scored:
            if name not in self.scorer.done:
                self.score_ready(name)
        self.phase = "scored"
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


def make_shard(name: str, offset: int, weight: torch.Tensor, grad: torch.Tensor | None,
           sums: GradientSums | None, device: torch.device) -> ParamShard:
    """A rank's shard, every tensor on `device`; in per-window mode its gradient and Fisher come
    from `sums`."""
    fisher = None
    if sums is not None:
        grad, fisher = sums.sums.get(name), sums.fisher(name, weight)
    return ParamShard(name, offset, *colocated(device, weight, grad, fisher))


def check_parameter_dtype(net: torch.nn.Module, dtype: torch.dtype, dtype_of=lambda p: p.dtype) -> None:
    """Refuse a model whose floating parameters were not built in `dtype`: loading the checkpoint
    into them would round (or widen) every value without a word."""
    wrong = {n: dtype_of(p) for n, p in net.named_parameters()
             if dtype_of(p).is_floating_point and dtype_of(p) != dtype}
    if wrong:
        name, got = next(iter(wrong.items()))
        raise RuntimeError(f"{len(wrong)} parameter(s) were built in {got} instead of {dtype} (first: {name}); "
                           "loading the weights into them would change their values")


def put_buffers(net: torch.nn.Module, skeleton: torch.nn.Module, ckpt: Checkpoint, device: torch.device) -> None:
    """Give `net` the buffers of `skeleton` (an `empty_model`, whose buffers are real), or the
    checkpoint's where it stores them. Every buffer is replaced: one left alone could be
    uninitialised memory or in the wrong dtype."""
    source = dict(skeleton.named_buffers())
    stored = buffer_keys(skeleton, ckpt)
    for name, _ in list(net.named_buffers()):
        value = ckpt.read(stored[name], source[name].dtype) if name in stored else source[name]
        owner, _, leaf = name.rpartition(".")
        net.get_submodule(owner)._buffers[leaf] = value.to(device)
