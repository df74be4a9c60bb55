"""Zero-shot tasks of lm-evaluation-harness, run on a model held in memory: what a perturbation does
to task accuracy, kept per example so that the change from the baseline can be bootstrapped over
the same examples. The harness is an optional dependency (`pip install 'cwa_dist[eval]'`); it is
imported only where tasks are asked for. No Ray here.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cwa_dist.errors import UsageError

INSTALL_HINT = "pip install 'cwa_dist[eval]' (or scripts/setup.sh, which installs it)"


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """What each evaluation actor runs besides perplexity: harness task names, at most `limit`
    examples each, the user's task YAMLs in `include`."""

    tasks: tuple[str, ...]
    limit: int | None
    include: str | None
    batch_size: int


@dataclass(frozen=True, slots=True)
class TaskScores:
    """One task's per-example scores under each of its metrics, in the task's example order."""

    task: str
    metrics: dict[str, tuple[float, ...]]

    @property
    def examples(self) -> int:
        return len(next(iter(self.metrics.values()), ()))

    def mean(self, metric: str) -> float:
        values = self.metrics[metric]
        return sum(values) / len(values)

    def stderr(self, metric: str) -> float:
        """The standard error of the mean, as the harness reports it (sample deviation / √n)."""
        values, n = self.metrics[metric], len(self.metrics[metric])
        if n < 2:
            return float("nan")
        mean = sum(values) / n
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def task_manager(include: str | None):
    """The harness's task index, with the user's own task YAMLs from `include`; a missing harness
    is one clear line."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UsageError(f"--eval-tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}") from e
    return TaskManager(include_path=include, verbosity="ERROR")


def check_tasks(tasks: Sequence[str], include: str | None) -> None:
    """Every task name is one the harness knows (its own or from `include`), or a UsageError that
    lists the close matches."""
    known = set(task_manager(include).all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise UsageError(f"--eval-tasks: lm-evaluation-harness has no task {name!r}{hint}")


def count_examples(tasks: Sequence[str], *, limit: int | None, include: str | None) -> dict[str, int | None]:
    """Examples each task will evaluate (its evaluation split, capped by `limit`); None where the
    task's data cannot be read here (a Hub dataset on an offline machine)."""
    from lm_eval.tasks import get_task_dict

    manager = task_manager(include)
    out: dict[str, int | None] = {}
    for name in tasks:
        try:
            task = get_task_dict([name], manager)[name]
            n = len(task.eval_docs)
        except Exception:  # no network, gated data: the plan says it does not know
            out[name] = None
            continue
        out[name] = min(n, limit) if limit is not None else n
    return out


def evaluate_tasks(model: torch.nn.Module, tokenizer, tasks: Sequence[str], *, limit: int | None,
                   include: str | None, batch_size: int, manager=None) -> dict[str, TaskScores]:
    """Each task's per-example scores for `model` as it is now (perturbed or not), through the
    harness's own Python API on this in-memory model: nothing is saved or reloaded."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes on being handed a model object, once per experiment
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bars, once per task and experiment
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
            out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager or task_manager(include),
                                  limit=limit, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    finally:
        quiet.setLevel(level)
    scores = {}
    for task in tasks:
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        names = list(out["higher_is_better"][task])
        scores[task] = TaskScores(task, {m: tuple(float(s[m]) for s in samples) for m in names if m in samples[0]})
    return scores


def paired_change(baseline: Sequence[float], perturbed: Sequence[float], *, samples: int, seed: int,
                  level: float = 0.95) -> tuple[float, float, float]:
    """The change in mean score, perturbed − baseline, and its percentile bootstrap interval over
    the same resampled examples for both (a paired bootstrap, as the perplexity's over windows)."""
    base = torch.tensor(baseline, dtype=torch.float64)
    pert = torch.tensor(perturbed, dtype=torch.float64)
    if base.shape != pert.shape or base.numel() == 0:
        raise ValueError(f"paired scores need the same examples: {base.numel()} and {pert.numel()}")
    idx = torch.randint(len(base), (samples, len(base)), generator=torch.Generator().manual_seed(seed))
    deltas = pert[idx].mean(1) - base[idx].mean(1)
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    low, high = torch.quantile(deltas, q).tolist()
    return float(pert.mean() - base.mean()), low, high
