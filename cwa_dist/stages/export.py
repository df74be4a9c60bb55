"""The export stage: figures, the summary, report.html, and the console's closing summary."""

from __future__ import annotations

import json

import pandas as pd

from cwa_dist import export
from cwa_dist.analysis.stability import summarize
from cwa_dist.errors import last_line
from cwa_dist.reporting import html_report, plots
from cwa_dist.reporting.findings import findings
from cwa_dist.reporting.memory import peak_rss_bytes
from cwa_dist.reporting.outputs import RunRecord
from cwa_dist.reporting.results import perturbation_summary
from cwa_dist.stages.context import Context


def finish(ctx: Context, record: RunRecord, rankings: pd.DataFrame, results: pd.DataFrame | None) -> None:
    cfg, rep, out = ctx.cfg, ctx.rep, record.run_dir
    with rep.stage("💾 Exporting Results", record.timings, "export"):
        ranked = rankings[rankings["metric"].isin(cfg.analysis.metrics)]
        _write_critical_weights(out, rankings)
        out.write_figure("plots/topk_by_layer.png", plots.topk_by_layer(ranked))
        final: dict = {}
        ok = None if results is None else results[results["status"] == "ok"]
        final["experiments_completed"] = 0 if ok is None else len(ok)
        if ok is not None and len(ok):
            final.update(perturbation_summary(ok))
            out.write_figure("plots/ppl_vs_masked.png", plots.perplexity_vs_masked(ok, ok["baseline_ppl"].iloc[0]))
        else:
            final["max_ppl_increase"] = None
        calibration = record.summary.get("data", {}).get("calibration", {}).get("predicted_tokens")
        stability_path = out.path / "stability.parquet"
        if cfg.analysis.stability_folds and stability_path.is_file():
            final["stability"] = summarize(pd.read_parquet(stability_path))
        final["findings"] = findings(ok, calibration, final.get("stability"),
                                     ablation=record.summary.get("ablation_study"),
                                     quantization=record.summary.get("quantization_study"))
        driver_peak = peak_rss_bytes()
        record.memory(driver={"peak_rss_bytes": driver_peak})
        rep.detail(f"  driver: peak RSS {driver_peak / 2**30:.2f} GiB")
        summary = record.complete(**final, run_directory=out.where, stage_timings_s=dict(record.timings))
        _write_report(ctx, out)
        for f in sorted(p.relative_to(out.path) for p in out.path.rglob("*") if p.is_file()):
            rep.detail(f"  ✅ {f}")
    _final_report(ctx, summary)


def _write_critical_weights(out, rankings: pd.DataFrame) -> None:
    """critical_weights.safetensors and .json: the ranked weights' indices, for other tools."""
    supers_path = out.path / "super_weights.parquet"
    supers = pd.read_parquet(supers_path) if supers_path.is_file() else None
    config = json.loads((out.path / "config.json").read_text())
    out.write_tensors(export.SAFETENSORS, export.critical_tensors(rankings, supers))
    out.write_json(export.SIDECAR, export.sidecar(config, rankings, supers))


def _write_report(ctx: Context, out) -> None:
    """report.html, last: every result is already on disk, so a failure here loses nothing."""
    try:
        out.write_text("report.html", html_report.build(out.path))
    except Exception as e:  # noqa: BLE001 - the run's results stand without the page
        ctx.rep.line(f"⚠️  report.html could not be built ({last_line(e, 200)}); the results are complete. "
                     f"Rebuild it with: python -m cwa_dist.reporting.html_report {out.path}")


def _final_report(ctx: Context, summary: dict) -> None:
    rep = ctx.rep
    rep.line()
    rep.line("🔬 Analysis Complete - Summary")
    rep.rule()
    rep.line(f"🤖 Model: {summary['model_name']}")
    if summary.get("baseline_perplexity") is not None:  # measured by the actors, or the worker without them
        rep.line(f"📏 Baseline PPL: {summary['baseline_perplexity']:.2f}")
    rep.line(f"🎯 Perturbation experiments: {summary['experiments_completed']}")
    if summary.get("max_ppl_increase") is not None:
        rep.line(f"📈 Max PPL increase: {summary['max_ppl_increase']:.2f}")
    best = summary.get("most_impactful_perturbation")
    if best:
        rep.line("🏆 Most Impactful Perturbation:")
        rep.line(f"  {best['metric']} Top-{best['topk']} at {best['mask_ratio']:.0%} masking "
                 f"({best['weights_masked']} weights)")
        rep.line(f"  PPL: {best['baseline_ppl']:.2f} → {best['perturbed_ppl']:.2f} ({best['ppl_increase']:+.2f})")
        for entry in summary["comparison"]:
            if entry["topk"] == best["topk"] and entry["mask_ratio"] == best["mask_ratio"]:
                controls = []
                if "random_mean" in entry:
                    controls.append(f"random {entry['random_mean']:.2f} (mean; {entry['random_min']:.2f}–"
                                    f"{entry['random_max']:.2f} over the seeds)")
                if "magnitude" in entry:
                    controls.append(f"largest |W| {entry['magnitude']:.2f}")
                same = entry.get("random_same_tensor", {}).get(best["metric"])
                if same:
                    controls.append(f"random from the same tensors {same['mean']:.2f} (mean)")
                if controls:
                    rep.line(f"  Controls, same number of weights: {', '.join(controls)}")
    rep.line(f"📁 Results: {summary['run_directory']}")
    rep.line("🎉 Analysis complete!")
