"""Gradients of the calibration loss and per-shard scoring: pure torch, no Ray.

A gradient rank (one process, or a ZeRO-3/FSDP2 rank) hands each `ParamShard` it owns to a
`ShardScorer` as soon as the shard's gradient is complete, from `GradientHooks` inside the final
backward; the scorer keeps only each metric's running top-K and its statistics. `score_shards` is
the same over shards already computed. Nothing here ever concatenates the scores of the whole model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint

from cwa_dist.analysis.evaluate import batch_nll_sum, batches
from cwa_dist.analysis.feature_norms import FeatureNorms
from cwa_dist.analysis.metrics import Metric, get_metric, ranked_metrics
from cwa_dist.analysis.scratch import Scratch
from cwa_dist.analysis.statistics import ScoreStatistics
from cwa_dist.analysis.topk import Candidates, NonFiniteScoreError, RunningTopK, merge
from cwa_dist.errors import UsageError


class NonFiniteGradientError(UsageError):
    """The loss or a gradient is NaN/Inf although every weight is finite: the model overflows in
    its dtype, and the ranking would be garbage."""


@dataclass(frozen=True, slots=True)
class ParamShard:
    """The part of one parameter this process owns, flattened.

    `offset` is where the shard starts in the parameter's flattened tensor (0 for a whole tensor).
    """

    name: str
    offset: int
    weight: torch.Tensor  # (n,)
    grad: torch.Tensor | None  # (n,)
    fisher: torch.Tensor | None = None  # (n,): Σ_c g_c² / C, when a metric needs it


def parameter_kind(name: str, param: torch.Tensor) -> str:
    """'matrix' for weight matrices (embeddings and LM head included), else 'bias' or 'norm'."""
    if name.endswith("bias"):  # also a mixture-of-experts layer's fused biases, (experts, out)
        return "bias"
    return "matrix" if param.ndim >= 2 else "norm"


def select_parameters(model: torch.nn.Module, *, include_bias: bool, include_norm: bool) -> list[str]:
    """Names of the parameters to score. Tied parameters appear once (named_parameters dedups)."""
    wanted = {"matrix"} | ({"bias"} if include_bias else set()) | ({"norm"} if include_norm else set())
    return [n for n, p in model.named_parameters() if parameter_kind(n, p) in wanted]


def full_shard(name: str, p: torch.Tensor, sums: GradientSums | None = None) -> ParamShard:
    """A whole parameter as a shard: the single-process case of the sharded interface. `sums`
    overrides `.grad` with its float32 sums (and gives the Fisher where it was kept)."""
    g = sums.gradient(name) if sums is not None else p.grad
    grad = g.detach().reshape(-1) if g is not None else None
    fisher = sums.fisher(name, p) if sums is not None and sums.per_window else None
    return ParamShard(name=name, offset=0, weight=p.detach().reshape(-1), grad=grad, fisher=fisher)


def full_shards(model: torch.nn.Module, names: Iterable[str],
                sums: GradientSums | None = None) -> Iterator[ParamShard]:
    """`full_shard` of each named parameter."""
    params = dict(model.named_parameters())
    for name in names:
        yield full_shard(name, params[name], sums)


def prepare_gradients(model: torch.nn.Module, scored: Sequence[str]) -> None:
    """Give only the `scored` parameters gradients, all starting empty; no dropout, so the
    gradient is a deterministic function of the weights."""
    wanted = set(scored)
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        p.grad = None
    model.eval()


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks: the ModuleList holding the most parameters (model.layers,
    transformer.h, gpt_neox.layers, ...); empty if the model has none."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters())) if lists else torch.nn.ModuleList()


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Recompute each transformer block's activations during backward instead of storing them.

    The blocks are the ModuleList holding the most parameters (model.layers, transformer.h, ...).
    transformers' own switch works only in training mode, which would turn dropout on; this
    wrapper works in eval mode. Returns how many blocks were wrapped.
    """
    blocks = transformer_blocks(model)
    for block in blocks:
        if getattr(block, "_cwa_checkpointed", False):
            continue
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
        block._cwa_checkpointed = True
    return len(blocks)


def back_to_inference(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `prepare_gradients` and `checkpoint_blocks`: no gradients, every parameter as a freshly
    loaded replica has it, each block's own forward, eval mode. The weights are untouched (a
    gradient stage never steps them), so the model then evaluates as a fresh replica would."""
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(True)
    for block in transformer_blocks(model):
        if getattr(block, "_cwa_checkpointed", False):
            del block.forward  # the wrapper was set on the instance; the class's forward shows again
            del block._cwa_checkpointed
    return model.eval()


def gradient_step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, *, total_tokens: int,
                  world_size: int = 1, backward=torch.Tensor.backward) -> float:
    """One micro-batch: add the gradient of (its summed NLL) / `total_tokens` to the gradients.

    Dividing every micro-batch by the same `total_tokens` (all calibration tokens, on every rank)
    makes the accumulated gradient that of the token-weighted mean NLL, whatever the batch size,
    the chunk order, or the split of chunks across calls and ranks. Sharded backends average
    gradients over ranks, so the loss handed to `backward` is also multiplied by `world_size`.
    Returns this micro-batch's share of the mean NLL.
    """
    loss = batch_nll_sum(model, ids, mask) / total_tokens
    check_loss_finite(loss)
    backward(loss * world_size)
    return float(loss.detach())


def accumulate_gradients(
    model: torch.nn.Module, chunks: Sequence[torch.Tensor], *, batch_size: int, total_tokens: int
) -> float:
    """`gradient_step` over `chunks` in batches of `batch_size`; returns their share of the mean NLL."""
    return sum(
        gradient_step(model, ids, mask, total_tokens=total_tokens) for ids, mask in batches(chunks, batch_size)
    )


class GradientSums:
    """Gradients summed in float32 over micro-batches, and, `per_window`, the squares the Fisher needs.

    `add` takes one micro-batch's gradient of one parameter (or of the part a rank owns). Summing
    many micro-batch gradients in bfloat16 would round the running sum at every step (8 bits of
    mantissa); here the sum is float32 whatever the model's dtype. With `per_window`, each
    micro-batch is one calibration window c, whose gradient arrives as (n_c / N)·g_c (its share of
    the token-weighted mean NLL over N tokens); `scale` = N / n_c turns it back into g_c, the
    gradient of that window's own mean NLL, and g_c² is added to the squares.
    """

    def __init__(self, per_window: bool = False, fold_scales: Sequence[float] = ()):
        self.per_window = per_window
        self.sums: dict[str, torch.Tensor] = {}
        self.squares: dict[str, torch.Tensor] = {}
        self.windows = 0
        # Stability folds (analysis/stability.py): a step's gradient goes to its fold's sums only,
        # and the whole set's is their sum, formed when asked for, so it needs no accumulator.
        self.folds = [GradientSums(per_window) for _ in fold_scales]
        self.fold_scales = list(fold_scales)
        self.fold: int | None = None  # the fold of the step being accumulated

    def add(self, name: str, grad: torch.Tensor, scale: float | None = None) -> None:
        if self.fold is not None:
            self.folds[self.fold].add(name, grad, scale)
            return
        g = grad.detach().to(torch.float32, copy=True)  # a copy: the caller frees or reuses `grad`
        if self.per_window:
            if scale is None:
                raise ValueError("a per-window accumulation needs each window's scale")
            square = torch.square(g).mul_(scale * scale)
            total = self.squares.get(name)
            self.squares[name] = square if total is None else total.add_(square)
        total = self.sums.get(name)
        if total is None:
            self.sums[name] = g
        else:
            total.add_(g)

    def start_window(self) -> None:
        """Count a window before its gradient arrives, so a parameter can be scored the moment its
        last window's gradient is added (inside that window's backward)."""
        self.windows += 1
        if self.fold is not None:
            self.folds[self.fold].start_window()

    def release(self, name: str) -> None:
        """Free one parameter's sums once it has been scored."""
        self.sums.pop(name, None)
        self.squares.pop(name, None)
        for fold in self.folds:
            fold.release(name)

    def _total(self, name: str, of: str) -> torch.Tensor | None:
        """`of` ("sums" or "squares") of one parameter, added over this accumulator and its folds'
        (one copy at most: a fold's own tensor is never changed)."""
        parts = [getattr(s, of)[name] for s in (self, *self.folds) if name in getattr(s, of)]
        if len(parts) <= 1:
            return parts[0] if parts else None
        total = parts[0].clone()
        for part in parts[1:]:
            total.add_(part)
        return total

    def gradient(self, name: str) -> torch.Tensor | None:
        """The summed gradient of the whole calibration set (None if no step reached the parameter)."""
        return self._total(name, "sums")

    def numel(self) -> int:
        """Gradient elements held, the folds' included (the Fisher's squares not counted)."""
        return sum(t.numel() for s in (self, *self.folds) for t in s.sums.values())

    def fold_gradient(self, fold: int, name: str) -> torch.Tensor | None:
        """The gradient of the fold's own token-weighted mean NLL, flat: its steps' sum (each a share
        of the whole set's mean) times N / N_f."""
        total = self.folds[fold].sums.get(name)
        return None if total is None else (total * self.fold_scales[fold]).reshape(-1)

    def fisher(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Σ_c g_c² / C over the windows started, flat (zeros shaped as `like` for a parameter no
        window reached)."""
        squares = self._total(name, "squares")
        if squares is None:
            return torch.zeros(like.numel(), dtype=torch.float32, device=like.device)
        return (squares / max(1, self.windows)).reshape(-1)


class GradientHooks:
    """Runs the moment autograd (or FSDP2, for its sharded parameters) has accumulated a scored
    parameter's micro-batch gradient. With `sums`, the gradient moves into them and `.grad` is
    freed at once, so a low-precision model never sums in its own dtype and a per-window Fisher
    needs no second pass. On the calibration pass's final step (`final`), `ready(name)` is called
    next: the parameter's gradient is complete, so it can be scored and freed while backward goes
    on through the blocks below it."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str], sums: GradientSums | None = None,
                 ready: Callable[[str], None] | None = None):
        params = dict(model.named_parameters())
        self.sums, self.ready, self.scale, self.final = sums, ready, None, False
        self._handles = [params[n].register_post_accumulate_grad_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def run(p: torch.Tensor) -> None:
            if self.sums is not None:
                self.sums.add(name, p.grad, self.scale)
                p.grad = None
            if self.final and self.ready is not None:
                self.ready(name)

        return run

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


_DTYPE_ADVICE = ("every weight is finite, so the model overflows in this dtype: run it in float32 (--dtype float32), "
                 "or with shorter or fewer --seq-len tokens")


def non_finite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating tensors that hold a NaN or an Inf."""
    return [n for n, t in named if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]


def corrupt_weights_message(bad: Sequence[str]) -> str:
    shown = ", ".join(sorted(bad)[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return (f"the checkpoint holds NaN or Inf values in {shown}: the file is corrupt or was saved from a diverged "
            "model (not an overflow: these are the stored values); no weight can be ranked against them")


def check_loss_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteGradientError(f"the calibration loss is {float(loss.detach())}; {_DTYPE_ADVICE}")


@dataclass
class ShardScores:
    """What one process returns: each metric's local top-K candidates and score statistics."""

    candidates: dict[str, Candidates] = field(default_factory=dict)
    statistics: dict[str, ScoreStatistics] = field(default_factory=dict)


class ShardScorer:
    """Scores shards one at a time with every metric (plus the magnitude control), keeping only
    each metric's running top-k and its statistics, so it can be fed from inside backward, a
    parameter the moment its gradient is complete. `feature_norms` gives Wanda's input norms
    (needed only when `wanda` is asked for); they must be final before the first `add`."""

    def __init__(self, metric_names: Sequence[str], k: int, feature_norms: FeatureNorms | None = None,
                 scratch: Scratch | None = None):
        self.metrics: list[Metric] = [get_metric(m) for m in ranked_metrics(metric_names)]
        self.tops = {m.name: RunningTopK(k) for m in self.metrics}
        # The magnitude control only needs its ranking; a metric asked for also gets statistics.
        self.stats = {m.name: ScoreStatistics() for m in self.metrics if m.name in metric_names}
        self.feature_norms = feature_norms
        # One score buffer for every shard and metric, reused; scorers that run one after the other
        # (the stability folds') share it.
        self.scratch = scratch or Scratch()
        self.done: set[str] = set()  # parameters scored
        self.seconds = 0.0  # spent scoring, wherever it was called from

    def add(self, shard: ParamShard) -> None:
        start = time.perf_counter()
        # A parameter the loss never reached has no .grad: its gradient is zero.
        grad = shard.grad if shard.grad is not None else torch.zeros_like(shard.weight)
        norms = (self.feature_norms.expand(shard.name, shard.offset, shard.weight.numel()).to(shard.weight.device)
                 if self.feature_norms is not None else None)
        dtype = torch.float64 if shard.weight.dtype == torch.float64 else torch.float32
        for m in self.metrics:
            out = self.scratch.get(shard.weight.numel(), dtype, shard.weight.device)
            scores = m.score(grad, shard.weight, fisher=shard.fisher, feature_norm=norms, out=out)
            try:
                self.tops[m.name].add_shard(shard.name, shard.offset, scores, shard.weight, grad)
            except NonFiniteScoreError:
                # The top-K sees every score, so a NaN/Inf gradient is found here, without a pass
                # of its own; with finite weights (checked when they are loaded) it is an overflow.
                if m.needs_grad and bool(torch.isfinite(shard.weight).all()):
                    raise NonFiniteGradientError(f"NaN/Inf gradients in {shard.name}; {_DTYPE_ADVICE}") from None
                raise
            if m.name in self.stats:
                self.stats[m.name].add_batch(shard.name, scores, self.scratch)
        self.done.add(shard.name)
        self.seconds += time.perf_counter() - start

    def result(self) -> ShardScores:
        return ShardScores(candidates={name: t.best for name, t in self.tops.items()}, statistics=self.stats)


def score_shards(shards: Iterable[ParamShard], metric_names: Sequence[str], k: int,
                 feature_norms: FeatureNorms | None = None) -> ShardScores:
    """Score every shard with every metric (plus the magnitude control) and keep the top-k of each."""
    scorer = ShardScorer(metric_names, k, feature_norms)
    for shard in shards:
        scorer.add(shard)
    return scorer.result()


def merge_scores(parts: Sequence[ShardScores], k: int) -> ShardScores:
    """The exact global top-k and merged statistics of disjoint shards' results."""
    merged = ShardScores()
    for m in parts[0].candidates:
        merged.candidates[m] = merge([p.candidates[m] for p in parts], k)
    for m in parts[0].statistics:
        stats = ScoreStatistics()
        for p in parts:
            stats.merge(p.statistics[m])
        merged.statistics[m] = stats
    return merged


def unravel(flat_index: int, shape: Sequence[int]) -> tuple[int, ...]:
    """Flat index → index tuple in a tensor of `shape` (row-major)."""
    out = []
    for size in reversed(shape):
        out.append(flat_index % size)
        flat_index //= size
    return tuple(reversed(out))


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def values_at(shards: Iterable[ParamShard], wanted: dict[str, torch.Tensor],
              feature_norms: FeatureNorms | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
    """For each wanted parameter: (flat indices, gradients, weights, Fisher, input-feature norms) of
    the wanted elements found in `shards` (the ones this process owns), in float64, which holds
    float32 and bfloat16 exactly. Fisher and norms are NaN where they were not computed."""
    found: dict[str, list] = {}
    for shard in shards:
        idx = wanted.get(shard.name)
        if idx is None or shard.grad is None:
            continue
        local = idx - shard.offset
        keep = (local >= 0) & (local < shard.weight.numel())
        if keep.any():
            at = local[keep].to(shard.weight.device)
            nan = torch.full((int(keep.sum()),), math.nan, dtype=torch.float64)
            fisher = shard.fisher[at].double().cpu() if shard.fisher is not None else nan
            norms = feature_norms.at(shard.name, idx[keep]).double().cpu() if feature_norms is not None else nan
            found.setdefault(shard.name, []).append(
                (idx[keep], shard.grad[at].double().cpu(), shard.weight[at].double().cpu(), fisher, norms))
    return {name: tuple(torch.cat(part) for part in zip(*parts)) for name, parts in found.items()}
