"""Which stored tensors make each model parameter, as transformers' own loader decides.

transformers 5 renames some checkpoint keys when it loads them (GPT-NeoX's 'embed_out.' is the
model's 'lm_head.'), and for mixture-of-experts models it builds one parameter out of many stored
tensors: Mixtral's experts are stored one by one ('experts.3.w1.weight'), and the model holds all
of them stacked into one 3-D tensor, gate and up projections concatenated ('experts.gate_up_proj',
(experts, 2 × intermediate, hidden)). Its registry of these conversions is the one source of truth
here: each key is routed by transformers' own `rename_source_key`, in transformers' own key order,
and each converter's operations are replayed on *layouts* (lists of flat segments of stored
tensors) instead of tensors. A stack along the first dimension and a concatenation are both
concatenations of flat pieces, so any slice of a fused parameter can then be read without building
the parameter: a ZeRO-3 rank reads only its own partition of an expert tensor. Operations that
permute elements (a transpose) are refused by name rather than approximated.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from cwa_dist.errors import UsageError
from cwa_dist.modeling.checkpoint import Checkpoint, Segment


@dataclass(frozen=True, slots=True)
class Layout:
    """A tensor of `shape` whose flattened elements are `segments`, in order."""

    shape: tuple[int, ...]
    segments: tuple[Segment, ...]


def _take(segments: tuple[Segment, ...], start: int, length: int) -> list[Segment]:
    """The segments holding flat elements [start, start + length) of their concatenation."""
    out, at = [], 0
    for s in segments:
        lo, hi = max(start, at), min(start + length, at + s.length)
        if lo < hi:
            out.append(Segment(s.key, s.start + lo - at, hi - lo))
        at += s.length
    return out


def _joined(segments: list[Segment]) -> tuple[Segment, ...]:
    """Neighbouring segments that continue one another in the same stored tensor, as one."""
    out: list[Segment] = []
    for s in segments:
        if out and out[-1].key == s.key and out[-1].start + out[-1].length == s.start:
            out[-1] = Segment(s.key, out[-1].start, out[-1].length + s.length)
        else:
            out.append(s)
    return tuple(out)


def stack(layouts: list[Layout], dim: int) -> Layout:
    """torch.stack(tensors, dim) of equal shapes; only dim 0 keeps each tensor contiguous."""
    shapes = {x.shape for x in layouts}
    if dim != 0 or len(shapes) != 1:
        raise ValueError(f"stacking {len(layouts)} tensors of shapes {sorted(shapes)} along dim {dim}")
    return Layout((len(layouts), *shapes.pop()), _joined([s for x in layouts for s in x.segments]))


def concatenate(layouts: list[Layout], dim: int) -> Layout:
    """torch.cat(tensors, dim): for each index of the dimensions before `dim`, each tensor's
    contiguous block of the rest, in turn."""
    first = layouts[0].shape
    if any(len(x.shape) != len(first) or x.shape[:dim] != first[:dim] or x.shape[dim + 1 :] != first[dim + 1 :]
           for x in layouts):
        raise ValueError(f"concatenating shapes {[x.shape for x in layouts]} along dim {dim}")
    outer = math.prod(first[:dim])
    pieces = []
    for o in range(outer):
        for x in layouts:
            inner = math.prod(x.shape[dim:])
            pieces += _take(x.segments, o * inner, inner)
    shape = (*first[:dim], sum(x.shape[dim] for x in layouts), *first[dim + 1 :])
    return Layout(shape, _joined(pieces))


def _replay(converter, collected: dict[str, list[Layout]], target: str) -> Layout:
    """The converter's operations, in order, on layouts: MergeModulelist stacks each source
    pattern's list, Concatenate joins the patterns in the converter's own order."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    values: dict[str, list[Layout] | Layout] = dict(collected)
    for op in converter.operations:
        if isinstance(op, MergeModulelist):
            values = {p: stack(v, op.dim) if isinstance(v, list) else v for p, v in values.items()}
        elif isinstance(op, Concatenate):
            parts = []
            for p in converter.source_patterns:
                if p in values:
                    v = values[p]
                    parts += v if isinstance(v, list) else [v]
            values = {"": concatenate(parts, op.dim)}
        else:
            raise UsageError(
                f"transformers builds the model's {target} with a {type(op).__name__} conversion, which cwa_dist "
                "cannot read in slices; re-save the model with this transformers version's save_pretrained"
            )
    (result,) = values.values() if len(values) == 1 else (None,)
    if not isinstance(result, Layout):
        raise UsageError(f"transformers' conversion of {target} does not produce one tensor from its checkpoint keys")
    return result


def _transforms(net: torch.nn.Module):
    """(renamings, converters) of transformers' registry for this model; none without one."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # a transformers without the registry: names are used as they are
        return [], []
    transforms = get_model_conversion_mapping(net)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def route(net: torch.nn.Module, ckpt: Checkpoint) -> tuple[dict[str, str], dict[str, Layout]]:
    """({model name: stored key} for keys transformers renames, {model name: layout} for
    parameters it builds from several stored tensors)."""
    renamings, converters = _transforms(net)
    if not renamings and not converters:
        return {}, {}
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    prefix = getattr(net, "base_model_prefix", None) or None
    model_names = dict.fromkeys(n for n, _ in net.named_parameters())
    model_names.update(dict.fromkeys(n for n, _ in net.named_buffers()))
    renamed: dict[str, str] = {}
    groups: dict[str, tuple[object, dict[str, list[Layout]]]] = {}
    for key in sorted(ckpt.tensors, key=dot_natural_key):  # the order transformers collects experts in
        name, pattern, converter = key, None, None
        for c in converters or [None]:
            name, pattern = rename_source_key(key, renamings, [c] if c is not None else [], prefix, model_names)
            if pattern is not None:
                converter = c
                break
        if converter is None:
            if name != key:
                renamed[name] = key
            continue
        info = ckpt.tensors[key]
        _, collected = groups.setdefault(name, (converter, defaultdict(list)))
        collected[pattern].append(Layout(info.shape, (Segment(key, 0, info.numel),)))
    fused = {name: _replay(converter, collected, name) for name, (converter, collected) in groups.items()}
    return renamed, fused
