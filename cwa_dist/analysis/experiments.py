"""The perturbation plan: which weights each experiment touches, and what one experiment measured.
Pure; no Ray."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from cwa_dist.analysis.evaluate import Perplexity
from cwa_dist.analysis.perturb import (
    ModeOptions,
    PerturbationSpec,
    Targets,
    random_targets,
    same_tensor_targets,
    stable_seed,
)
from cwa_dist.analysis.topk import Candidates
from cwa_dist.analysis.zero_shot import TaskScores


def weights_for(k: int, ratio: float) -> int:
    """How many of the top-k a ratio perturbs: ⌈ratio·k⌉, computed so 0.3·10 is 3, not 4."""
    return max(1, math.ceil(round(ratio * k, 9)))


@dataclass(frozen=True, slots=True)
class ExperimentResult:
    """What one experiment measured, as an evaluation actor returns it."""

    key: str
    perturbed: Perplexity
    baseline: Perplexity
    weights_masked: int
    wall_s: float
    restored_exact: bool
    actor: str  # host:pid, for tracing a result to a process
    tasks: dict[str, TaskScores] | None = None  # zero-shot tasks on the perturbed model
    baseline_tasks: dict[str, TaskScores] | None = None


def experiment_key(method: str, k: int, ratio: float, seed: int | None) -> str:
    key = f"{method}|k={k}|r={ratio:g}"
    return key if seed is None else f"{key}|seed={seed}"


def plan_experiments(
    *,
    rankings: dict[str, Candidates],
    magnitude: Candidates,
    param_names: Sequence[str],
    numels: Sequence[int],
    topk: Sequence[int],
    ratios: Sequence[float],
    random_seeds: int,
    seed: int,
    mode: str,
    options: ModeOptions = ModeOptions(),
    magnitude_control: bool = True,
    same_tensor_seeds: int = 0,
) -> list[PerturbationSpec]:
    """For each metric, K and ratio: the top ⌈ratio·K⌉ weights. For each K and ratio, controls
    of the same size on the same parameters: `random_seeds` random draws and (unless turned off)
    the largest |W|; and per metric, `same_tensor_seeds` random draws with its counts per tensor."""
    sizes = {(k, r): weights_for(k, r) for k in topk for r in ratios}
    largest = max(sizes.values())
    # One nested draw per seed: the draw for n weights is the first n of the largest draw.
    draws = [random_targets(param_names, numels, largest, seed=seed + i) for i in range(random_seeds)]
    by_magnitude = Targets.from_candidates(magnitude)
    by_metric = {metric: Targets.from_candidates(ranking) for metric, ranking in rankings.items()}
    numel_of = dict(zip(param_names, numels))
    same_tensor = {metric: [same_tensor_targets(ranked, numel_of, seed=stable_seed(seed + i, metric))
                            for i in range(same_tensor_seeds)] for metric, ranked in by_metric.items()}

    specs = []
    for (k, r), n in sizes.items():
        for metric, ranked in by_metric.items():
            specs.append(_spec(metric, False, k, r, None, mode, ranked.head(n), options, seed))
        for i, draw in enumerate(draws):
            specs.append(_spec("random", True, k, r, seed + i, mode, draw.head(n), options, seed))
        if magnitude_control:
            specs.append(_spec("magnitude", True, k, r, None, mode, by_magnitude.head(n), options, seed))
        for metric, drawn in same_tensor.items():
            for i, draw in enumerate(drawn):
                specs.append(_spec(same_tensor_method(metric), True, k, r, seed + i, mode, draw.head(n), options,
                                   seed))
    return specs


SAME_TENSOR = "random_same_tensor"


def same_tensor_method(metric: str) -> str:
    """The name of the control drawn tensor for tensor like `metric`'s ranking."""
    return f"{SAME_TENSOR}[{metric}]"


def same_tensor_metric(method: str) -> str | None:
    """The metric a random-same-tensor control copies its counts from; None for any other method."""
    prefix = SAME_TENSOR + "["
    return method[len(prefix):-1] if method.startswith(prefix) and method.endswith("]") else None


def noise_seed(key: str, seed: int) -> int:
    """A stable per-experiment seed for seeded modes (gauss_noise): the same on every run and actor."""
    return stable_seed(seed, key)


def _spec(method: str, is_control: bool, k: int, r: float, seed: int | None, mode: str, targets: Targets,
          options: ModeOptions, run_seed: int):
    key = experiment_key(method, k, r, seed)
    return PerturbationSpec(
        key=key,
        method=method,
        is_control=is_control,
        topk=k,
        mask_ratio=r,
        seed=seed,
        mode=mode,
        targets=targets,
        options=replace(options, seed=noise_seed(key, run_seed)),
    )


SUPER_WEIGHT = "super_weight"


ABLATION = "ablation"


def single_weight_key(method: str, param: str, where: str) -> str:
    return f"{method}|{param}[{where}]"


def single_weight_spec(method: str, param: str, flat_index: int, where: str) -> PerturbationSpec:
    """Zero one weight alone (a super-weight candidate, a weight of the ablation study); `where`
    names it in the key."""
    return PerturbationSpec(
        key=single_weight_key(method, param, where),
        method=method,
        is_control=False,
        topk=1,
        mask_ratio=1.0,
        seed=None,
        mode="zero",
        targets=Targets([param], torch.zeros(1, dtype=torch.int64), torch.tensor([flat_index], dtype=torch.int64)),
    )


def super_weight_spec(candidate) -> PerturbationSpec:
    where = f"{candidate.row},{candidate.col}"
    if candidate.expert is not None:
        where = f"{candidate.expert},{where}"  # one fused tensor holds every expert's (row, col)
    return single_weight_spec(SUPER_WEIGHT, candidate.param, candidate.flat_index, where)


def ablation_spec(param: str, flat_index: int) -> PerturbationSpec:
    return single_weight_spec(ABLATION, param, flat_index, str(flat_index))  # key: ablation_key


def ablation_key(param: str, flat_index: int) -> str:
    return single_weight_key(ABLATION, param, str(flat_index))
