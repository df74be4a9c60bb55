"""--quantization-study: the kept sets planned, and their results written as quantization_results.

The study's experiments run in the perturbation stage's actor pool, beside the super weights and
the ablation study (analysis/quantize.py says what one of them does); this module plans them from
the same rankings and controls as the main experiments, and turns their result rows into a table.
"""

from __future__ import annotations

import pandas as pd
import torch

from cwa_dist.analysis.evaluate import bootstrap_intervals
from cwa_dist.analysis.perturb import PerturbationSpec, Targets
from cwa_dist.analysis.quantize import NONE_KEPT, QuantizationSpec, study_specs
from cwa_dist.reporting.outputs import QUANTIZATION_COLUMNS, RunRecord
from cwa_dist.stages.context import Context, LoadedModel


def plan(ctx: Context, loaded: LoadedModel, top_sets: list[PerturbationSpec],
         supers: list[tuple[str, int]]) -> list[QuantizationSpec]:
    """`top_sets`: the main experiments' specs at the largest K, ratio 1 (each metric's top-K and
    its controls); `supers`: the super-weight candidates as (parameter, flat index)."""
    cfg = ctx.cfg.perturbation
    names = sorted({name for name, _ in supers})
    targets = Targets(names, torch.tensor([names.index(n) for n, _ in supers], dtype=torch.int64),
                      torch.tensor([flat for _, flat in supers], dtype=torch.int64)) if supers else None
    matrices = [n for n in loaded.scored if len(loaded.shapes[n]) >= 2]
    return study_specs(top_sets, targets, k=ctx.cfg.analysis.max_k, bits=cfg.quantization_study,
                       block=cfg.quant_block_size, matrices=matrices)


def versus_nothing_kept(none: dict, row: dict, tokens: list[int], *, samples: int, seed: int) -> dict[str, float]:
    """perplexity / nothing kept's, with a paired 95% bootstrap interval: both experiments on the
    same resampled evaluation windows, so the windows' shared difficulty cancels."""
    nan = {"vs_nothing_kept": float("nan"), "vs_nothing_kept_ci_low": float("nan"),
           "vs_nothing_kept_ci_high": float("nan")}
    if none.get("status") != "ok" or row.get("status") != "ok":
        return nan
    ratio = row["perturbed_ppl"] / none["perturbed_ppl"]
    if "window_nll" not in none or "window_nll" not in row:  # logged before windows were kept
        return nan | {"vs_nothing_kept": ratio}
    ci = bootstrap_intervals(tokens, none["window_nll"], row["window_nll"], samples=samples, seed=seed)
    return {"vs_nothing_kept": ratio, "vs_nothing_kept_ci_low": ci["ppl_ratio_ci_low"],
            "vs_nothing_kept_ci_high": ci["ppl_ratio_ci_high"]}


def export(ctx: Context, record: RunRecord, specs: list[QuantizationSpec], rows: dict[str, dict],
           tokens: list[int]) -> pd.DataFrame:
    """quantization_results.csv/.parquet, one row per kept set, and the summary's `quantization_study`.
    `tokens`: the evaluation windows' predicted tokens, in the order of each row's `window_nll`."""
    cfg = ctx.cfg.perturbation
    none = rows.get(next(s.key for s in specs if s.kept == NONE_KEPT), {})
    out = []
    for spec in specs:
        row = rows.get(spec.key)
        if row is None:
            continue
        ppl = row["perturbed_ppl"]
        out.append({
            "kept": spec.kept, "is_control": spec.is_control, "seed": spec.seed, "weights_kept": len(spec.targets),
            "bits": spec.bits, "block_size": spec.block, "baseline_ppl": row["baseline_ppl"], "perplexity": ppl,
            "ppl_ci_low": row["ppl_ci_low"], "ppl_ci_high": row["ppl_ci_high"], "ppl_ratio": row["ppl_ratio"],
            "ppl_ratio_ci_low": row["ppl_ratio_ci_low"], "ppl_ratio_ci_high": row["ppl_ratio_ci_high"],
            **versus_nothing_kept(none, row, tokens, samples=cfg.bootstrap_samples, seed=ctx.cfg.data.seed),
            "restored_exact": row["restored_exact"], "status": row["status"], "key": spec.key,
            # Zero-shot columns, where --eval-tasks ran, as in perturbation_results.
            **{c: v for c, v in row.items() if "." in c},
        })
    table = pd.DataFrame(out)
    table = table[[*QUANTIZATION_COLUMNS, *[c for c in table.columns if c not in QUANTIZATION_COLUMNS]]]
    record.run_dir.write_csv("quantization_results.csv", table)
    record.run_dir.write_parquet("quantization_results.parquet", table)
    record.fact(quantization_study={
        "bits": cfg.quantization_study, "block_size": cfg.quant_block_size,
        "rows": [{c: r[c] for c in ("kept", "seed", "weights_kept", "perplexity", "ppl_ci_low", "ppl_ci_high",
                                    "ppl_ratio", "vs_nothing_kept", "vs_nothing_kept_ci_low",
                                    "vs_nothing_kept_ci_high")} for r in out],
    })
    baseline = table["baseline_ppl"].iloc[0]
    ctx.rep.line(f"🧊 Quantization study: every scored matrix round-to-nearest at {cfg.quantization_study} bits, "
                 f"blocks of {cfg.quant_block_size} along each row (unquantized PPL {baseline:.2f}):")
    for r in table.itertuples(index=False):
        seed = f" (seed {int(r.seed)})" if pd.notna(r.seed) else ""
        ctx.rep.line(f"  kept {r.kept}{seed}, {r.weights_kept} weights: PPL {r.perplexity:.3f} (95% CI "
                     f"{r.ppl_ci_low:.3f}–{r.ppl_ci_high:.3f}), ×{r.vs_nothing_kept:.4f} of nothing kept "
                     f"(paired 95% CI {r.vs_nothing_kept_ci_low:.4f}–{r.vs_nothing_kept_ci_high:.4f})")
    return table
