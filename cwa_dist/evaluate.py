"""Negative log-likelihood and perplexity over token chunks: pure torch.

Perplexity = exp(token-weighted mean NLL over every predicted token of every chunk), so it does
not depend on how the chunks are batched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F


def predicted_tokens(chunks: Sequence[torch.Tensor]) -> int:
    """How many tokens the chunks predict: every token but each chunk's first."""
    return sum(int(c.numel()) - 1 for c in chunks)


def batches(chunks: Sequence[torch.Tensor], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask) batches, each (B, T)."""
    for start in range(0, len(chunks), batch_size):
        group = chunks[start : start + batch_size]
        width = max(int(c.numel()) for c in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, c in enumerate(group):
            ids[row, : c.numel()] = c
            mask[row, : c.numel()] = 1
        yield ids, mask


def batch_nll_sum(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL over the unpadded positions of one batch (a scalar, differentiable)."""
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # use_cache=False: a KV cache is never reused here and would only hold memory.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    targets = input_ids[:, 1:]
    keep = attention_mask[:, 1:].bool()
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none"
    )  # (B*(T-1),)
    return nll.masked_fill(~keep.flatten(), 0.0).sum()


@dataclass(frozen=True, slots=True)
class Perplexity:
    nll_sum: float
    tokens: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def value(self) -> float:
        # A destroyed model can reach a mean NLL whose exp overflows; that is a result, not an error.
        try:
            return math.exp(self.mean_nll)
        except OverflowError:
            return math.inf


@torch.inference_mode()
def perplexity(model: torch.nn.Module, chunks: Sequence[torch.Tensor], batch_size: int) -> Perplexity:
    total = 0.0
    for ids, mask in batches(chunks, batch_size):
        total += float(batch_nll_sum(model, ids, mask))
    return Perplexity(nll_sum=total, tokens=predicted_tokens(chunks))
