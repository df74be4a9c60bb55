"""Negative log-likelihood and perplexity over token chunks: pure torch.

Perplexity = exp(token-weighted mean NLL over every predicted token of every chunk), so it does
not depend on how the chunks are batched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass(frozen=True, slots=True)
class Window:
    """A window of rolling-context scoring (--stride): every token is read, but only those after
    the first `context` are predicted; the earlier ones were predicted by the window before, and
    are here only to give the later ones context. A plain 1-D tensor is a window with no context."""

    ids: torch.Tensor
    context: int = 0


Chunk = torch.Tensor | Window

# Codes of the mask `batches` builds: the model attends to every non-zero position, and only
# PREDICT positions are targets of the loss.
PAD, PREDICT, CONTEXT = 0, 1, 2


def window_ids(chunk: Chunk) -> torch.Tensor:
    return chunk.ids if isinstance(chunk, Window) else chunk


def first_target(chunk: Chunk) -> int:
    """Position of the first predicted token (position 0 has nothing to be predicted from)."""
    return max(1, chunk.context) if isinstance(chunk, Window) else 1


def predicted_tokens(chunks: Sequence[Chunk]) -> int:
    """How many tokens the chunks predict: every token but each chunk's first (and its context)."""
    return sum(window_tokens(chunks))


def attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """The 0/1 attention mask of a `batches` mask (context tokens are attended to)."""
    return (mask != PAD).long()


def batches(chunks: Sequence[Chunk], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, mask) batches, each (B, T); mask codes PAD / PREDICT / CONTEXT."""
    for start in range(0, len(chunks), batch_size):
        group = chunks[start : start + batch_size]
        width = max(int(window_ids(c).numel()) for c in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.full((len(group), width), PAD, dtype=torch.long)
        for row, c in enumerate(group):
            tokens = window_ids(c)
            ids[row, : tokens.numel()] = tokens
            mask[row, : tokens.numel()] = PREDICT
            mask[row, : first_target(c)] = CONTEXT if first_target(c) > 1 else PREDICT
        yield ids, mask


# Model types whose causal-LM forward is exactly `lm_head(base_model(...).last_hidden_state)`: no
# logit scaling or soft-capping in between (each checked against the model's own forward in tests).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "gpt2", "gpt_neox", "opt"})
HEAD_CHUNK_TOKENS = 1024  # tokens (of all rows together) whose logits exist at once: 200 MB at a 49,152 vocabulary


def plain_head(model: torch.nn.Module):
    """(base model, LM head) when the model's logits are exactly its head applied to its base
    model's last hidden state, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or not hasattr(model, "base_model"):
        return None
    base, head = model.base_model, model.get_output_embeddings()
    if base is model or not isinstance(head, torch.nn.Linear):
        return None
    return base, head


def head_split(model: torch.nn.Module):
    """`plain_head` of a model whose NLL may be computed from the hidden states chunk by chunk:
    not a wrapper (DeepSpeed's engine, an FSDP2 root) whose own forward does the gathering."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or isinstance(model, FSDPModule):
        return None
    return plain_head(model)


def _chunk_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # F.linear, not a call of the module: the head's forward hooks (Wanda's input norms) would see
    # chunks; they count the head's input from the base model's output instead (feature_norms.py).
    # On a replica split over GPUs the head may sit on another GPU than the last block.
    # A bfloat16 replica's head runs in float32 (its weights widened exactly): logits rounded to
    # bfloat16 before the float32 loss would lose ~3 significant digits of every log-probability.
    device, dtype = head.weight.device, torch.promote_types(head.weight.dtype, torch.float32)
    bias = head.bias.to(dtype) if head.bias is not None else None
    logits = F.linear(hidden.to(device, dtype), head.weight.to(dtype), bias)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.to(device).reshape(-1), reduction="none")
    return nll.view(targets.shape).to(targets.device)


def batch_nll_rows(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token NLL summed over the unpadded positions of each row of one batch: (B,), differentiable.

    Where the model allows (`head_split`), the LM head and the loss run on HEAD_CHUNK_TOKENS
    tokens at a time, each chunk recomputed in backward, so the B×T×V logits, their log-softmax
    and their gradient never exist at once (the same values: only the order of the work changes)."""
    device = next(model.parameters()).device
    input_ids, mask = input_ids.to(device), attention_mask.to(device)
    attend, targets, keep = (mask != PAD).long(), input_ids[:, 1:], mask[:, 1:] == PREDICT
    split = head_split(model)
    if split is None:
        # The model's own forward makes the logits, in its dtype (some scale or soft-cap them there).
        # use_cache=False: a KV cache is never reused here and would only hold memory.
        logits = model(input_ids=input_ids, attention_mask=attend, use_cache=False).logits  # (B, T, V)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
        return nll.view(targets.shape).masked_fill(~keep, 0.0).sum(dim=1)
    base, head = split
    hidden = base(input_ids=input_ids, attention_mask=attend, use_cache=False)[0][:, :-1]  # (B, T-1, H)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    flat_keep = keep.reshape(-1)
    row = torch.arange(targets.shape[0], device=device).repeat_interleave(targets.shape[1])
    rows = torch.zeros(targets.shape[0], dtype=torch.float32, device=device)
    # One chunk (the usual batch) needs no recompute: its logits live as they would anyway.
    recompute = torch.is_grad_enabled() and flat_targets.numel() > HEAD_CHUNK_TOKENS
    for start in range(0, flat_targets.numel(), HEAD_CHUNK_TOKENS):
        part = slice(start, start + HEAD_CHUNK_TOKENS)
        if recompute:
            nll = torch.utils.checkpoint.checkpoint(_chunk_nll, head, flat_hidden[part], flat_targets[part],
                                                    use_reentrant=False)
        else:
            nll = _chunk_nll(head, flat_hidden[part], flat_targets[part])
        rows = rows.index_add(0, row[part], nll.masked_fill(~flat_keep[part], 0.0))
    return rows


def batch_nll_sum(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL over the unpadded positions of one batch (a scalar, differentiable)."""
    return batch_nll_rows(model, input_ids, attention_mask).sum()


@dataclass(frozen=True, slots=True)
class Perplexity:
    nll_sum: float
    tokens: int
    window_nll: tuple[float, ...] = ()  # per evaluation window, in order (for confidence intervals)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def value(self) -> float:
        return _exp(self.mean_nll)


def _exp(x: float) -> float:
    # A destroyed model can reach a mean NLL whose exp overflows; that is a result, not an error.
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@torch.inference_mode()
def perplexity(model: torch.nn.Module, chunks: Sequence[torch.Tensor], batch_size: int) -> Perplexity:
    rows: list[float] = []
    for ids, mask in batches(chunks, batch_size):
        rows.extend(batch_nll_rows(model, ids, mask).double().tolist())
    return Perplexity(nll_sum=float(sum(rows)), tokens=predicted_tokens(chunks), window_nll=tuple(rows))


def window_tokens(chunks: Sequence[Chunk]) -> list[int]:
    """Predicted tokens of each window."""
    return [int(window_ids(c).numel()) - first_target(c) for c in chunks]


def bootstrap_intervals(tokens: Sequence[int], baseline_nll: Sequence[float], perturbed_nll: Sequence[float], *,
                        samples: int, seed: int, level: float = 0.95) -> dict[str, float]:
    """Percentile bootstrap over evaluation windows: the same resampled windows for the baseline and
    the perturbed model (a paired bootstrap), giving intervals for the perturbed perplexity and for
    perplexity ratio perturbed / baseline. Windows, not tokens, are resampled: tokens of one window
    are not independent."""
    t = torch.tensor(tokens, dtype=torch.float64)
    base = torch.tensor(baseline_nll, dtype=torch.float64)
    pert = torch.tensor(perturbed_nll, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(t), (samples, len(t)), generator=gen)
    n_tok = t[idx].sum(1)
    log_pert = pert[idx].sum(1) / n_tok
    log_ratio = log_pert - base[idx].sum(1) / n_tok
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    (lp, hp), (lr, hr) = torch.quantile(log_pert, q).tolist(), torch.quantile(log_ratio, q).tolist()
    return {"ppl_ci_low": _exp(lp), "ppl_ci_high": _exp(hp),
            "ppl_ratio_ci_low": _exp(lr), "ppl_ratio_ci_high": _exp(hr)}
