"""Evaluate a perturbed model from the first block it changes: pure torch, no Ray.

A perturbation experiment changes a few weights; every transformer block before the first one it
touches computes exactly what it computed for the baseline. So the baseline pass keeps the
outputs of chosen blocks for every evaluation batch, and an experiment's pass replays them: the
blocks up to the last kept one before the first changed block return the kept output (a copy)
instead of computing, and the rest of the model (later blocks, final norm, LM head, loss) runs as
usual. Same batches, same kernels, same inputs to every block that computes: the perplexity is
the full forward's, bit for bit.

An experiment that touches a parameter used before the blocks (the token embedding, which a tied
LM head shares; learned positions) runs the full forward; one that touches only what runs after
them (the final norm, an untied LM head) replays every block. How many block outputs are kept is
set by a memory budget; with none kept every experiment runs the full forward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import torch

from cwa_dist.analysis.evaluate import batches
from cwa_dist.analysis.sensitivity import transformer_blocks

BEFORE = -1  # first "block" of a parameter used before the blocks run: nothing can be replayed


def _copy(out):
    """A copy of a block's output (tensor, or tuple of tensors / None): the next block must never
    be able to change what is kept."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_copy(o) for o in out)
    return out


def _bytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, tuple):
        return sum(_bytes(o) for o in out)
    return 0


def kept_blocks(n_blocks: int, per_block_bytes: int, budget_bytes: int) -> list[int]:
    """Which block outputs to keep within the budget: evenly spaced, always the last block's (an
    LM-head-only experiment then replays every block)."""
    if n_blocks == 0 or per_block_bytes <= 0:
        return []
    n = min(n_blocks, budget_bytes // per_block_bytes)
    if n <= 0:
        return []
    step = n_blocks / n
    return sorted({n_blocks - 1 - math.floor(i * step) for i in range(n)})


class BlockReplay:
    """Installed on a model once; `capture` runs the baseline pass, `from_block` the experiments."""

    def __init__(self, model: torch.nn.Module, budget_bytes: int):
        self.model, self.budget = model, budget_bytes
        self.blocks = transformer_blocks(model)
        names = {id(p): n for n, p in model.named_parameters()}
        self.block_of: dict[str, int] = {}  # parameter name → its block
        for i, block in enumerate(self.blocks):
            for p in block.parameters():
                self.block_of.setdefault(names[id(p)], i)
        self.kept: list[int] = []
        self.cache: dict[int, list] = {}
        self._replay: int | None = None  # the kept block whose output is replayed, if any
        self._batch = -1
        self._capturing = False
        self._after_blocks = False  # within a batch: the last block has run
        self._used_after: set[str] = set()  # parameters whose modules ran only after the blocks
        for i, block in enumerate(self.blocks):
            block.forward = self._wrap(i, block.forward)
        # The base model runs once per batch whether the loss takes the logits from the whole
        # model or computes them chunk by chunk from the hidden states (evaluate.head_split).
        getattr(model, "base_model", model).register_forward_pre_hook(self._new_batch)

    def _new_batch(self, module, args) -> None:
        self._batch += 1
        self._after_blocks = False

    def _wrap(self, i: int, forward):
        def replayable(*args, **kwargs):
            if self._replay is not None and i <= self._replay:
                return _copy(self.cache[self._replay][self._batch])
            out = forward(*args, **kwargs)
            if self._capturing and i in self.cache:
                self.cache[i].append(_copy(out))
            if i == len(self.blocks) - 1:
                self._after_blocks = True
            return out

        return replayable

    def capture(self, run_pass, chunks: Sequence, batch_size: int):
        """Run `run_pass()` (the baseline perplexity over `chunks` in batches of `batch_size`),
        keeping the outputs of as many blocks as the budget holds; returns what it returns."""
        per_block = self._per_block_bytes(chunks, batch_size)
        self.kept = kept_blocks(len(self.blocks), per_block, self.budget)
        self.cache = {i: [] for i in self.kept}
        params = dict(self.model.named_parameters())
        owners = self._outside_owners(params)
        seen_before: set[str] = set()

        def note(module, args):
            for name in owners.get(id(module), []):
                (self._used_after if self._after_blocks else seen_before).add(name)

        hooks = [m.register_forward_pre_hook(note) for m in self.model.modules() if id(m) in owners]
        self._capturing, self._batch = True, -1
        try:
            return run_pass()
        finally:
            self._capturing = False
            for h in hooks:
                h.remove()
            self._used_after -= seen_before  # a tied matrix used before the blocks too: before

    def _outside_owners(self, params: dict) -> dict[int, list[str]]:
        """module id → names of the parameters outside the blocks that the module holds directly."""
        by_param = {id(p): n for n, p in params.items() if n not in self.block_of}
        owners: dict[int, list[str]] = {}
        for module in self.model.modules():
            for p in module.parameters(recurse=False):
                if id(p) in by_param:
                    owners.setdefault(id(module), []).append(by_param[id(p)])
        return owners

    def _per_block_bytes(self, chunks: Sequence, batch_size: int) -> int:
        """Bytes one block's outputs take over every batch: padded tokens × hidden size × dtype."""
        if not self.blocks:
            return 0
        p = next(self.model.parameters())
        hidden = int(getattr(self.model.config, "hidden_size", 0) or getattr(self.model.config, "n_embd", 0))
        if not hidden:
            return 0
        tokens = sum(ids.numel() for ids, _ in batches(list(chunks), batch_size))
        return tokens * hidden * p.element_size()

    def first_block(self, names: Iterable[str]) -> int:
        """The first block whose computation the parameters `names` change: BEFORE for anything
        used before the blocks, len(blocks) for what runs only after them."""
        first = len(self.blocks)
        for name in names:
            if name in self.block_of:
                first = min(first, self.block_of[name])
            elif name not in self._used_after:
                return BEFORE
        return first

    @contextlib.contextmanager
    def from_block(self, first: int):
        """Within this block, forward passes replay the last kept block before `first`."""
        earlier = [i for i in self.kept if i < first]
        self._replay, self._batch = (earlier[-1] if earlier else None), -1
        try:
            yield self._replay
        finally:
            self._replay = None

    @property
    def kept_bytes(self) -> int:
        return sum(_bytes(o) for outs in self.cache.values() for o in outs)

