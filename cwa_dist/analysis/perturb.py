"""Perturbation modes, target sets and exact apply/restore: pure torch, no Ray.

A *spec* names a set of weights and a mode. Applying it saves the touched values first, so
restoring writes back exactly the bits that were there.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from cwa_dist.analysis.topk import Candidates
from cwa_dist.errors import UsageError
from cwa_dist.registry import Registry


@dataclass(frozen=True, slots=True)
class ModeOptions:
    """What the modes other than `zero` need: a scale factor, a relative noise level with its seed,
    and the bit to flip (None: the most significant exponent bit of the weight's dtype). The run's
    configuration holds one as a section; the field metadata give the flat names of its settings."""

    scale: float = field(default=0.5, metadata={"flat": "perturbation_scale"})
    """scale mode: the factor each selected weight is multiplied by."""
    noise: float = field(default=1.0, metadata={"flat": "perturbation_noise"})
    """gauss_noise mode: the noise's standard deviation relative to |w|."""
    bit: int | None = field(default=None, metadata={"flat": "perturbation_bit"})
    """bit_flip mode: the bit to flip, 0 = least significant; default the most significant exponent
    bit of the weights' dtype (30 in float32, 14 in bfloat16)."""
    seed: int = field(default=0, metadata={"setting": False})  # per experiment: the plan derives it


ModeFn = Callable[[torch.Tensor, ModeOptions], torch.Tensor]

MODES: Registry[ModeFn] = Registry("perturbation mode")


def register_mode(name: str):
    def wrap(fn: ModeFn) -> ModeFn:
        MODES.add(name, fn)
        return fn

    return wrap


@register_mode("zero")
def zero(values: torch.Tensor, options: ModeOptions) -> torch.Tensor:
    return torch.zeros_like(values)


@register_mode("sign_flip")
def sign_flip(values: torch.Tensor, options: ModeOptions) -> torch.Tensor:
    return torch.neg(values)


@register_mode("scale")
def scale(values: torch.Tensor, options: ModeOptions) -> torch.Tensor:
    return values * options.scale


@register_mode("gauss_noise")
def gauss_noise(values: torch.Tensor, options: ModeOptions) -> torch.Tensor:
    """w + noise·|w|·ε, ε ~ N(0, 1) drawn on the CPU from the experiment's seed (the same on any device)."""
    eps = torch.randn(values.shape, generator=torch.Generator().manual_seed(options.seed), dtype=torch.float32)
    return (values.float() + options.noise * values.float().abs() * eps.to(values.device)).to(values.dtype)


# Signed integer views of each float width: XOR on them flips stored bits exactly.
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_TOP_EXPONENT_BIT = {torch.float32: 30, torch.float64: 62, torch.bfloat16: 14, torch.float16: 14}


def flip_bit_index(dtype: torch.dtype, bit: int | None) -> int:
    """The bit `bit_flip` flips in a value of `dtype` (0 = least significant); checked against its width."""
    width = 8 * dtype.itemsize
    chosen = _TOP_EXPONENT_BIT[dtype] if bit is None else bit
    if not 0 <= chosen < width:
        kind = str(dtype).removeprefix("torch.")
        raise UsageError(f"--perturbation-bit {bit} is outside 0..{width - 1}, the bits of a {kind} weight")
    return chosen


@register_mode("bit_flip")
def bit_flip(values: torch.Tensor, options: ModeOptions) -> torch.Tensor:
    """The stored value with one bit flipped; by default the top exponent bit, which multiplies a
    weight of magnitude below 1 by 2^128 (float32, bfloat16) or 2^16 (float16), and turns one in
    [1, 2) into inf or NaN."""
    bit = flip_bit_index(values.dtype, options.bit)
    as_int = _INT_VIEW[values.dtype.itemsize]
    width = 8 * values.dtype.itemsize
    mask = -(1 << bit) if bit == width - 1 else 1 << bit  # the sign bit is the type's minimum
    return torch.bitwise_xor(values.contiguous().view(as_int), torch.tensor(mask, dtype=as_int)).view(values.dtype)


@dataclass(frozen=True, slots=True)
class Targets:
    """A set of weights, as (parameter, flat index) pairs; entries point into `param_names`."""

    param_names: list[str]
    param: torch.Tensor  # int64 (n,)
    flat_index: torch.Tensor  # int64 (n,)

    def __len__(self) -> int:
        return int(self.flat_index.numel())

    @staticmethod
    def from_candidates(c: Candidates) -> Targets:
        return Targets(list(c.param_names), c.param.clone(), c.flat_index.clone())

    def head(self, n: int) -> Targets:
        return Targets(self.param_names, self.param[:n], self.flat_index[:n])

    def by_param(self) -> dict[str, torch.Tensor]:
        """Flat indices grouped per parameter name."""
        out = {}
        for i, name in enumerate(self.param_names):
            idx = self.flat_index[self.param == i]
            if idx.numel():
                out[name] = idx
        return out


@dataclass(frozen=True, slots=True)
class PerturbationSpec:
    """One experiment: perturb `targets` with `mode`, then measure perplexity."""

    key: str  # unique and stable across runs, e.g. "grad_x_weight|k=100|r=0.5"
    method: str  # a metric name, or a control: "random", "magnitude", "random_same_tensor[<metric>]"
    is_control: bool
    topk: int
    mask_ratio: float
    seed: int | None
    mode: str
    targets: Targets
    options: ModeOptions = ModeOptions()


def random_targets(param_names: Sequence[str], numels: Sequence[int], n: int, seed: int) -> Targets:
    """n distinct weights drawn uniformly from the given parameters, in draw order.

    Draw order makes the sets nested: the first m of a draw of n is the draw of m for the same
    seed, just as the top-m is a prefix of the top-n.
    """
    total = sum(numels)
    if n > total:
        raise ValueError(f"cannot draw {n} distinct weights from {total}")
    gen = torch.Generator().manual_seed(seed)
    chosen: dict[int, None] = {}  # insertion-ordered set
    while len(chosen) < n:
        for g in torch.randint(total, (2 * (n - len(chosen)) + 16,), generator=gen).tolist():
            chosen.setdefault(g, None)
            if len(chosen) == n:
                break
    flat_global = torch.tensor(list(chosen), dtype=torch.int64)
    ends = torch.cumsum(torch.tensor(list(numels), dtype=torch.int64), 0)
    param = torch.searchsorted(ends, flat_global, right=True)
    starts = ends - torch.tensor(list(numels), dtype=torch.int64)
    return Targets(list(param_names), param, flat_global - starts[param])


def same_tensor_targets(ranked: Targets, numel_of: Mapping[str, int], seed: int) -> Targets:
    """A random set shaped like `ranked`: in each parameter, as many weights as `ranked` holds
    there, drawn uniformly from that parameter alone. It separates "this tensor matters" from
    "these weights matter".

    Entry i is the j-th draw of its parameter when entry i of `ranked` is that parameter's j-th
    entry, so every prefix matches the ranking's prefix of the same length, tensor for tensor.
    """
    order = ranked.param.tolist()
    counts = Counter(order)
    # Each parameter its own stream, independent of which others are drawn.
    draws = {p: random_targets([ranked.param_names[p]], [numel_of[ranked.param_names[p]]], c,
                               seed=stable_seed(seed, ranked.param_names[p])).flat_index.tolist()
             for p, c in counts.items()}
    used: Counter = Counter()
    flat = []
    for p in order:
        flat.append(draws[p][used[p]])
        used[p] += 1
    return Targets(ranked.param_names, ranked.param.clone(), torch.tensor(flat, dtype=torch.int64))


def stable_seed(seed: int, label: str) -> int:
    """A seed derived from a run's seed and a label: the same on every run, process and machine."""
    return int.from_bytes(hashlib.blake2b(f"{seed}|{label}".encode(), digest_size=8).digest(), "little") >> 1


@dataclass(slots=True)
class Saved:
    """The original values of perturbed weights, per parameter: (flat indices, values)."""

    values: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _flat(param: torch.Tensor) -> torch.Tensor:
    return param.data.view(-1)  # a view: writes land in the parameter


@torch.no_grad()
def apply(params: dict[str, torch.Tensor], targets: Targets, mode: str, options: ModeOptions = ModeOptions()) -> Saved:
    fn = MODES.get(mode)
    saved = {}
    for name, idx in targets.by_param().items():
        flat = _flat(params[name])
        idx = idx.to(flat.device)  # parameters may sit on different GPUs
        original = flat[idx].clone()
        saved[name] = (idx, original)
        flat[idx] = fn(original, options).to(flat.dtype)
    return Saved(saved)


@torch.no_grad()
def restore(params: dict[str, torch.Tensor], saved: Saved) -> None:
    for name, (idx, original) in saved.values.items():
        _flat(params[name])[idx] = original


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Compare raw bits, so -0.0 vs 0.0 and NaN payloads count as differences.
    return t.contiguous().reshape(-1).view(torch.uint8)


def restored_exactly(params: dict[str, torch.Tensor], saved: Saved) -> bool:
    return all(torch.equal(_bits(_flat(params[n])[idx]), _bits(orig)) for n, (idx, orig) in saved.values.items())


def fingerprint(t: torch.Tensor) -> str:
    """A digest of a tensor's exact bytes."""
    data = _bits(t.detach().cpu())
    return hashlib.blake2b(data.numpy(), digest_size=16).hexdigest()
