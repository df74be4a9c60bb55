"""The findings a user asked the run for, as numbers and as sentences made only from those numbers:
at each K, which ranking did the most damage per weight; whether each targeted ranking beat its
controls, by the perplexities' 95% intervals; whether the calibration set is small enough that the
ranking may not be stable; with --stability-folds, whether it was; with --ablation-study, how well
each metric's score predicted the damage of zeroing single weights; with --quantization-study,
whether keeping each set at full precision measurably protected the quantized model. Pure pandas;
no Ray.
"""

from __future__ import annotations

import math

import pandas as pd

from cwa_dist.analysis.experiments import same_tensor_metric

SMALL_CALIBRATION_TOKENS = 10_000
"""Under this many predicted calibration tokens a top-K may change with the texts (README: two disjoint
halves of SmolLM2's 1,304 calibration tokens share 4 of their top-10)."""


def damage_per_weight(row) -> float:
    """The increase in mean NLL (nats per token) per weight perturbed: log(perturbed / baseline) / n."""
    return math.log(row["ppl_ratio"]) / row["weights_masked"] if row["ppl_ratio"] > 0 else float("nan")


def _verdict(metric_row, control_rows: pd.DataFrame) -> str:
    """'beat' when the metric's interval lies wholly above every draw of the control's, 'lost' when
    wholly below, else 'overlap' (the intervals cannot tell them apart)."""
    if (metric_row["ppl_ci_low"] > control_rows["ppl_ci_high"]).all():
        return "beat"
    if (metric_row["ppl_ci_high"] < control_rows["ppl_ci_low"]).all():
        return "lost"
    return "overlap"


def findings(results: pd.DataFrame | None, calibration_tokens: int | None, stability: dict | None = None,
             ablation: dict | None = None, quantization: dict | None = None) -> dict:
    """`per_k`: at each K's full set (its largest ratio), every method's damage per weight, the most
    damaging method, and each metric's verdict against each control; `sentences`: the same in words.
    Without perturbation results (--no-perturbation), only the calibration set's size is judged.
    `stability`: `analysis.stability.summarize` of the run's folds, where it ran; `ablation` and
    `quantization`: the summary's `ablation_study` and `quantization_study`, where they ran."""
    per_k, sentences = [], []
    ok = results[(results["status"] == "ok") & results["ppl_ratio"].notna()] if results is not None else None
    for k, at_k in ([] if ok is None or ok.empty else ok.groupby("topk", sort=True)):
        at = at_k[at_k["mask_ratio"] == at_k["mask_ratio"].max()]
        n = int(at["weights_masked"].iloc[0])
        damage = {m: float(g.apply(damage_per_weight, axis=1).mean()) for m, g in at.groupby("metric")}
        finite = {m: d for m, d in damage.items() if math.isfinite(d)}
        top = max(finite, key=finite.get) if finite else None
        entry = {"topk": int(k), "weights": n, "damage_per_weight_nats": damage, "most_damaging": top,
                 "verdicts": {}}
        if top is not None:
            sentences.append(f"At K = {k} ({n} weights perturbed), {top} did the most damage per weight: "
                             f"{finite[top]:.3g} nats of mean NLL per weight (×{math.exp(finite[top] * n):.3g} "
                             f"perplexity).")
        controls = {m: g for m, g in at[at["is_control"]].groupby("metric")}
        for _, row in at[~at["is_control"]].sort_values("metric").iterrows():
            # A same-tensor control is only this metric's control when it copies this metric's tensors.
            verdicts = {c: _verdict(row, g) for c, g in controls.items()
                        if same_tensor_metric(c) in (None, row["metric"])}
            entry["verdicts"][row["metric"]] = verdicts
            if verdicts:
                sentences.append(_verdict_sentence(row, verdicts, controls))
        per_k.append(entry)
    small = calibration_tokens is not None and calibration_tokens < SMALL_CALIBRATION_TOKENS
    if small and not stability:
        sentences.append(f"The calibration set is small ({calibration_tokens:,} predicted tokens, under "
                         f"{SMALL_CALIBRATION_TOKENS:,}): the top-K may change with other texts; measure it with "
                         "--stability-folds, or rerun with more text (--eval-limit, --dataset), before relying on "
                         "single weights.")
    sentences += [_stability_sentence(m, int(k), s) for m, by_k in (stability or {}).items() for k, s in by_k.items()]
    out = {"per_k": per_k, "small_calibration": small, "sentences": sentences}
    if ablation and ablation.get("metrics"):
        out["ablation"] = _ablation_findings(ablation, sentences)
    if quantization and quantization.get("rows"):
        out["quantization"] = _quantization_findings(quantization, sentences)
    return out


def _ablation_findings(study: dict, sentences: list[str]) -> dict:
    """Which metric's score best ranked the damage of zeroing single weights (Spearman ρ), and
    whether its interval lies clear of every other metric's."""
    rho = {m: v["spearman"] for m, v in study["metrics"].items() if math.isfinite(v["spearman"])}
    if not rho:
        return {"best_predictor": None, "separated": False}
    best = max(rho, key=rho.get)
    low = study["metrics"][best]["spearman_ci"][0]
    others = [m for m in rho if m != best]
    separated = bool(others) and all(low > study["metrics"][m]["spearman_ci"][1] for m in others)
    parts = [f"{m} ρ {v['spearman']:.2f} (95% CI {v['spearman_ci'][0]:.2f}–{v['spearman_ci'][1]:.2f}; its top "
             f"tenth carries {v['top_tenth_share']:.0%} of the total |ΔNLL|)"
             for m, v in sorted(study["metrics"].items(), key=lambda kv: -rho.get(kv[0], -math.inf))]
    judged = (f"{best} ranks it best, its interval clear of the others'" if separated else
              f"{best} ranks it best by the point estimate, but the intervals overlap" if others else
              f"{best} is the only metric")
    sentences.append(f"Zeroing each of {study['measured']} studied weights alone, the score's rank correlation "
                     f"with the measured damage (ΔNLL) is: {'; '.join(parts)}. {judged}.")
    return {"best_predictor": best, "separated": separated}


def _quantization_findings(study: dict, sentences: list[str]) -> dict:
    """Per kept set, whether keeping it changed the quantized model's perplexity, by the paired
    interval of its ratio to nothing kept: 'protects' (wholly below 1), 'harms' (wholly above),
    'no measurable effect' (the interval holds 1), 'unknown' without an interval."""
    rows = [r for r in study["rows"] if r["kept"] != "none" and math.isfinite(r.get("vs_nothing_kept") or math.nan)]
    none = next((r for r in study["rows"] if r["kept"] == "none"), None)
    verdicts: dict[str, list[str]] = {}
    parts = []
    for kept in dict.fromkeys(r["kept"] for r in rows):
        draws = [r for r in rows if r["kept"] == kept]
        words = [_protection(r) for r in draws]
        verdicts[kept] = words
        ratios = [r["vs_nothing_kept"] for r in draws]
        # The span of the draws' intervals; a draw logged without one makes the span unknown
        # (min and max would otherwise keep or drop a NaN by where it stands in the list).
        lows = [r.get("vs_nothing_kept_ci_low", math.nan) for r in draws]
        highs = [r.get("vs_nothing_kept_ci_high", math.nan) for r in draws]
        known = all(math.isfinite(x) for x in lows + highs)
        low, high = (min(lows), max(highs)) if known else (math.nan, math.nan)
        ratio = (f"×{ratios[0]:.4f}" if len(draws) == 1
                 else f"×{min(ratios):.4f}–×{max(ratios):.4f} over {len(draws)} draws")
        interval = f" (paired 95% CI {low:.4f}–{high:.4f})" if math.isfinite(low) and math.isfinite(high) else ""
        word = words[0] if len(set(words)) == 1 else "mixed: " + ", ".join(words)
        if word in ("protects", "harms"):  # how much, so that a tiny but certain effect reads as tiny
            change = sum(ratios) / len(ratios) - 1
            word += f" (perplexity {abs(change):.2%} {'lower' if change < 0 else 'higher'})"
        parts.append(f"keeping {kept} ({draws[0]['weights_kept']} weights) {ratio}{interval}: {word}")
    if parts and none is not None:
        sentences.append(f"Quantized to {study['bits']} bits in blocks of {study['block_size']}, the model's "
                         f"perplexity is {none['perplexity']:.4g} with nothing kept (95% CI {none['ppl_ci_low']:.4g}–"
                         f"{none['ppl_ci_high']:.4g}); against that, {'; '.join(parts)}.")
    return {"verdicts": verdicts}


def _protection(row: dict) -> str:
    low, high = row.get("vs_nothing_kept_ci_low", math.nan), row.get("vs_nothing_kept_ci_high", math.nan)
    if not (math.isfinite(low) and math.isfinite(high)):
        return "unknown"
    return "protects" if high < 1 else "harms" if low > 1 else "no measurable effect"


def _stability_sentence(metric: str, k: int, s: dict) -> str:
    word = "unstable" if s["unstable"] else "stable"
    spread = (f" (pairs {s['fold_overlap_min']:.0%}–{s['fold_overlap_max']:.0%})"
              if s["fold_overlap_min"] != s["fold_overlap_max"] else "")
    return (f"The top {k} by {metric} is {word} over {s['folds']} disjoint folds of the calibration texts: "
            f"the folds share {s['fold_overlap_mean']:.0%} of it{spread}, with Spearman ρ {s['fold_rho_mean']:.2f} "
            f"(95% CI {s['fold_rho_low']:.2f}–{s['fold_rho_high']:.2f}) over the weights either puts in its top {k}; "
            f"each fold shares {s['all_overlap_mean']:.0%} with the whole set's.")


def _verdict_sentence(row, verdicts: dict[str, str], controls: dict[str, pd.DataFrame]) -> str:
    parts = []
    for control, verdict in verdicts.items():
        g = controls[control]
        span = f"{g['ppl_ci_low'].min():.4g}–{g['ppl_ci_high'].max():.4g}"
        word = {"beat": "beat", "lost": "did less damage than", "overlap": "cannot be told apart from"}[verdict]
        parts.append(f"{word} {control} (95% CI {span}{f', {len(g)} draws' if len(g) > 1 else ''})")
    return (f"Top {int(row['weights_masked'])} by {row['metric']}: perplexity {row['perturbed_ppl']:.4g} "
            f"(95% CI {row['ppl_ci_low']:.4g}–{row['ppl_ci_high']:.4g}); it " + "; ".join(parts) + ".")
