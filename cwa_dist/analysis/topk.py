"""Exact top-K over many shards: pure tensor math, no Ray, no distributed code.

Order is total and deterministic: score descending, then parameter name ascending, then flat
index ascending. Because every shard keeps its own top-K under that same order, the top-K of the
union of the shards' candidates is exactly the global top-K over all weights.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


class NonFiniteScoreError(ValueError):
    """A score is NaN or infinite, so no ranking of it would mean anything."""


@dataclass(slots=True)
class Candidates:
    """Weights proposed for the top-K of one metric, sorted best first.

    Entries point into `param_names` by position, so a million candidates do not carry a
    million strings; all tensors have shape (n,).
    """

    param_names: list[str]
    param: torch.Tensor  # int64, index into param_names
    flat_index: torch.Tensor  # int64, index into the parameter's flattened tensor
    score: torch.Tensor
    weight: torch.Tensor  # the weight's value when it was scored
    grad: torch.Tensor  # its gradient (NaN where the metric needed none and none existed)

    def __len__(self) -> int:
        return int(self.score.numel())

    @staticmethod
    def empty(dtype: torch.dtype = torch.float32) -> Candidates:
        z = torch.empty(0, dtype=dtype)
        i = torch.empty(0, dtype=torch.int64)
        return Candidates([], i, i.clone(), z, z.clone(), z.clone())

    def names(self) -> list[str]:
        """The parameter name of every entry, in order."""
        return [self.param_names[i] for i in self.param.tolist()]

    def head(self, n: int) -> Candidates:
        """The best n entries (the global top-n, when these are the global top-K and n ≤ K)."""
        return Candidates(
            self.param_names, self.param[:n], self.flat_index[:n], self.score[:n], self.weight[:n], self.grad[:n]
        )


BLOCK = 1024  # largest block of the block-maximum prefilter
MIN_BLOCK = 16  # below this, blocks filter too little to pay for themselves


def shard_topk(scores: torch.Tensor, k: int, floor: float = -math.inf) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of a 1-D score tensor as (indices, scores), best first, ties by lowest index,
    leaving out elements below `floor` (a running top-K's K-th score: nothing below it can enter).

    For large tensors, a prefilter keeps only the blocks whose maximum reaches both the floor and
    the k-th largest block maximum: any block holding an element ≥ the k-th largest score passes
    (otherwise k blocks would each hold a larger element), ties included, so the answer stays
    exact. Once the running top-K is full, most parameters have no block above the floor and cost
    one block-maximum pass.
    """
    scores = scores.reshape(-1)
    n = scores.numel()
    k = min(k, n)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64), scores[:0]
    # At least 8k blocks, so the blocks that pass hold a small share of the elements.
    block = min(BLOCK, n // (8 * k))
    if block < MIN_BLOCK:
        if floor > -math.inf:
            best = scores.amax()
            if not bool(torch.isfinite(best)):
                raise NonFiniteScoreError("scores contain NaN or Inf")
            if best < floor:
                return torch.empty(0, dtype=torch.int64), scores[:0]
        return _exact_topk(scores, k)
    full = n // block
    block_max = scores[: full * block].view(full, block).amax(1)
    if n > full * block:
        block_max = torch.cat([block_max, scores[full * block :].amax().reshape(1)])
    if not bool(torch.isfinite(block_max).all()):  # amax carries a NaN or Inf through
        raise NonFiniteScoreError("scores contain NaN or Inf")
    passing = block_max >= floor
    if int(passing.sum()) > k:
        threshold = max(float(torch.topk(block_max, k, sorted=False).values.min()), floor)
        passing = block_max >= threshold
    blocks = torch.nonzero(passing).squeeze(1)
    if blocks.numel() == 0:
        return torch.empty(0, dtype=torch.int64), scores[:0]
    index = (blocks[:, None] * block + torch.arange(block, device=scores.device)).reshape(-1)  # ascending
    index = index[index < n]
    local, top = _exact_topk(scores[index], k)
    return index[local], top


def _exact_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.topk alone picks arbitrarily among ties at the k-th value: take every element above
    # it, then the lowest-indexed elements equal to it.
    k = min(k, scores.numel())  # the blocks above a running floor may hold fewer than k
    values = torch.topk(scores, k, sorted=False).values
    if not bool(torch.isfinite(values).all()):  # topk ranks NaN and Inf first, so this sees them
        raise NonFiniteScoreError("scores contain NaN or Inf")
    kth = values.min()
    above = torch.nonzero(scores > kth).squeeze(1)
    tied = torch.nonzero(scores == kth).squeeze(1)[: k - above.numel()]
    index = torch.sort(torch.cat([above, tied])).values
    order = torch.argsort(scores[index], descending=True, stable=True)
    index = index[order]
    return index, scores[index]


def merge(parts: list[Candidates], k: int) -> Candidates:
    """The best k entries of the union of `parts` (which must not overlap), in the total order."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Candidates.empty()
    names = sorted({n for p in parts for n in p.param_names})
    position = {n: i for i, n in enumerate(names)}
    # Re-express each part's parameter ids in the merged, name-sorted table, so that comparing
    # ids compares names.
    param = torch.cat([torch.tensor([position[n] for n in p.param_names], dtype=torch.int64)[p.param] for p in parts])
    flat = torch.cat([p.flat_index for p in parts])
    dtype = functools.reduce(torch.promote_types, (p.score.dtype for p in parts), torch.float32)
    score = torch.cat([p.score.to(dtype) for p in parts])
    weight = torch.cat([p.weight.to(dtype) for p in parts])
    grad = torch.cat([p.grad.to(dtype) for p in parts])

    order = torch.argsort(flat, stable=True)
    order = order[torch.argsort(param[order], stable=True)]
    order = order[torch.argsort(score[order], descending=True, stable=True)][:k]
    kept = param[order]
    used = torch.unique(kept)  # sorted, so the compacted table stays name-sorted
    remap = torch.full((len(names),), -1, dtype=torch.int64)
    remap[used] = torch.arange(used.numel())
    return Candidates([names[i] for i in used.tolist()], remap[kept], flat[order], score[order], weight[order],
                      grad[order])


class RunningTopK:
    """Keeps the best k candidates of one metric while shards are added one at a time, so memory
    stays O(k) however many parameters are scored."""

    def __init__(self, k: int):
        self.k = k
        self.best = Candidates.empty()

    def add_shard(
        self, name: str, offset: int, scores: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor | None
    ) -> None:
        """Add a shard: `scores`, `weight`, `grad` are flat and start at element `offset` of `name`."""
        floor = float(self.best.score[-1]) if len(self.best) >= self.k else -math.inf
        try:
            index, top = shard_topk(scores, self.k, floor)
        except NonFiniteScoreError:
            raise NonFiniteScoreError(f"scores of {name} contain NaN or Inf") from None
        if index.numel() == 0:
            return
        # Gathered where the shard lives, then brought to the CPU: candidates are a few entries,
        # and every running top-K, merge and result stays on the CPU whatever device scored.
        g = grad.reshape(-1)[index].to(top.dtype) if grad is not None else torch.full_like(top, float("nan"))
        w = weight.reshape(-1)[index].to(top.dtype)
        index, top, w, g = (t.cpu() for t in (index, top, w, g))
        part = Candidates([name], torch.zeros_like(index), index + offset, top, w, g)
        self.best = merge([self.best, part], self.k)
