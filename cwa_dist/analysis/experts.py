"""Mixture-of-experts blocks as transformers 5 builds them: every expert of a layer in one 3-D
parameter per projection (`experts.gate_up_proj` (experts, 2 × intermediate, hidden) and
`experts.down_proj` (experts, hidden, intermediate), or (experts, in, out) where the experts class
says `is_transposed`), and a forward `experts(hidden_states, top_k_index, top_k_weights)` over the
flattened tokens. Pure torch: no Ray, no distributed code.

Activation statistics need what each expert's projections see: the tokens routed to it, and the
input of its down-projection. These are recomputed here from the experts module's own inputs and
weights, with the module's own gate (`_apply_gate`) and activation, in the module's dtype, so they
equal what its forward computes with any experts implementation; the model's output is untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A fused experts tensor: '<...>.experts.<projection>' with the expert as its first dimension.
_FUSED = re.compile(r"(?:^|\.)experts\.[A-Za-z_]+$")


def is_fused_experts(name: str, shape) -> bool:
    """Is parameter `name` of `shape` one tensor of all a layer's experts (expert first)?"""
    return len(shape) == 3 and bool(_FUSED.search(name))


def position(name: str, shape, flat: int) -> tuple[int | None, int, int | None]:
    """(expert, row, col) of flat index `flat` in parameter `name` of `shape`: the expert is None
    outside a fused experts tensor, where row and col are then within the expert's matrix (flat
    index 2,378 of a (4, 40, 16) experts tensor is expert 3, row 28, col 10); col is None for a
    1-D parameter."""
    index = []
    for size in reversed(tuple(shape)):
        index.append(flat % size)
        flat //= size
    index = list(reversed(index))
    expert = index.pop(0) if is_fused_experts(name, shape) else None
    return expert, index[0], index[1] if len(index) > 1 else None


def experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every experts module that keeps its experts fused: a down_proj
    parameter and a gate_up_proj (or, ungated, up_proj) one, each with the expert first."""
    out = []
    for name, module in model.named_modules():
        down = module._parameters.get("down_proj") if hasattr(module, "_parameters") else None
        up = module._parameters.get("gate_up_proj", module._parameters.get("up_proj")) if down is not None else None
        if isinstance(down, torch.nn.Parameter) and isinstance(up, torch.nn.Parameter):
            out.append((name, module))
    return out


def up_name(module: torch.nn.Module) -> str:
    return "gate_up_proj" if "gate_up_proj" in module._parameters else "up_proj"


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out + bias if bias is not None else out


@dataclass(frozen=True, slots=True)
class Routed:
    """What expert `expert` saw in one forward: its tokens' hidden states (the input of its up
    projection), the input of its down-projection, and the positions of those tokens among the
    flattened (unpadded and padded) tokens."""

    expert: int
    tokens: torch.Tensor
    up_input: torch.Tensor
    down_input: torch.Tensor


@torch.no_grad()
def routed(module: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
           keep: torch.Tensor | None = None) -> Iterator[Routed]:
    """Each expert with at least one token routed to it (and kept, where `keep` marks the
    flattened tokens that count), with its inputs, recomputed as the module's forward does."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    index = top_k_index.reshape(hidden.shape[0], -1)
    up = getattr(module, up_name(module))
    transposed = bool(getattr(module, "is_transposed", False))
    with_bias = bool(getattr(module, "has_bias", False))
    gated = up_name(module) == "gate_up_proj" and getattr(module, "has_gate", True)
    for e in range(up.shape[0]):
        hit = (index == e).any(dim=-1)
        if keep is not None:
            hit &= keep.to(hit.device)
        tokens = hit.nonzero().reshape(-1)
        if tokens.numel() == 0:
            continue
        x = hidden[tokens].to(up.dtype)
        bias = getattr(module, f"{up_name(module)}_bias")[e] if with_bias else None
        projected = _linear(x, up[e], bias, transposed)
        h = module._apply_gate(projected) if gated else module.act_fn(projected)
        yield Routed(e, tokens, x, h)


def down_output(module: torch.nn.Module, r: Routed) -> torch.Tensor:
    """Expert r.expert's down-projection output for its tokens (before the routing weight)."""
    down = module.down_proj
    bias = module.down_proj_bias[r.expert] if getattr(module, "has_bias", False) else None
    return _linear(r.down_input.to(down.dtype), down[r.expert], bias, bool(getattr(module, "is_transposed", False)))


def routing_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(hidden_states, top_k_index) from an experts forward's arguments, or None."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
    if hidden is None or index is None:
        return None
    return hidden, index
