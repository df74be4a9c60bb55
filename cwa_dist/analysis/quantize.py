"""Round-to-nearest block quantization with kept weights (dense-and-sparse): pure torch, no Ray.

`--quantization-study BITS` asks what keeping a set of weights at full precision buys when every
scored matrix is quantized. Each matrix is cut into blocks of `block` consecutive elements along
its rows (the input dimension of a Linear weight; a GPT-2 Conv1D weight, stored (in, out), is
quantized through its transpose), a block never spanning two rows and a row's last block shorter
where the row is. A block's scale is max|w| / (2^(bits−1) − 1) and its values become integers in
[−(2^(bits−1) − 1), 2^(bits−1) − 1] (torch.round: half to even), times the scale.

Keeping a weight is SqueezeLLM's dense-and-sparse split: the kept weights are taken out of their
block before its scale is computed (the dense part holds a zero there) and put back at full
precision afterwards. With absmax scales a block's largest weight is represented exactly anyway,
so keeping helps only through the scale of the weights around it: that is what the study measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

from cwa_dist.analysis.experts import experts_modules, up_name
from cwa_dist.analysis.perturb import PerturbationSpec, Saved, Targets
from cwa_dist.errors import UsageError


def check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise UsageError(f"--quantization-study {bits}: give a bit width from 2 to 8 (the symmetric grid needs "
                         "at least one level each side of zero)")


@torch.no_grad()
def quantize_rows(w: torch.Tensor, bits: int, block: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """`w` (rows, cols) quantized in blocks along each row, `keep` (a boolean mask of w's shape)
    left at full precision; returned in w's dtype, w unchanged. The arithmetic is float32 (float64
    for a float64 matrix)."""
    if w.ndim != 2:
        raise ValueError(f"quantize_rows takes a matrix, got shape {tuple(w.shape)}")
    qmax = 2 ** (bits - 1) - 1
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    rows, cols = w.shape
    blocks = -(-cols // block)
    dense = torch.zeros(rows, blocks * block, dtype=dtype, device=w.device)  # padding zeros: no effect on max|w|
    dense[:, :cols] = w
    if keep is not None:
        dense[:, :cols].masked_fill_(keep, 0.0)
    dense = dense.view(rows, blocks, block)
    scale = dense.abs().amax(dim=-1, keepdim=True) / qmax
    # An all-zero block (scale 0) stays zero instead of dividing by zero.
    q = torch.where(scale > 0, torch.round(dense / torch.where(scale > 0, scale, 1.0)).clamp_(-qmax, qmax), 0.0)
    out = (q * scale).view(rows, blocks * block)[:, :cols]
    if keep is not None:
        out = torch.where(keep, w.to(dtype), out)
    return out.to(w.dtype)


def quantize_matrix(w: torch.Tensor, bits: int, block: int, keep_flat: torch.Tensor | None = None,
                    transposed: bool = False) -> torch.Tensor:
    """A parameter quantized along its input dimension: a matrix (more than 2-D: trailing dimensions
    folded into its rows), or a fused experts tensor (3-D, expert first: each expert's matrix on its
    own); `keep_flat` are flat indices into the parameter to keep; `transposed` for weights stored
    (in, out), whose input dimension is the first of each matrix."""
    # (matrices, rows, cols): one matrix, or one per expert
    stack = w.reshape(w.shape[0], w.shape[1], -1) if w.ndim == 3 else w.reshape(1, w.shape[0], -1)
    keep = None
    if keep_flat is not None and keep_flat.numel():
        keep = torch.zeros(stack.numel(), dtype=torch.bool, device=w.device)
        keep[keep_flat.to(w.device)] = True
        keep = keep.view(stack.shape)
    if transposed:
        stack, keep = stack.transpose(1, 2), keep.transpose(1, 2) if keep is not None else None
    rows = stack.reshape(-1, stack.shape[-1])
    out = quantize_rows(rows, bits, block, keep.reshape(rows.shape) if keep is not None else None).view(stack.shape)
    if transposed:
        out = out.transpose(1, 2)
    return out.reshape(w.shape)


QUANTIZATION = "quantization"  # the experiments' method, as the pool and the result log see it
NONE_KEPT, SUPER_WEIGHTS_KEPT = "none", "super_weights"


@dataclass(frozen=True, slots=True)
class QuantizationSpec(PerturbationSpec):
    """One kept set of the study: every matrix in `matrices` quantized, `targets` kept."""

    kept: str = NONE_KEPT  # none, a metric, random, magnitude, random_same_tensor[<metric>], super_weights
    bits: int = 4
    block: int = 128
    matrices: tuple[str, ...] = ()


def study_specs(sets: Sequence[PerturbationSpec], supers: Targets | None, *, k: int, bits: int, block: int,
                matrices: Sequence[str]) -> list[QuantizationSpec]:
    """The study's experiments: nothing kept; each of `sets` (the run's top-K experiments and their
    controls at ratio 1, so the same weights) kept; and the super-weight candidates kept."""
    empty = Targets(list(matrices), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    chosen = [(NONE_KEPT, False, None, empty)] + [(s.method, s.is_control, s.seed, s.targets) for s in sets]
    if supers is not None and len(supers):
        chosen.append((SUPER_WEIGHTS_KEPT, False, None, supers))
    out = []
    for kept, is_control, seed, targets in chosen:
        key = f"{QUANTIZATION}|bits={bits}|block={block}|kept={kept}|k={k if len(targets) else 0}"
        out.append(QuantizationSpec(
            key=key if seed is None else f"{key}|seed={seed}", method=QUANTIZATION, is_control=is_control,
            topk=k, mask_ratio=1.0, seed=seed, mode=f"rtn{bits}", targets=targets, kept=kept, bits=bits,
            block=block, matrices=tuple(matrices)))
    return out


def stored_in_out(model: torch.nn.Module) -> set[str]:
    """Names of the weights stored (in, out) (GPT-2's Conv1D, and the experts of a class that says
    `is_transposed`), whose input dimension is the first."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {names[id(m.weight)] for m in model.modules() if isinstance(m, Conv1D) and id(m.weight) in names}
    for _, m in experts_modules(model):
        if getattr(m, "is_transposed", False):
            out |= {names[id(p)] for p in (getattr(m, up_name(m)), m.down_proj) if id(p) in names}
    return out


@torch.no_grad()
def quantize_in_place(params: dict[str, torch.Tensor], spec: QuantizationSpec, transposed: set[str]) -> Saved:
    """Quantize every matrix of `spec` in place, keeping its targets; the originals, whole, to restore."""
    kept = spec.targets.by_param()
    saved = {}
    for name in spec.matrices:
        p = params[name]
        original = p.data.reshape(-1).clone()
        saved[name] = (slice(None), original)  # the whole tensor: no index list the size of the model
        p.data.copy_(quantize_matrix(p.data, spec.bits, spec.block, kept.get(name), transposed=name in transposed))
    return Saved(saved)
