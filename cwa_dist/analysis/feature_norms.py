"""Wanda's activation statistic: for each input feature j of every scored weight matrix, the norm
‖x_j‖₂ over the calibration tokens. Pure torch: forward hooks, no Ray, no distributed code (the
gradient workers sum `as_vector()` over ranks and hand it back with `load_vector`).

Which input a parameter sees:
- a Linear weight (out, in) multiplies the hidden features: feature j of element (i, j);
- a GPT-2 Conv1D weight (in, out): feature i of element (i, j);
- a mixture-of-experts router's weight (experts, hidden) multiplies the hidden features, as a Linear;
- a fused experts tensor (experts, out, in) (analysis.experts) has features per expert: those of
  the tokens routed to that expert, the up projection's hidden states and the down-projection's
  own input, feature (e, j) of element (e, i, j) ((e, j, i) where the experts are stored transposed);
- the input embedding (vocab, hidden) is a linear map of the one-hot token: ‖x_v‖₂ = √(count of
  token v), feature v of element (v, h). A matrix tied to an LM head takes the head's (Linear) inputs;
- anything else (biases, norm scales, learned position tables) is treated as seeing the constant
  input 1 at every token, ‖x‖₂ = √tokens: exact for a bias, an approximation for the others.
Padding is not counted, and a block recomputed by gradient checkpointing is counted once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

from cwa_dist.analysis.evaluate import plain_head
from cwa_dist.analysis.experts import experts_modules, routed, routing_args, up_name


@dataclass(frozen=True, slots=True)
class FeatureAxis:
    """Where an element's input feature is in its flattened parameter: flat % cols when the
    features are the columns, flat // cols when they are the rows. A fused experts tensor is
    `slab` elements an expert, each expert with its own `features // experts` features."""

    features: int
    cols: int
    along_rows: bool
    slab: int = 0  # elements of one expert's matrix; 0: not a fused experts tensor

    @property
    def per_slab(self) -> int:
        """Features of one expert (of the whole parameter, when not fused)."""
        if not self.slab:
            return self.features
        return self.slab // self.cols if self.along_rows else self.cols

    def feature_of(self, flat: torch.Tensor) -> torch.Tensor:
        if not self.slab:
            return flat // self.cols if self.along_rows else flat % self.cols
        local = flat % self.slab
        within = local // self.cols if self.along_rows else local % self.cols
        return (flat // self.slab) * self.per_slab + within


def _expanded(norms: torch.Tensor, axis: FeatureAxis, offset: int, n: int) -> torch.Tensor:
    """The norms of elements [offset, offset + n) of one matrix whose features are `norms`."""
    if n <= 0:
        return norms[:0]
    if axis.along_rows:  # each feature's norm repeated over its row
        first, last = offset // axis.cols, (offset + n - 1) // axis.cols
        block = norms[first : last + 1].repeat_interleave(axis.cols)
        start = offset - first * axis.cols
        return block[start : start + n]
    start = offset % axis.cols  # the column norms, repeated row after row
    reps = -(-(start + n) // axis.cols)
    return norms.repeat(reps)[start : start + n]


def _is_router(module: torch.nn.Module, weight) -> bool:
    """A mixture-of-experts router (transformers' *Router classes): a linear map of the hidden
    states to one logit per expert."""
    return type(module).__name__.lower().endswith("router") and len(_shape(weight)) == 2


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape aside


class FeatureNorms:
    """Forward hooks that sum x_j² per input feature over the calibration tokens."""

    def __init__(self, model: torch.nn.Module, scored: Sequence[str]):
        by_id = {id(p): n for n, p in model.named_parameters() if n in set(scored)}
        self.axes: dict[str, FeatureAxis] = {}
        self._modules: dict[str, torch.nn.Module] = {}
        for module in model.modules():
            weight = getattr(module, "weight", None)
            name = by_id.get(id(weight)) if weight is not None else None
            if name is None or name in self.axes or not (isinstance(module, (torch.nn.Linear, Conv1D))
                                                         or _is_router(module, weight)):
                continue
            rows, cols = _shape(weight)
            along_rows = isinstance(module, Conv1D)  # Conv1D stores (in, out)
            self.axes[name], self._modules[name] = FeatureAxis(rows if along_rows else cols, cols, along_rows), module
        self._experts: dict[str, tuple[str | None, str | None]] = {}  # module → (up, down) names counted
        for module_name, module in experts_modules(model):
            params = [getattr(module, attr) for attr in (up_name(module), "down_proj")]
            names = tuple(by_id.get(id(p)) for p in params)
            for name, param in zip(names, params):
                if name is not None:
                    e, rows, cols = _shape(param)
                    along_rows = bool(getattr(module, "is_transposed", False))  # stored (experts, in, out)
                    self.axes[name] = FeatureAxis(e * (rows if along_rows else cols), cols, along_rows, rows * cols)
            if any(names):
                self._experts[module_name] = names
        # The input embedding's inputs are the token ids the root forward is given (counted there);
        # a matrix tied to the LM head was claimed above, as the head it also is.
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self._embedding = by_id.get(id(embed.weight)) if embed is not None else None
        if self._embedding in self.axes:
            self._embedding = None
        if self._embedding is not None:
            rows, cols = _shape(embed.weight)
            self.axes[self._embedding] = FeatureAxis(rows, cols, along_rows=True)
        self._device = next(model.parameters()).device
        self.squares = {n: torch.zeros(a.features, dtype=torch.float64, device=self._device)
                        for n, a in self.axes.items()}
        self.tokens = 0.0
        self._mask: torch.Tensor | None = None
        self._counted: set[str] = set()
        self._paused = False
        self.counting = True  # False while the windows passing are not this count's (another fold's)
        # The base model runs once per batch, also when the loss is computed from its hidden states.
        root = getattr(model, "base_model", model)
        self._handles = [root.register_forward_pre_hook(self._new_batch, with_kwargs=True)]
        # A plain LM head's input is the base model's last hidden state, whole, even where the loss
        # applies the head to chunks of it (evaluate.batch_nll_rows): counted there.
        split = plain_head(model)
        head_name = by_id.get(id(split[1].weight)) if split is not None else None
        if head_name is not None and self._modules.get(head_name) is split[1]:
            del self._modules[head_name]
            self._handles.append(split[0].register_forward_hook(self._hook(head_name, output=True)))
        self._handles += [m.register_forward_hook(self._hook(n)) for n, m in self._modules.items()]
        # A pre-hook: it runs after ZeRO-3 has gathered the experts' weights, which it needs.
        modules = dict(model.named_modules())
        self._handles += [modules[n].register_forward_pre_hook(self._experts_hook(n, *names), with_kwargs=True)
                          for n, names in self._experts.items()]

    def _new_batch(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._mask = (mask > 0) if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        self._counted = set()
        if self._counts():
            self.tokens += float(self._mask.sum())
            if self._embedding is not None:
                sq = self.squares[self._embedding]
                sq += torch.bincount(ids[self._mask].reshape(-1).to(sq.device), minlength=sq.numel()).to(sq)

    def _hook(self, name: str, output: bool = False):
        """Counts the module's input (or, `output`, the first element of its output)."""

        def record(module, inputs, out):
            if not self._counts() or name in self._counted:  # a checkpointed block's recompute: seen already
                return
            self._counted.add(name)
            # Detached: no autograd record, so a recompute saves exactly what the forward saved.
            x = (out[0] if output else inputs[0]).detach()
            rows = x.reshape(-1, x.shape[-1])
            keep = self._token_mask(rows)
            rows = rows[keep] if keep is not None else rows
            self.squares[name] += rows.float().square().sum(0).to(torch.float64)

        return record

    def _token_mask(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The batch's padding mask, flattened, where `rows` are its tokens one by one (a router
        and the experts see the tokens flattened); None where they are not."""
        return self._mask.reshape(-1).to(rows.device) if rows.shape[0] == self._mask.numel() else None

    def _experts_hook(self, module_name: str, up: str | None, down: str | None):
        """Counts, per expert, the tokens routed to it: their hidden states (the up projection's
        input) and the down-projection's input, recomputed from them (analysis.experts)."""

        def record(module, args, kwargs):
            if not self._counts() or module_name in self._counted:
                return
            self._counted.add(module_name)
            got = routing_args(args, kwargs)
            if got is None:
                return
            hidden, index = got
            hidden = hidden.detach().reshape(-1, hidden.shape[-1])
            for r in routed(module, hidden, index, self._token_mask(hidden)):
                for name, x in ((up, r.up_input), (down, r.down_input)):
                    if name is not None:
                        f = self.axes[name].per_slab
                        self.squares[name][r.expert * f : (r.expert + 1) * f] += (
                            x.float().square().sum(0).to(torch.float64).to(self._device))

        return record

    def _counts(self) -> bool:
        return self.counting and not self._paused

    @contextlib.contextmanager
    def paused(self):
        """Passes that are not calibration data (a rank's dummy batch) are not counted."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def as_vector(self) -> torch.Tensor:
        """Everything counted, in one float64 vector (for a sum over ranks)."""
        return torch.cat([torch.tensor([self.tokens], dtype=torch.float64, device=self._device),
                          *self.squares.values()])

    def load_vector(self, vector: torch.Tensor) -> None:
        self.tokens = float(vector[0])
        at = 1
        for sq in self.squares.values():
            sq.copy_(vector[at : at + sq.numel()])
            at += sq.numel()

    def expand(self, name: str, offset: int, n: int) -> torch.Tensor:
        """‖x_j‖₂ for elements [offset, offset + n) of the flattened parameter, float32, on the
        device the counts are on."""
        axis = self.axes.get(name)
        if axis is None:
            return torch.full((n,), math.sqrt(self.tokens), dtype=torch.float32, device=self._device)
        norms = self.squares[name].sqrt().float()
        if axis.slab:  # one expert's matrix after another, each with its own features
            pieces, at = [], offset
            while at < offset + n:
                e, local = divmod(at, axis.slab)
                take = min(axis.slab - local, offset + n - at)
                f = axis.per_slab
                plain = FeatureAxis(f, axis.cols, axis.along_rows)
                pieces.append(_expanded(norms[e * f : (e + 1) * f], plain, local, take))
                at += take
            return torch.cat(pieces) if pieces else norms[:0]
        return _expanded(norms, axis, offset, n)

    def at(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """‖x_j‖₂ of chosen elements (flat indices into the parameter): `expand`'s values, without
        building them for the whole parameter."""
        axis = self.axes.get(name)
        if axis is None:
            return torch.full((flat.numel(),), math.sqrt(self.tokens), dtype=torch.float32, device=self._device)
        return self.squares[name].sqrt().float()[axis.feature_of(flat.to(self._device))]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
