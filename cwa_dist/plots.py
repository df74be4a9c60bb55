"""PNG figures of a run, drawn from the same tables the run directory holds."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _stacked_bars(ax, table: pd.DataFrame) -> None:
    """One bar per row of `table`, stacked by its columns."""
    bottom = np.zeros(len(table))
    for column in table.columns:
        ax.bar(table.index, table[column].values, bottom=bottom, label=column)
        bottom += table[column].values


def topk_by_layer(rankings: pd.DataFrame):
    """Where each metric's top-K weights sit: count per block, stacked by module kind."""
    metrics = list(dict.fromkeys(rankings["metric"]))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(10, 3.2 * len(metrics)), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        df = rankings[rankings["metric"] == metric]
        where = df["layer_index"].astype("object").where(df["layer_index"].notna(), "other")
        table = pd.crosstab(where.astype(str), df["module"])
        order = sorted(table.index, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0))
        _stacked_bars(ax, table.loc[order])
        ax.set_title(f"top-{len(df)} weights by {metric}")
        ax.set_xlabel("block ('other' = embeddings, final norm, LM head)")
        ax.set_ylabel("weights")
        ax.legend(fontsize=7, ncol=2, loc="upper right")
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig


def perplexity_vs_masked(results: pd.DataFrame, baseline_ppl: float, ax=None):
    """Perturbed perplexity against weights perturbed, metrics beside the controls."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 5))
    finite = results[np.isfinite(results["perturbed_ppl"])]
    for metric, df in finite[~finite["is_control"]].groupby("metric", sort=True):
        pts = df.groupby("weights_masked")["perturbed_ppl"].max()
        ax.plot(pts.index, pts.values, marker="o", label=metric)
    mag = finite[finite["metric"] == "magnitude"].groupby("weights_masked")["perturbed_ppl"].max()
    if len(mag):
        ax.plot(mag.index, mag.values, marker="s", linestyle="--", label="largest |W| (control)")
    rnd = finite[finite["metric"] == "random"].groupby("weights_masked")["perturbed_ppl"]
    if len(finite[finite["metric"] == "random"]):
        mean, lo, hi = rnd.mean(), rnd.min(), rnd.max()
        ax.plot(mean.index, mean.values, marker="^", linestyle=":", label="random (control, mean)")
        ax.fill_between(mean.index, lo.values, hi.values, alpha=0.2)
    ax.axhline(baseline_ppl, color="grey", linewidth=1, label=f"baseline {baseline_ppl:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weights perturbed")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity after perturbing the most critical weights")
    ax.legend(fontsize=8)
    if fig is not None:
        fig.tight_layout()
    return fig


def perplexity_by_model(results: dict[str, pd.DataFrame]):
    """One panel per model: its perturbation curves beside its random and |W| controls."""
    fig, axes = plt.subplots(len(results), 1, figsize=(8, 4.2 * len(results)), squeeze=False)
    for ax, (model, df) in zip(axes[:, 0], results.items()):
        perplexity_vs_masked(df, float(df["baseline_ppl"].iloc[0]), ax=ax)
        ax.set_title(model)
    fig.tight_layout()
    return fig


def depth_by_family(top: dict[str, pd.DataFrame], bins: int = 10):
    """One panel per model: its top-K weights by relative depth (0 = first block, 1 = last),
    stacked by module family; weights outside the blocks (embeddings, LM head) in their own bar."""
    fig, axes = plt.subplots(len(top), 1, figsize=(9, 3.2 * len(top)), squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    labels = [f"{a:.1f}-{b:.1f}" for a, b in zip(edges[:-1], edges[1:])] + ["outside blocks"]
    for ax, (model, df) in zip(axes[:, 0], top.items()):
        where = pd.cut(df["relative_depth"], edges, labels=labels[:-1], include_lowest=True).astype(object)
        where = where.where(df["relative_depth"].notna(), labels[-1])
        _stacked_bars(ax, pd.crosstab(where, df["family"]).reindex(labels, fill_value=0))
        ax.set_title(f"{model}: top-{len(df)} weights by relative depth")
        ax.set_ylabel("weights")
        ax.legend(fontsize=7, loc="upper right")
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
