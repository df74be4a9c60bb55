"""PNG figures of a run, drawn from the same tables the run directory holds."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cwa_dist.reporting.results import same_tensor_rows  # noqa: E402


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


def _draw_controls(ax, finite: pd.DataFrame, column: str) -> None:
    """The controls by weights perturbed: the random draws' mean with their min–max band, the
    largest-|W| control (one experiment per size), and each metric's same-tensor draws' mean."""
    random = finite[finite["metric"] == "random"].groupby("weights_masked")[column]
    if random.ngroups:
        mean = random.mean()
        ax.plot(mean.index, mean.values, marker="^", linestyle=":", color="grey", label="random (control, mean)")
        ax.fill_between(mean.index, random.min().values, random.max().values, color="grey", alpha=0.2,
                        label="random (control, min–max)")
    magnitude = finite[finite["metric"] == "magnitude"].groupby("weights_masked")[column].max()
    if len(magnitude):
        ax.plot(magnitude.index, magnitude.values, marker="s", linestyle="--", color="black",
                label="largest |W| (control)")
    for metric, rows in same_tensor_rows(finite).items():
        mean = rows.groupby("weights_masked")[column].mean()
        ax.plot(mean.index, mean.values, marker="v", linestyle="-.", color="dimgrey",
                label=f"random, same tensors as {metric} (control, mean)")


def _log_axes(ax, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weights perturbed")
    ax.set_ylabel(ylabel)


def perplexity_vs_masked(results: pd.DataFrame, baseline_ppl: float, ax=None):
    """Perturbed perplexity against weights perturbed, metrics beside the controls."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 5))
    finite = results[np.isfinite(results["perturbed_ppl"])]
    for metric, df in finite[~finite["is_control"]].groupby("metric", sort=True):
        pts = df.groupby("weights_masked")["perturbed_ppl"].max()
        ax.plot(pts.index, pts.values, marker="o", label=metric)
    _draw_controls(ax, finite, "perturbed_ppl")
    ax.axhline(baseline_ppl, color="grey", linewidth=1, label=f"baseline {baseline_ppl:.2f}")
    _log_axes(ax, "perplexity")
    ax.set_title("perplexity after perturbing the most critical weights")
    ax.legend(fontsize=8)
    if fig is not None:
        fig.tight_layout()
    return fig


def task_change_curves(results: pd.DataFrame, names: list[str]):
    """Per zero-shot task metric, the change in score against weights perturbed: each metric with
    its paired 95% interval, beside the random controls (mean, min–max band) and the |W| control."""
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        change = f"{name}_change"
        finite = results[np.isfinite(results[change])]
        for metric, df in finite[~finite["is_control"]].groupby("metric", sort=True):
            df = df.sort_values("weights_masked")
            line = ax.plot(df["weights_masked"], df[change], marker="o", label=metric)[0]
            ax.fill_between(df["weights_masked"], df[f"{change}_ci_low"], df[f"{change}_ci_high"],
                            color=line.get_color(), alpha=0.15)
        _draw_controls(ax, finite, change)
        ax.axhline(0, color="grey", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("weights perturbed")
        ax.set_ylabel(f"change in {name}")
        ax.set_title(name)
        ax.legend(fontsize=8)
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


def ratio_curves(results: pd.DataFrame):
    """Perplexity ratio against weights perturbed: each metric with its paired 95% interval, the
    random controls' mean with their min–max band, and the largest-|W| control."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    finite = results[np.isfinite(results["ppl_ratio"])]
    for metric, df in finite[~finite["is_control"]].groupby("metric", sort=True):
        pts = df.sort_values("weights_masked").groupby("weights_masked").first()
        err = np.vstack([pts["ppl_ratio"] - pts["ppl_ratio_ci_low"], pts["ppl_ratio_ci_high"] - pts["ppl_ratio"]])
        ax.errorbar(pts.index, pts["ppl_ratio"], yerr=np.clip(err, 0, None), marker="o", capsize=3, label=metric)
    _draw_controls(ax, finite, "ppl_ratio")
    ax.axhline(1.0, color="grey", linewidth=1)
    _log_axes(ax, "perplexity ratio (perturbed / baseline)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def layer_module_map(top: pd.DataFrame, title: str, blocks: int):
    """A heatmap of where a ranking's top weights are: blocks 0..blocks-1 across, module kinds down."""
    inside = top[top["layer_index"].notna()]
    table = pd.crosstab(inside["module"], inside["layer_index"].astype(int))
    table = table.reindex(columns=range(blocks), fill_value=0)
    outside = top[top["layer_index"].isna()]["module"].value_counts()
    fig, ax = plt.subplots(figsize=(min(14, 2.5 + 0.35 * max(1, table.shape[1])), 1.2 + 0.35 * max(1, table.shape[0])))
    if table.size:
        im = ax.imshow(table.values, aspect="auto", cmap="viridis")
        ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], fontsize=7)
        ax.set_yticks(range(table.shape[0]), list(table.index), fontsize=7)
        fig.colorbar(im, ax=ax, label="weights")
    ax.set_xlabel("block")
    extra = ", ".join(f"{m} {n}" for m, n in outside.items())
    ax.set_title(f"{title}" + (f" (outside the blocks: {extra})" if extra else ""), fontsize=9)
    fig.tight_layout()
    return fig


def overlap_matrix(jaccard: pd.DataFrame):
    """Jaccard index of the metrics' top-K sets."""
    n = len(jaccard)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * n, 1.2 + 0.8 * n))
    im = ax.imshow(jaccard.values, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(n), list(jaccard.columns), rotation=30, fontsize=8)
    ax.set_yticks(range(n), list(jaccard.index), fontsize=8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{jaccard.values[i, j]:.2f}", ha="center", va="center",
                    color="white" if jaccard.values[i, j] < 0.6 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="Jaccard index")
    fig.tight_layout()
    return fig


def score_vs_impact(study: pd.DataFrame, metrics: list[str]):
    """The ablation study: each studied weight's score under each metric against its measured ΔNLL."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.2), squeeze=False)
    measured = study[study["delta_nll"].notna()]
    for ax, m in zip(axes[0], metrics):
        score = measured[f"score_{m}"]
        ax.scatter(score.where(score > 0), measured["delta_nll"], s=12, alpha=0.7)
        if (score > 0).any():
            ax.set_xscale("log")
        ax.set_xlabel(f"{m} score", fontsize=8)
        ax.set_ylabel("ΔNLL when zeroed alone", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (for embedding), then closed."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def save(fig, path) -> None:
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
