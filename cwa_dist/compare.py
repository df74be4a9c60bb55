"""Cross-model comparison of finished runs (also written at the end of every sweep).

    python -m cwa_dist.compare RUN_DIR [RUN_DIR ...] [--output DIR]

Writes into DIR (default: ./comparison):
  dataset/               one Parquet dataset, hive-partitioned by model: every ranking row
                         (kind=ranking) and every perturbation result (kind=perturbation)
  comparison.csv/.md     one row per model (columns: COMPARISON_COLUMNS)
  topk_depth_by_module.png     where each model's top-K sit, by relative depth and module kind
  perplexity_vs_masked.png     per model: perplexity against weights perturbed, beside the controls
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from cwa_dist.analysis.experiments import same_tensor_method
from cwa_dist.errors import UsageError
from cwa_dist.reporting.outputs import describe_param
from cwa_dist.reporting.results import task_metrics, with_extra_columns
from cwa_dist.settings import path_component

COMPARISON_COLUMNS = {
    "model": "--model of the run",
    "experiment_id": "the run directory's name",
    "num_parameters": "parameters of the model",
    "blocks": "transformer blocks",
    "baseline_perplexity": "perplexity of the unperturbed model on its evaluation windows",
    "metric": "the metric the columns below describe (the run's first)",
    "topk": "the largest K of the run",
    "top_share_mlp": "share of the top-K in MLP matrices",
    "top_share_attention": "share in attention matrices",
    "top_share_embedding": "share in embeddings and the LM head",
    "top_share_other": "share elsewhere (norms, biases)",
    "top_mean_relative_depth": "mean block / (blocks − 1) of the top-K inside blocks (0 first, 1 last)",
    "max_ppl_ratio": "largest perturbed / baseline perplexity over the metric's experiments",
    "at_weights_masked": "weights perturbed in that experiment",
    "random_ppl_ratio_mean": "the random controls' mean ratio at the same K and ratio",
    "magnitude_ppl_ratio": "the largest-|W| control's ratio there",
    "same_tensor_ppl_ratio_mean": "the metric's random-same-tensor controls' mean ratio there",
}
TASK_COLUMNS = {
    "<task>.<metric>_baseline": "with --eval-tasks: the unperturbed model's score on each task metric",
    "<task>.<metric>_change": "its change in the experiment of max_ppl_ratio",
}
"""Added after COMPARISON_COLUMNS, for every task metric any of the runs measured."""


def module_family(module: str) -> str:
    """mlp, attention, embedding or other, from the module kind of a ranking row."""
    m = module.lower()
    if any(k in m for k in ("embed", "wte", "wpe", "lm_head", "embed_out")):
        return "embedding"
    if any(k in m for k in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query_key_value")):
        return "attention"
    if any(k in m for k in ("mlp", "ffn", "feed_forward", "fc", "dense_h_to_4h", "dense_4h_to_h", "experts")):
        return "mlp"
    return "other"


def load_run(run_dir: Path) -> dict:
    """A finished run's summary, rankings and perturbation results, with the block count."""
    summary_path = run_dir / "experiment_summary.json"
    if not summary_path.is_file():
        raise UsageError(f"{run_dir} is not a finished run (no experiment_summary.json)")
    summary = json.loads(summary_path.read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    rankings = pd.read_parquet(run_dir / "rankings.parquet")
    results_path = run_dir / "perturbation_results.parquet"
    results = pd.read_parquet(results_path) if results_path.is_file() else None
    layers = [layer for n in manifest.get("scored_parameters", {}) if (layer := describe_param(n)[0]) is not None]
    return {"id": run_dir.name, "summary": summary, "config": config, "rankings": rankings, "results": results,
            "blocks": max(layers) + 1 if layers else 0}


def model_label(run: dict, taken: set[str]) -> str:
    """A short, unique, path-safe name for a run's model (the partition value)."""
    base = path_component(Path(run["summary"]["model_name"]).name) or run["id"]
    label = base if base not in taken else f"{base}_{run['id']}"
    taken.add(label)
    return label


def top_weights(run: dict) -> pd.DataFrame:
    """The run's largest top-K under its first metric, with each weight's relative depth (block /
    (blocks − 1); empty outside the blocks) and module family."""
    cfg, rankings = run["config"], run["rankings"]
    top = rankings[(rankings["metric"] == cfg["metrics"][0]) & (rankings["rank"] <= max(cfg["topk"]))]
    return top.assign(relative_depth=top["layer_index"].astype(float) / max(run["blocks"] - 1, 1),
                      family=top["module"].map(module_family))


def summary_row(run: dict, label: str) -> dict:
    cfg, summary = run["config"], run["summary"]
    metric, k = cfg["metrics"][0], max(cfg["topk"])
    top = top_weights(run)
    families = top["family"].value_counts(normalize=True)
    depth = top["relative_depth"].dropna()
    row = {"model": label, "experiment_id": run["id"], "num_parameters": summary["num_parameters"],
           "blocks": run["blocks"], "baseline_perplexity": summary["baseline_perplexity"], "metric": metric,
           "topk": k,
           **{f"top_share_{f}": float(families.get(f, 0.0)) for f in ("mlp", "attention", "embedding", "other")},
           "top_mean_relative_depth": float(depth.mean()) if len(depth) else None,
           "max_ppl_ratio": None, "at_weights_masked": None, "random_ppl_ratio_mean": None, "magnitude_ppl_ratio": None,
           "same_tensor_ppl_ratio_mean": None}
    res = run["results"]
    if res is not None:
        ok = res[res["status"] == "ok"]
        mine = ok[ok["metric"] == metric]
        if len(mine):
            best = mine.loc[mine["ppl_ratio"].idxmax()]
            same = ok[(ok["topk"] == best["topk"]) & (ok["mask_ratio"] == best["mask_ratio"])]
            rnd, mag = same[same["metric"] == "random"], same[same["metric"] == "magnitude"]
            tensors = same[same["metric"] == same_tensor_method(metric)]
            row.update(max_ppl_ratio=float(best["ppl_ratio"]), at_weights_masked=int(best["weights_masked"]),
                       random_ppl_ratio_mean=float(rnd["ppl_ratio"].mean()) if len(rnd) else None,
                       magnitude_ppl_ratio=float(mag["ppl_ratio"].iloc[0]) if len(mag) else None,
                       same_tensor_ppl_ratio_mean=float(tensors["ppl_ratio"].mean()) if len(tensors) else None)
            for name in task_metrics(res.columns):
                row[f"{name}_baseline"] = float(best[f"{name}_baseline"])
                row[f"{name}_change"] = float(best[f"{name}_change"])
    return row


def dataset_frame(run: dict, label: str) -> pd.DataFrame:
    """Rankings and perturbation results of one run, in one frame: `kind` says which."""
    parts = [run["rankings"].assign(kind="ranking")]
    if run["results"] is not None:
        parts.append(run["results"].assign(kind="perturbation"))
    frame = pd.concat(parts, ignore_index=True, sort=False)
    return frame.assign(model=label, experiment_id=run["id"])


def compare(run_dirs: list[Path], output: Path) -> pd.DataFrame:
    """Write the comparison of `run_dirs` into `output`; return the one-row-per-model table."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from cwa_dist.reporting import plots

    if not run_dirs:
        raise UsageError("nothing to compare: give at least one finished run directory")
    runs = [load_run(Path(d)) for d in run_dirs]
    taken: set[str] = set()
    labels = [model_label(r, taken) for r in runs]
    output.mkdir(parents=True, exist_ok=True)
    frame = pd.concat([dataset_frame(r, lab) for r, lab in zip(runs, labels)], ignore_index=True, sort=False)
    # Mixed object columns (e.g. seed: ints and None) become strings only where they must.
    for col in frame.columns[frame.dtypes == object]:  # noqa: E721 (pandas dtype test)
        if col not in ("model", "kind"):
            frame[col] = frame[col].map(lambda v: None if v is None or (isinstance(v, float) and v != v) else str(v))
    ds.write_dataset(pa.Table.from_pandas(frame, preserve_index=False), output / "dataset", format="parquet",
                     partitioning=["model"], partitioning_flavor="hive", existing_data_behavior="delete_matching")
    rows = [summary_row(r, lab) for r, lab in zip(runs, labels)]
    table = pd.DataFrame(rows, columns=with_extra_columns(COMPARISON_COLUMNS, rows))
    table.to_csv(output / "comparison.csv", index=False)
    (output / "comparison.md").write_text(_markdown(table))
    depth = {lab: top_weights(r) for r, lab in zip(runs, labels)}
    plots.save(plots.depth_by_family(depth), output / "topk_depth_by_module.png")
    curves = {lab: r["results"][r["results"]["status"] == "ok"] for r, lab in zip(runs, labels)
              if r["results"] is not None and (r["results"]["status"] == "ok").any()}
    if curves:
        plots.save(plots.perplexity_by_model(curves), output / "perplexity_vs_masked.png")
    return table


def _markdown(table: pd.DataFrame) -> str:
    def cell(v):
        if v is None or (isinstance(v, float) and v != v):
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from cwa_dist.run import report_errors

    ap = argparse.ArgumentParser(prog="python -m cwa_dist.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--output", type=Path, default=Path("comparison"))
    ns = ap.parse_args(argv)

    def work():
        table = compare(ns.run_dirs, ns.output)
        print(f"📊 Comparison of {len(table)} run(s): {ns.output}\n{table.to_string(index=False)}")

    return report_errors(work, verbose=False)


if __name__ == "__main__":
    sys.exit(main())
