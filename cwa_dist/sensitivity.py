"""Gradients of the calibration loss and per-shard scoring: pure torch, no Ray.

The gradient stage (a Ray worker; later a ZeRO-3 rank) calls `accumulate_gradients`, then hands
its `ParamShard`s to `score_shards`, which keeps only each metric's top-K and its statistics.
Nothing here ever concatenates the scores of the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
import torch.utils.checkpoint

from cwa_dist.errors import UsageError
from cwa_dist.evaluate import batch_nll_sum, batches
from cwa_dist.feature_norms import FeatureNorms
from cwa_dist.metrics import Metric, get_metric, ranked_metrics
from cwa_dist.scratch import Scratch
from cwa_dist.statistics import ScoreStatistics
from cwa_dist.topk import Candidates, NonFiniteScoreError, RunningTopK, merge


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
    if param.ndim >= 2:
        return "matrix"
    return "bias" if name.endswith("bias") else "norm"


def select_parameters(model: torch.nn.Module, *, include_bias: bool, include_norm: bool) -> list[str]:
    """Names of the parameters to score. Tied parameters appear once (named_parameters dedups)."""
    wanted = {"matrix"} | ({"bias"} if include_bias else set()) | ({"norm"} if include_norm else set())
    return [n for n, p in model.named_parameters() if parameter_kind(n, p) in wanted]


def full_shards(model: torch.nn.Module, names: Iterable[str],
                sums: "GradientSums | None" = None) -> Iterator[ParamShard]:
    """Whole parameters as shards: the single-process case of the sharded interface. `sums`
    overrides `.grad` with its float32 sums (and gives the Fisher where it was kept)."""
    params = dict(model.named_parameters())
    for name in names:
        p = params[name]
        g = sums.sums.get(name) if sums is not None else p.grad
        grad = g.detach().reshape(-1) if g is not None else None
        fisher = sums.fisher(name, p) if sums is not None and sums.per_window else None
        yield ParamShard(name=name, offset=0, weight=p.detach().reshape(-1), grad=grad, fisher=fisher)


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

    def __init__(self, per_window: bool = False):
        self.per_window = per_window
        self.sums: dict[str, torch.Tensor] = {}
        self.squares: dict[str, torch.Tensor] = {}
        self.windows = 0

    def add(self, name: str, grad: torch.Tensor, scale: float | None = None) -> None:
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

    def end_window(self) -> None:
        self.windows += 1

    def fisher(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Σ_c g_c² / C over the windows seen, flat (zeros shaped as `like` for a parameter no
        window reached)."""
        squares = self.squares.get(name)
        if squares is None:
            return torch.zeros(like.numel(), dtype=torch.float32, device=like.device)
        return (squares / max(1, self.windows)).reshape(-1)


class GradientHooks:
    """Feeds each scored parameter's micro-batch gradient into `GradientSums` the moment autograd
    has accumulated it, and frees the `.grad` at once, so a low-precision model never sums in
    its own dtype and a per-window Fisher needs no second pass."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str], sums: GradientSums):
        params = dict(model.named_parameters())
        self.sums, self.scale = sums, None
        self._handles = [params[n].register_post_accumulate_grad_hook(self._adder(n)) for n in names]

    def _adder(self, name: str):
        def add(p: torch.Tensor) -> None:
            self.sums.add(name, p.grad, self.scale)
            p.grad = None

        return add

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


def score_shards(shards: Iterable[ParamShard], metric_names: Sequence[str], k: int,
                 feature_norms: FeatureNorms | None = None) -> ShardScores:
    """Score every shard with every metric (plus the magnitude control) and keep the top-k of each.
    `feature_norms` gives Wanda's input norms (needed only when `wanda` is asked for)."""
    metrics: list[Metric] = [get_metric(m) for m in ranked_metrics(metric_names)]
    tops = {m.name: RunningTopK(k) for m in metrics}
    # The magnitude control only needs its ranking; a metric asked for also gets statistics.
    stats = {m.name: ScoreStatistics() for m in metrics if m.name in metric_names}
    scratch = Scratch()  # one score buffer for every shard and metric, reused
    for shard in shards:
        # A parameter the loss never reached has no .grad: its gradient is zero.
        grad = shard.grad if shard.grad is not None else torch.zeros_like(shard.weight)
        norms = (feature_norms.expand(shard.name, shard.offset, shard.weight.numel()).to(shard.weight.device)
                 if feature_norms is not None else None)
        dtype = torch.float64 if shard.weight.dtype == torch.float64 else torch.float32
        for m in metrics:
            out = scratch.get(shard.weight.numel(), dtype, shard.weight.device)
            scores = m.score(grad, shard.weight, fisher=shard.fisher, feature_norm=norms, out=out)
            try:
                tops[m.name].add_shard(shard.name, shard.offset, scores, shard.weight, grad)
            except NonFiniteScoreError:
                # The top-K sees every score, so a NaN/Inf gradient is found here, without a pass
                # of its own; with finite weights (checked when they are loaded) it is an overflow.
                if m.needs_grad and bool(torch.isfinite(shard.weight).all()):
                    raise NonFiniteGradientError(f"NaN/Inf gradients in {shard.name}; {_DTYPE_ADVICE}") from None
                raise
            if m.name in stats:
                stats[m.name].add_batch(shard.name, scores, scratch)
    return ShardScores(
        candidates={name: t.best for name, t in tops.items()},
        statistics=stats,
    )


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
