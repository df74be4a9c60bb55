"""Rows of perturbation_results (in outputs.PERTURBATION_COLUMNS' order) and the summary built from
them: an experiment's measured result, a failure, the baseline's interval, a row's console line."""

from __future__ import annotations

import pandas as pd

from cwa_dist.analysis.evaluate import bootstrap_intervals
from cwa_dist.analysis.experiments import ABLATION, SUPER_WEIGHT, ExperimentResult, same_tensor_metric
from cwa_dist.analysis.perturb import PerturbationSpec
from cwa_dist.analysis.zero_shot import paired_change
from cwa_dist.config import RunConfig


def result_row(spec: PerturbationSpec, r: ExperimentResult, tokens: list[int], cfg: RunConfig) -> dict:
    base, pert = r.baseline.value, r.perturbed.value
    ci = bootstrap_intervals(tokens, r.baseline.window_nll, r.perturbed.window_nll,
                             samples=cfg.perturbation.bootstrap_samples, seed=cfg.data.seed)
    return {
        "metric": spec.method,
        "topk": spec.topk,
        "mask_ratio": spec.mask_ratio,
        "weights_masked": r.weights_masked,
        "baseline_ppl": base,
        "perturbed_ppl": pert,
        "ppl_increase": pert - base,
        "ppl_ratio": pert / base,
        **ci,
        "is_control": spec.is_control,
        "seed": spec.seed,
        "mode": spec.mode,
        "eval_tokens": r.perturbed.tokens,
        "wall_s": round(r.wall_s, 3),
        "restored_exact": r.restored_exact,
        "actor": r.actor,
        "key": r.key,
        # A restore that was not bit-exact leaves the actor's model changed: the run fails, and a
        # resume must run this experiment again rather than keep it.
        "status": "ok" if r.restored_exact else "failed",
        "error": "" if r.restored_exact else "the weights were not restored bit for bit after this experiment",
        **task_columns(r, cfg),
    }


TASK_SUFFIXES = ("", "_stderr", "_baseline", "_change", "_change_ci_low", "_change_ci_high")
"""Each zero-shot task metric's columns, after `<task>.<metric>`: the perturbed model's score, its
standard error, the baseline's score, the change, and the change's paired 95% interval."""


def task_columns(r: ExperimentResult, cfg: RunConfig) -> dict:
    """The zero-shot columns of one experiment's row (none when no task ran), in TASK_SUFFIXES' order."""
    if r.tasks is None:
        return {}
    out = {}
    for task, scores in r.tasks.items():
        base = r.baseline_tasks[task]
        for metric, values in scores.metrics.items():
            change, low, high = paired_change(base.metrics[metric], values, samples=cfg.perturbation.bootstrap_samples,
                                              seed=cfg.data.seed)
            name = f"{task}.{metric}"
            out.update({name: scores.mean(metric), f"{name}_stderr": scores.stderr(metric),
                        f"{name}_baseline": base.mean(metric), f"{name}_change": change,
                        f"{name}_change_ci_low": low, f"{name}_change_ci_high": high})
    return out


def with_extra_columns(declared, rows: list[dict]) -> list[str]:
    """`declared`, then every other key of `rows` (the zero-shot columns) in first-seen order."""
    declared = list(declared)
    return declared + [c for c in dict.fromkeys(k for row in rows for k in row) if c not in declared]


def task_metrics(columns) -> list[str]:
    """The `<task>.<metric>` names among a table's columns, in order."""
    return [c[: -len("_change")] for c in columns if c.endswith("_change") and "." in c]


def failed_row(spec: PerturbationSpec, error: str, baseline_ppl: float) -> dict:
    """An experiment that kept failing: recorded, not dropped."""
    return {
        "metric": spec.method, "topk": spec.topk, "mask_ratio": spec.mask_ratio,
        "weights_masked": len(spec.targets), "baseline_ppl": baseline_ppl, "perturbed_ppl": float("nan"),
        "ppl_increase": float("nan"), "ppl_ratio": float("nan"), "ppl_ci_low": float("nan"),
        "ppl_ci_high": float("nan"), "ppl_ratio_ci_low": float("nan"), "ppl_ratio_ci_high": float("nan"),
        "is_control": spec.is_control, "seed": spec.seed,
        "mode": spec.mode, "eval_tokens": 0, "wall_s": 0.0, "restored_exact": None, "actor": "", "key": spec.key,
        "status": "failed", "error": error,
    }


def baseline_interval(tokens: list[int], baseline, cfg: RunConfig) -> list[float]:
    ci = bootstrap_intervals(tokens, baseline.window_nll, baseline.window_nll,
                             samples=cfg.perturbation.bootstrap_samples, seed=cfg.data.seed)
    return [ci["ppl_ci_low"], ci["ppl_ci_high"]]


def describe(row: dict) -> str:
    line = _describe_perplexity(row)
    if row["status"] == "ok":
        for name in task_metrics(row):
            line += (f"; {name} {row[name + '_baseline']:.3f} → {row[name]:.3f} (95% CI of the change "
                     f"{row[name + '_change_ci_low']:+.3f} to {row[name + '_change_ci_high']:+.3f})")
    return line


def _describe_perplexity(row: dict) -> str:
    if row["metric"] in (SUPER_WEIGHT, ABLATION) and row["status"] == "ok":
        return (f"{row['metric'].replace('_', ' ')} {row['key'].split('|', 1)[1]}: "
                f"PPL {row['baseline_ppl']:.2f} → {row['perturbed_ppl']:.2f} "
                f"(×{row['ppl_ratio']:.3g})")
    seed = f" seed {row['seed']}" if row["seed"] is not None else ""
    if row["status"] != "ok":
        return f"{row['metric']}{seed} Top-{row['topk']} {row['mask_ratio']:.0%}: FAILED ({row['error']})"
    return (f"{row['metric']}{seed} Top-{row['topk']} {row['mask_ratio']:.0%}: "
            f"PPL {row['baseline_ppl']:.2f} → {row['perturbed_ppl']:.2f} ({row['ppl_increase']:+.2f}; "
            f"ratio 95% CI {row['ppl_ratio_ci_low']:.3g}–{row['ppl_ratio_ci_high']:.3g})")


def spread(values: pd.Series) -> dict:
    """Mean, min, max and sample standard deviation of a control's draws (std 0 for one draw)."""
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def same_tensor_rows(results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The random-same-tensor control rows, per metric whose counts per tensor they copy."""
    copied = results["metric"].map(same_tensor_metric)
    return {m: g for m, g in results[copied.notna()].groupby(copied[copied.notna()], sort=True)}


def perturbation_summary(results: pd.DataFrame) -> dict:
    metric_rows = results[~results["is_control"]]
    # A NaN perplexity (weights made inf or NaN, e.g. by bit_flip) is a destroyed model, not a maximum.
    increases = metric_rows["ppl_increase"].dropna()
    best = metric_rows.loc[increases.idxmax()] if len(increases) else None
    comparison = []
    for (k, r), df in results.groupby(["topk", "mask_ratio"], sort=True):
        entry = {"topk": int(k), "mask_ratio": float(r), "weights_masked": int(df["weights_masked"].iloc[0])}
        for metric, g in df[~df["is_control"]].groupby("metric"):
            entry[metric] = float(g["perturbed_ppl"].iloc[0])
        rnd = df[df["metric"] == "random"]["perturbed_ppl"]
        if len(rnd):
            entry.update({f"random_{k}": v for k, v in spread(rnd).items()})
        mag = df[df["metric"] == "magnitude"]["perturbed_ppl"]
        if len(mag):
            entry["magnitude"] = float(mag.iloc[0])
        same = same_tensor_rows(df)
        if same:
            entry["random_same_tensor"] = {m: spread(g["perturbed_ppl"]) for m, g in same.items()}
        comparison.append(entry)
    out = {
        "max_ppl_increase": float(increases.max()) if len(increases) else None,
        "comparison": comparison,
    }
    if best is not None:
        out["most_impactful_perturbation"] = {
            "metric": best["metric"],
            "topk": int(best["topk"]),
            "mask_ratio": float(best["mask_ratio"]),
            "weights_masked": int(best["weights_masked"]),
            "baseline_ppl": float(best["baseline_ppl"]),
            "perturbed_ppl": float(best["perturbed_ppl"]),
            "ppl_increase": float(best["ppl_increase"]),
        }
    return out
