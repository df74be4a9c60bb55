"""report.html: one self-contained page per run (figures embedded as data URIs, no external file,
script or font), built from the run directory's own files, so it can be rebuilt at any time:

    python -m cwa_dist.reporting.html_report outputs/<run id>
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from pathlib import Path

import pandas as pd

from cwa_dist.reporting import plots
from cwa_dist.reporting.results import same_tensor_rows, task_metrics

TOP_ROWS = 20  # rows of each ranking shown on the page (the CSVs hold all K)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .85em; margin: .6em 0; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { font-size: .85em; color: #555; }
.facts td { text-align: left; } .wide { overflow-x: auto; } .muted { color: #666; font-size: .9em; }
"""


def _read(run: Path, name: str) -> pd.DataFrame | None:
    path = run / name
    return pd.read_parquet(path) if path.exists() else None


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if math.isfinite(x) else str(x)
    return str(x)


def _table(df: pd.DataFrame) -> str:
    table = df.to_html(index=False, escape=True, na_rep="–", float_format=lambda v: _fmt(float(v)), border=0)
    return f'<div class="wide">{table}</div>'  # a wide table scrolls on its own, not the page


def _figure(fig, caption: str) -> str:
    data = base64.b64encode(plots.png_bytes(fig)).decode("ascii")
    alt = html.escape(caption, quote=True)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _ratio(r: dict | pd.Series) -> str:
    low, high = _fmt(float(r["ppl_ratio_ci_low"]), 3), _fmt(float(r["ppl_ratio_ci_high"]), 3)
    return f"×{_fmt(float(r['ppl_ratio']), 3)} (95% CI {low}–{high})"


def _position(r) -> str:
    col, expert = r["col"], r.get("expert")
    first = "" if expert is None or pd.isna(expert) else f"expert {expert}: "
    return f"{r['param']}[{first}{r['row']}" + ("" if pd.isna(col) else f", {col}") + "]"


def headline(summary: dict, config: dict, rankings: pd.DataFrame, results: pd.DataFrame | None,
             supers: pd.DataFrame | None) -> list[str]:
    """The findings a reader wants first, each one sentence, from the run's numbers."""
    out = []
    low, high = (summary.get("baseline_perplexity_ci") or [None, None])
    out.append(f"Baseline perplexity {_fmt(summary.get('baseline_perplexity'))} (95% CI {_fmt(low)}–{_fmt(high)}) "
               f"on {summary.get('data', {}).get('evaluation', {}).get('predicted_tokens', '?')} evaluation tokens.")
    for metric in config["metrics"]:
        first = rankings[(rankings["metric"] == metric) & (rankings["rank"] == 1)]
        if len(first):
            top = first.iloc[0]
            out.append(f"Most critical weight by {metric}: {_position(top)} (w = {_fmt(float(top['weight']))}).")
    if results is not None and len(results):
        ok = results[results["status"] == "ok"]
        largest = ok["weights_masked"].max()
        at = ok[ok["weights_masked"] == largest]
        mode = config.get("perturbation_mode")
        verb = "Zeroing" if mode == "zero" else f"Perturbing ({mode})"
        rnd = at[at["metric"] == "random"]["ppl_ratio"]
        controls = []
        if len(rnd):
            controls.append(f"{len(rnd)} random draws ×{_fmt(float(rnd.min()), 3)}–×{_fmt(float(rnd.max()), 3)}")
        mag = at[at["metric"] == "magnitude"]
        if len(mag):
            controls.append(f"largest |W| {_ratio(mag.iloc[0])}")
        same = same_tensor_rows(at)
        for _, r in at[~at["is_control"]].sort_values("metric").iterrows():
            own = list(controls)
            if r["metric"] in same:
                drawn = same[r["metric"]]["ppl_ratio"]
                own.append(f"random from the same tensors ×{_fmt(float(drawn.min()), 3)}–×{_fmt(float(drawn.max()), 3)}"
                           f" ({len(drawn)} draw{'s' if len(drawn) > 1 else ''})")
            out.append(f"{verb} the top {largest} weights by {r['metric']}: "
                       f"perplexity {_fmt(float(r['baseline_ppl']))} → "
                       f"{_fmt(float(r['perturbed_ppl']))}, {_ratio(r)}; controls of the same size: "
                       f"{'; '.join(own) or 'none'}.")
    out.extend(summary.get("findings", {}).get("sentences", []))
    if supers is not None and len(supers):
        best = supers.sort_values("ppl_ratio", ascending=False).iloc[0]
        out.append(f"Super-weight candidate {_position(best)}: zeroing this one weight alone gives {_ratio(best)}.")
    study = summary.get("ablation_study")
    if study and study.get("metrics"):
        rho = {m: s["spearman"] for m, s in study["metrics"].items()
               if s["spearman"] is not None and not math.isnan(s["spearman"])}
        if rho:
            m = max(rho, key=rho.get)
            s = study["metrics"][m]
            out.append(f"Over {study['measured']} weights zeroed one at a time, {m} predicts the measured impact best: "
                       f"Spearman ρ = {_fmt(s['spearman'], 3)} (95% CI {_fmt(s['spearman_ci'][0], 3)}–"
                       f"{_fmt(s['spearman_ci'][1], 3)}).")
    return out


def ratio_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (K, ratio): each metric's ratio [interval], the random controls' mean (min–max),
    the largest-|W| control, and each metric's random-same-tensor controls' mean (min–max)."""
    rows = []
    for (k, r), df in results.groupby(["topk", "mask_ratio"], sort=True):
        row = {"K": int(k), "ratio": float(r), "weights": int(df["weights_masked"].iloc[0])}
        for _, e in df[~df["is_control"]].sort_values("metric").iterrows():
            row[e["metric"]] = (f"×{_fmt(float(e['ppl_ratio']), 3)} [{_fmt(float(e['ppl_ratio_ci_low']), 3)}–"
                                f"{_fmt(float(e['ppl_ratio_ci_high']), 3)}]")
        rnd = df[df["metric"] == "random"]["ppl_ratio"]
        if len(rnd):
            row["random (mean, min–max)"] = (f"×{_fmt(float(rnd.mean()), 3)} ({_fmt(float(rnd.min()), 3)}–"
                                             f"{_fmt(float(rnd.max()), 3)})")
        mag = df[df["metric"] == "magnitude"]
        if len(mag):
            row["largest |W|"] = f"×{_fmt(float(mag['ppl_ratio'].iloc[0]), 3)}"
        for metric, g in same_tensor_rows(df).items():
            drawn = g["ppl_ratio"]
            row[f"same tensors as {metric} (mean, min–max)"] = (
                f"×{_fmt(float(drawn.mean()), 3)} ({_fmt(float(drawn.min()), 3)}–{_fmt(float(drawn.max()), 3)})")
        rows.append(row)
    return pd.DataFrame(rows)


def jaccard(rankings: pd.DataFrame) -> pd.DataFrame:
    """Jaccard index |A ∩ B| / |A ∪ B| of every pair of rankings' top-K sets (K = the largest)."""
    sets = {m: set(zip(df["param"], df["flat_index"])) for m, df in rankings.groupby("metric", sort=False)}
    names = list(sets)
    return pd.DataFrame([[len(sets[a] & sets[b]) / max(1, len(sets[a] | sets[b])) for b in names] for a in names],
                        index=names, columns=names)


def build(run: Path) -> str:
    """The page for the run directory `run` (a finished run, or one stopped after the ranking)."""
    summary = json.loads((run / "experiment_summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    rankings = _read(run, "rankings.parquet")
    results = _read(run, "perturbation_results.parquet")
    supers = _read(run, "super_weights.parquet")
    study = _read(run, "ablation_study.parquet")
    title = f"Critical-weight analysis: {summary.get('model_name', config['model'])}"
    parts = [f"<h1>{html.escape(title)}</h1>"]

    data = summary.get("data", {})
    facts = {
        "model": summary.get("model_name"), "parameters": f"{summary.get('num_parameters', 0):,}",
        "weights scored": f"{summary.get('num_scored_weights', 0):,}", "metrics": ", ".join(config["metrics"]),
        "K": ", ".join(map(str, config["topk"])), "perturbation": config.get("perturbation_mode"),
        "device / dtype": f"{config.get('device')} / {config.get('dtype')}",
        "gradient backend": (summary.get("sensitivity") or {}).get("backend", "–"),
        "data": f"{data.get('texts', '?')} texts, {data.get('windows', '?')} windows "
                f"of ≤{data.get('seq_len', '?')} tokens"
                + (f", stride {data['stride']}" if data.get("stride") else ""),
        "run directory": summary.get("run_directory", str(run)),
    }
    parts.append('<table class="facts">' + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items()) + "</table>")

    parts.append("<h2>Headline findings</h2><ul>" + "".join(
        f"<li>{html.escape(line)}</li>" for line in headline(summary, config, rankings, results, supers)) + "</ul>")

    if results is not None and len(results[results["status"] == "ok"]):
        ok = results[results["status"] == "ok"]
        main = ok[~ok["metric"].isin(["super_weight", "ablation"])]
        parts.append("<h2>Perturbation curves</h2>")
        parts.append(_figure(plots.ratio_curves(main),
                             "Perplexity ratio against weights perturbed: each metric with its "
                             "paired 95% bootstrap interval, beside the random controls (mean, min–max band) and the "
                             "largest-|W| control."))
        parts.append('<p class="muted">Perplexity ratio of each experiment, with its paired 95% interval; every '
                     "experiment's perplexities are in perturbation_results.csv.</p>")
        parts.append(_table(ratio_table(main)))
        names = task_metrics(main.columns)
        if names:
            parts.append("<h2>Zero-shot accuracy</h2>")
            parts.append(_figure(plots.task_change_curves(main, names),
                                 "Change in each zero-shot task metric (perturbed − baseline) against weights "
                                 "perturbed: each metric with its paired 95% bootstrap interval over the task's "
                                 "examples, beside the random controls and the largest-|W| control."))
            shown = ["metric", "topk", "mask_ratio", "weights_masked"] + [
                c for n in names for c in (f"{n}_baseline", n, f"{n}_change", f"{n}_change_ci_low",
                                           f"{n}_change_ci_high")]
            parts.append(_table(main[shown]))

    if supers is not None and len(supers):
        parts.append("<h2>Super-weight candidates</h2>")
        parts.append('<p class="muted">From activation outliers of the MLP down-projections (Yu et al. 2024); each '
                     "zeroed alone. rank_&lt;metric&gt; is its rank under that ranking, empty outside its top-K.</p>")
        parts.append(_table(supers))

    parts.append("<h2>Rankings</h2>")
    for metric, df in rankings.groupby("metric", sort=False):
        note = " (the largest-|W| control)" if metric not in config["metrics"] else ""
        parts.append(f"<h3>{html.escape(metric)}{note}: top {min(TOP_ROWS, len(df))} of {len(df)}</h3>")
        parts.append(_table(df.head(TOP_ROWS)[["rank", "param", "row", "col", "score", "weight", "grad"]]))

    parts.append("<h2>Where the critical weights are</h2>")
    blocks = int(rankings["layer_index"].max()) + 1 if rankings["layer_index"].notna().any() else 0
    for metric, df in rankings.groupby("metric", sort=False):
        parts.append(_figure(plots.layer_module_map(df, f"top-{len(df)} by {metric}", blocks),
                             f"Top-{len(df)} weights by {metric}: count per block and module kind."))

    overlap = jaccard(rankings)
    parts.append("<h2>Metric overlap</h2>")
    parts.append(_figure(plots.overlap_matrix(overlap),
                         "Jaccard index of the rankings' top-K sets (1 = the same weights)."))

    quantized = _read(run, "quantization_results.parquet")
    if quantized is not None and len(quantized):
        parts.append("<h2>Quantization study</h2>")
        parts.append(f'<p class="muted">Every scored matrix round-to-nearest at {config.get("quantization_study")} '
                     f'bits in blocks of {config.get("quant_block_size")} along each row, each block scaled by its '
                     "largest |w| after the kept weights are taken out; the kept weights stay at full precision "
                     "(a dense-and-sparse split). Perplexity with its 95% interval, against the unquantized model "
                     "and against nothing kept (a paired interval: both on the same resampled windows).</p>")
        columns = ["kept", "seed", "weights_kept", "perplexity", "ppl_ci_low", "ppl_ci_high", "ppl_ratio",
                   "vs_nothing_kept", "vs_nothing_kept_ci_low", "vs_nothing_kept_ci_high"]
        parts.append(_table(quantized[[c for c in columns if c in quantized]]))

    stability = _read(run, "stability.parquet")
    if stability is not None and len(stability):
        parts.append("<h2>Ranking stability</h2>")
        parts.append(f'<p class="muted">The calibration texts dealt into {config.get("stability_folds")} disjoint '
                     "folds, each ranked on its own. overlap: the share of a's top-K in b's top-K; Spearman ρ of "
                     "the two rankings' scores over the weights either puts in its top-K, with a bootstrap interval "
                     "over those weights. rankings.parquet's inclusion_frequency is the share of folds whose top-K "
                     "holds each weight.</p>")
        parts.append(_table(stability))

    if study is not None and summary.get("ablation_study"):
        s = summary["ablation_study"]
        parts.append("<h2>Does sensitivity predict impact?</h2>")
        parts.append(f'<p class="muted">{s["measured"]} weights (the top of every metric and random ones), each zeroed '
                     "alone; ΔNLL is the change in mean evaluation NLL. Spearman's ρ between score and ΔNLL, with a "
                     "bootstrap interval over the weights, and the share of the total |ΔNLL| the top tenth by score "
                     "carries.</p>")
        rows = pd.DataFrame([{"metric": m, "spearman": v["spearman"], "ci_low": v["spearman_ci"][0],
                              "ci_high": v["spearman_ci"][1], "top_tenth_share": v["top_tenth_share"]}
                             for m, v in s["metrics"].items()])
        parts.append(_table(rows))
        metrics = [m for m in s["metrics"] if f"score_{m}" in study.columns]
        if metrics:
            parts.append(_figure(plots.score_vs_impact(study, metrics), "Each studied weight's score against its "
                                 "measured ΔNLL."))

    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.name != "report.html")
    parts.append("<h2>Files of this run</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in files) + "</ul>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cwa_dist.reporting.html_report",
                                     description="(Re)build report.html of a run directory.")
    parser.add_argument("run", help="the run directory (holding experiment_summary.json)")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if not (run / "experiment_summary.json").exists():
        print(f"error: {run} holds no experiment_summary.json: not a finished run directory", file=sys.stderr)
        return 2
    (run / "report.html").write_text(build(run), encoding="utf-8")
    print(run / "report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
