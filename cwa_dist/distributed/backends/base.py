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
    fold_scorers: list[ShardScorer] = []  # one per stability fold (see `analysis.stability`)
    fold_norms: list[FeatureNorms] = []
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
              k: int = 0, keep_gradients: bool = True, fold_scales: Sequence[float] = ()) -> None:
        """Fresh accumulators for what the metrics read: per-window sums for the Fisher, forward
        hooks for the input-feature norms; with `metrics`, a scorer fed during the final backward.
        `fold_scales` (N / N_f of each stability fold) adds each fold's own sums, norms and scorer;
        every step's gradient is then collected into the sums, whatever the metrics."""
        self.scored = scored
        self.params = dict(self.model.named_parameters())
        self.release_stage()  # a second stage on the same rank: the subclass adds fresh hooks
        per_window = FISHER in inputs
        self.sums = GradientSums(per_window, fold_scales) if per_window or fold_scales else None
        self.feature_norms = FeatureNorms(self.model, scored) if FEATURE_NORM in inputs else None
        self.fold_norms = [FeatureNorms(self.model, scored) for _ in fold_scales] if self.feature_norms else []
        self.scorer = ShardScorer(metrics, k, self.feature_norms) if metrics else None
        self.fold_scorers = self._fold_scorers(metrics, k) if metrics else []
        self.keep_gradients = keep_gradients
        self.freed: set[str] = set()
        self.final = False
        self._norms_reduced = False
        self.phase = "started"

    def release_stage(self) -> None:
        """Drop what a stage accumulated and hooked into the model: gradient hooks, input-norm
        hooks, sums and scorers."""
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None
        for norms in self.all_norms:
            norms.remove()
        self.feature_norms, self.fold_norms = None, []
        self.sums, self.scorer, self.fold_scorers = None, None, []
        self.phase = "loaded"

    def _fold_scorers(self, metrics: Sequence[str], k: int) -> list[ShardScorer]:
        norms = self.fold_norms or [None] * (len(self.sums.folds) if self.sums is not None else 0)
        return [ShardScorer(metrics, k, n, scratch=self.scorer.scratch) for n in norms]

    @property
    def all_norms(self) -> list[FeatureNorms]:
        """The whole set's input-feature norms and each fold's, where Wanda needs them."""
        return ([self.feature_norms] if self.feature_norms is not None else []) + self.fold_norms

    @property
    def per_window(self) -> bool:
        return self.sums is not None and self.sums.per_window

    @property
    def collects(self) -> bool:
        """True when every step's gradient is moved into `sums` (the Fisher's windows, or the
        stability folds), so a parameter can be scored only once the final step is collected."""
        return self.sums is not None and (self.sums.per_window or bool(self.sums.folds))

    @property
    def scoring_now(self) -> bool:
        """True inside the final step: a gradient that arrives is complete."""
        return self.final and self.scorer is not None

    def step_start(self, final: bool = False, fold: int | None = None) -> None:
        """`fold`: the stability fold every window of this step belongs to (None without folds)."""
        self._require("started", "a step")
        self.final = final
        if self.hooks is not None:
            self.hooks.final = final
        if self.sums is not None:
            self.sums.fold = fold
        for i, norms in enumerate(self.fold_norms):
            norms.counting = i == fold
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
        if self.collects:
            self._collect_window(window_scale)

    def _collect_window(self, scale: float | None) -> None:
        """Move this step's local gradients into `sums` and clear them (sharded backends)."""

    def reduce_feature_norms(self) -> None:
        """Every rank counted the input features of its own windows: sum them over the group, once."""
        if self.world_size > 1 and not self._norms_reduced:
            for norms in self.all_norms:
                vector = norms.as_vector()
                torch.distributed.all_reduce(vector)
                norms.load_vector(vector)
        self._norms_reduced = True

    def score_ready(self, name: str) -> None:
        """Score one parameter whose gradient is complete (and each fold's), then free that gradient."""
        shard = self.shard(name)
        self.scorer.add(shard)
        for fold, scorer in enumerate(self.fold_scorers):
            scorer.add(self.fold_shard(fold, shard))
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
            self.fold_scorers = self._fold_scorers(metrics, k)
        for name in self.scored:
            if name not in self.scorer.done:
                self.score_ready(name)
        self.phase = "scored"
        return self.scorer

    def shard(self, name: str) -> ParamShard:
        raise NotImplementedError

    def fold_shard(self, fold: int, whole: ParamShard) -> ParamShard:
        """`whole` (this rank's shard of one parameter) with the gradient and Fisher of one fold."""
        grad = self.sums.fold_gradient(fold, whole.name)
        fisher = self.sums.folds[fold].fisher(whole.name, whole.weight) if self.per_window else None
        return ParamShard(whole.name, whole.offset, whole.weight, *colocated(self.device, grad, fisher))

    def _free(self, name: str) -> None:
        # A ZeRO-3 parameter's .grad is already None (its gradient lives in DeepSpeed's partition
        # buffer), so only the replica's and FSDP2's shards lose memory here.
        self.params[name].grad = None
        if self.sums is not None:
            self.sums.release(name)

    def shards(self, scored: list[str], fold: int | None = None) -> Iterator[ParamShard]:
        """The shards this rank owns, gradients included (refused for gradients freed as scored);
        with `fold`, that stability fold's gradients."""
        freed = sorted(set(scored) & self.freed)
        if freed:
            raise RuntimeError(f"the gradients of {freed[0]} (and {len(freed) - 1} more) were freed as they were "
                               "scored; start with keep_gradients=True to read them afterwards")
        if fold is None:
            return (self.shard(name) for name in scored)
        return (self.fold_shard(fold, self.shard(name)) for name in scored)

    def nll_sum(self, ids, mask) -> float:
        with torch.no_grad():
            return float(batch_nll_sum(self.runner, ids, mask))

    def dummy(self, backward: bool) -> None:
        """A pass over a throwaway batch, so a rank without data still joins the collectives."""
        if self.world_size == 1:
            return
        ids, mask = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)
        with contextlib.ExitStack() as paused:
            for norms in self.all_norms:
                paused.enter_context(norms.paused())
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
    """A rank's shard, every tensor on `device`; where the steps are collected (`Backend.collects`)
    its gradient (and, per window, its Fisher) come from `sums`."""
    fisher = None
    if sums is not None:
        grad = sums.gradient(name)
        fisher = sums.fisher(name, weight) if sums.per_window else None
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
