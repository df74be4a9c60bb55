"""The run directory: the driver is the only writer, and every file lands atomically.

Schemas (column → meaning) are declared once here and written into the README.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from cwa_dist.analysis.experts import position
from cwa_dist.analysis.sensitivity import unravel
from cwa_dist.analysis.topk import Candidates
from cwa_dist.errors import UsageError

RANKING_COLUMNS = {
    "metric": "metric the weights are ranked by",
    "rank": "1 = most critical",
    "param": "parameter name, as in model.named_parameters()",
    "flat_index": "index into the flattened parameter",
    "expert": "the expert, in a mixture-of-experts tensor that holds all of a layer's experts (else empty)",
    "row": "first index of the unravelled position (within the expert's matrix, for an experts tensor)",
    "col": "second index (empty for 1-D parameters)",
    "layer_index": "transformer block number (empty for embeddings, final norm, LM head)",
    "module": "module kind within the block, e.g. mlp.down_proj",
    "score": "the metric's value",
    "weight": "the weight's value",
    "grad": "its gradient of the calibration mean NLL",
}
QUANTIZATION_COLUMNS = {
    "kept": "what stayed at full precision: none, a metric's top-K, random, magnitude, "
            "random_same_tensor[<metric>] (the main experiments' controls of the largest K), super_weights",
    "is_control": "a control's kept set",
    "seed": "the control's seed (empty otherwise)",
    "weights_kept": "weights kept at full precision",
    "bits": "--quantization-study",
    "block_size": "--quant-block-size",
    "baseline_ppl": "perplexity of the unquantized model",
    "perplexity": "perplexity with every scored matrix quantized and the kept weights at full precision",
    "ppl_ci_low": "its 95% bootstrap interval over evaluation windows, low end",
    "ppl_ci_high": "high end",
    "ppl_ratio": "perplexity / baseline_ppl",
    "ppl_ratio_ci_low": "its paired 95% bootstrap interval, low end",
    "ppl_ratio_ci_high": "high end",
    "vs_nothing_kept": "perplexity / the perplexity with nothing kept",
    "vs_nothing_kept_ci_low": "its paired 95% bootstrap interval (both on the same resampled windows), low end",
    "vs_nothing_kept_ci_high": "high end",
    "restored_exact": "every quantized matrix had its loaded bytes again afterwards",
    "status": "ok or failed",
    "key": "the experiment's key in perturbation_results.jsonl",
}
INCLUSION_COLUMN = {
    "inclusion_frequency": "with --stability-folds only: the share of folds whose own top-K (K the largest --topk) "
                           "holds the weight; empty for the |W| control, which reads no text",
}
STABILITY_COLUMNS = {
    "metric": "metric the rankings are by",
    "k": "K of the top-K compared",
    "a": "one ranking: fold_1, fold_2, ... (its fold of the calibration texts alone)",
    "b": "the other: all (the whole calibration set) or a later fold",
    "shared": "weights in both top-K",
    "overlap": "shared / K",
    "union": "weights in either top-K",
    "spearman_rho": "Spearman ρ of a's and b's scores over those weights",
    "rho_low": "its 95% bootstrap interval (1,000 resamples of the weights), low end",
    "rho_high": "high end",
}
# The original tool's columns first, so its readers keep working.
TOPK_CSV_COLUMNS = ["rank", "layer", "indices", "sensitivity"] + [
    c for c in RANKING_COLUMNS if c not in ("rank", "score", "metric", "param")
]
PERTURBATION_COLUMNS = {
    "metric": "metric name, or the control: random / magnitude / random_same_tensor[<metric>] (drawn "
              "within each tensor, as many as <metric>'s selection holds there)",
    "topk": "K of the ranking",
    "mask_ratio": "share of the top-K perturbed",
    "weights_masked": "weights perturbed: ⌈mask_ratio·K⌉",
    "baseline_ppl": "perplexity of the unperturbed model on the same chunks",
    "perturbed_ppl": "perplexity with the weights perturbed (inf if it overflows)",
    "ppl_increase": "perturbed_ppl − baseline_ppl",
    "ppl_ratio": "perturbed_ppl / baseline_ppl",
    "ppl_ci_low": "perturbed_ppl's 95% bootstrap interval over evaluation windows, lower end",
    "ppl_ci_high": "its upper end",
    "ppl_ratio_ci_low": "ppl_ratio's 95% paired bootstrap interval (the same resampled windows for both models), "
                        "lower end",
    "ppl_ratio_ci_high": "its upper end",
    "is_control": "true for the random, magnitude and random-same-tensor controls",
    "seed": "a random control's seed (empty otherwise)",
    "mode": "perturbation mode, e.g. zero",
    "eval_tokens": "predicted tokens the perplexity is over",
    "wall_s": "seconds the experiment took on its actor",
    "restored_exact": "the model was bitwise identical after restoring",
    "actor": "host:pid of the evaluation actor",
    "key": "unique experiment key",
    "status": "ok, or failed (the actor died more than --max-retries times, or the experiment raised)",
    "error": "why it failed (empty when ok)",
}

SUPER_WEIGHT_COLUMNS = {
    "layer": "transformer block of the MLP down-projection",
    "param": "the weight's parameter name",
    "expert": "the expert, in a mixture-of-experts layer's fused experts tensor (else empty)",
    "row": "first index into the weight as stored (within the expert's matrix)",
    "col": "second index",
    "flat_index": "index into the flattened parameter",
    "output_channel": "the down-projection's output channel with the massive activation",
    "input_channel": "its input channel with the largest |activation| at that token",
    "max_output_activation": "largest |output| of that down-projection over the prompts",
    "max_input_activation": "|input| of the input channel at the same token",
    "weight": "the weight's value",
    "baseline_ppl": "perplexity of the unperturbed model",
    "zeroed_ppl": "perplexity with this one weight zeroed",
    "ppl_ratio": "zeroed_ppl / baseline_ppl",
    "ppl_ratio_ci_low": "its 95% paired bootstrap interval, lower end",
    "ppl_ratio_ci_high": "its upper end",
    "restored_exact": "the weight was restored bit for bit",
    "rank_<metric>": "its rank under each metric's ranking and the magnitude ranking; empty when outside that top-K",
}

_LAYER = re.compile(r"\.(\d+)\.")


def describe_param(name: str) -> tuple[int | None, str]:
    """(block number, module kind): 'model.layers.3.mlp.down_proj.weight' → (3, 'mlp.down_proj'),
    and a fused experts tensor keeps its projection: 'mlp.experts.down_proj'; outside the blocks
    the module is the owning module's own name, e.g. 'embed_tokens'."""
    owner = name.rsplit(".", 1)[0] if "." in name else name
    m = _LAYER.search(name)
    if m:
        rest = name[m.end() :]
        if rest.rsplit(".", 2)[-2:-1] == ["experts"]:
            return int(m.group(1)), rest
        return int(m.group(1)), rest.rsplit(".", 1)[0] if "." in rest else rest
    return None, owner.rsplit(".", 1)[-1]


def ranking_frame(metric: str, c: Candidates, shapes: dict[str, Sequence[int]]) -> pd.DataFrame:
    names = c.names()
    flat = c.flat_index.tolist()
    pos = [unravel(i, shapes[n]) for n, i in zip(names, flat)]
    where = [position(n, shapes[n], i) for n, i in zip(names, flat)]
    layer = [describe_param(n) for n in names]
    return pd.DataFrame(
        {
            "metric": metric,
            "rank": range(1, len(c) + 1),
            "param": names,
            "flat_index": flat,
            "expert": pd.array([e for e, _, _ in where], dtype="Int64"),
            "row": pd.array([r for _, r, _ in where], dtype="Int64"),
            "col": pd.array([c for _, _, c in where], dtype="Int64"),
            "layer_index": pd.array([li for li, _ in layer], dtype="Int64"),
            "module": [mod for _, mod in layer],
            "score": c.score.double().numpy(),
            "weight": c.weight.double().numpy(),
            "grad": c.grad.double().numpy(),
            "indices": [str(p) for p in pos],
        }
    )


def super_weight_table(found: list, rows: dict, rankings: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per super-weight candidate (SUPER_WEIGHT_COLUMNS), from the detection, its
    experiment's result row (keyed by the experiment key) and the rankings; with --eval-tasks, each
    task metric's columns follow (as in perturbation_results)."""
    from cwa_dist.analysis.experiments import super_weight_spec
    from cwa_dist.reporting.results import TASK_SUFFIXES, task_metrics, with_extra_columns

    out = []
    for c in found:
        row = rows.get(super_weight_spec(c).key, {})
        entry = {k: getattr(c, k) for k in ("layer", "param", "expert", "row", "col", "flat_index", "output_channel",
                                            "input_channel", "max_output_activation", "max_input_activation",
                                            "weight")}
        entry.update(baseline_ppl=row.get("baseline_ppl"), zeroed_ppl=row.get("perturbed_ppl"),
                     ppl_ratio=row.get("ppl_ratio"), ppl_ratio_ci_low=row.get("ppl_ratio_ci_low"),
                     ppl_ratio_ci_high=row.get("ppl_ratio_ci_high"), restored_exact=row.get("restored_exact"))
        for m in metrics:
            hit = rankings[(rankings["metric"] == m) & (rankings["param"] == c.param)
                           & (rankings["flat_index"] == c.flat_index)]
            entry[f"rank_{m}"] = int(hit["rank"].iloc[0]) if len(hit) else None
        entry.update({name + s: row[name + s] for name in task_metrics(row) for s in TASK_SUFFIXES})
        out.append(entry)
    columns = with_extra_columns([k for k in SUPER_WEIGHT_COLUMNS if k != "rank_<metric>"]
                                 + [f"rank_{m}" for m in metrics], out)
    table = pd.DataFrame(out, columns=columns)
    for m in metrics:
        table[f"rank_{m}"] = table[f"rank_{m}"].astype("Int64")
    return table


def candidates_from_rankings(rankings: pd.DataFrame) -> dict[str, Candidates]:
    """The per-metric candidates back from rankings.parquet (for a resumed run)."""
    out = {}
    for metric, df in rankings.groupby("metric", sort=False):
        df = df.sort_values("rank")
        names = sorted(set(df["param"]))
        position = {n: i for i, n in enumerate(names)}
        out[metric] = Candidates(
            names,
            torch.tensor([position[n] for n in df["param"]], dtype=torch.int64),
            torch.tensor(df["flat_index"].to_numpy(), dtype=torch.int64),
            torch.tensor(df["score"].to_numpy()),
            torch.tensor(df["weight"].to_numpy()),
            torch.tensor(df["grad"].to_numpy()),
        )
    return out


def topk_csv_frame(ranking: pd.DataFrame, k: int) -> pd.DataFrame:
    top = ranking.head(k).rename(columns={"param": "layer", "score": "sensitivity"})
    return top[TOPK_CSV_COLUMNS]


def _json_safe(obj):
    # JSON has no inf/nan; write them as strings a reader can still parse with float().
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class RunDirectory:
    """One run's files. `on_write(path)` is called after each file lands (it uploads the file when
    --output is a URI)."""

    def __init__(self, path: Path, on_write=None, where: str | None = None):
        self.path = path
        self.on_write = on_write
        self.where = where or str(path)

    @staticmethod
    def create(path: Path, *, on_write=None, where: str | None = None, exists_ok: bool = False) -> RunDirectory:
        """The directory of a new run (refusing one that holds files), or of a run to continue."""
        where = where or str(path)
        if not exists_ok and path.exists() and any(path.iterdir()):
            raise UsageError(f"run directory {where} already exists and is not empty; choose another --experiment-id")
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UsageError(f"cannot write to {path} ({e.strerror}); choose a writable --output") from None
        return RunDirectory(path, on_write, where)

    def _atomic(self, name: str, write) -> Path:
        final = self.path / name
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.on_write:
            self.on_write(final)
        return final

    def write_json(self, name: str, obj) -> Path:
        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(_json_safe(obj), f, indent=2, allow_nan=False)
                f.write("\n")

        return self._atomic(name, write)

    def write_csv(self, name: str, df: pd.DataFrame) -> Path:
        return self._atomic(name, lambda tmp: df.to_csv(tmp, index=False))

    def write_parquet(self, name: str, df: pd.DataFrame) -> Path:
        return self._atomic(name, lambda tmp: df.to_parquet(tmp, index=False))

    def write_text(self, name: str, text: str) -> Path:
        return self._atomic(name, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def write_tensors(self, name: str, tensors: dict) -> Path:
        from safetensors.torch import save_file

        return self._atomic(name, lambda tmp: save_file(tensors, tmp))

    def write_figure(self, name: str, fig) -> Path:
        from cwa_dist.reporting.plots import save

        return self._atomic(name, lambda tmp: save(fig, tmp))  # saved, then closed: pyplot keeps open figures


MANIFEST_FIELDS = {
    "status": "running, failed or complete",
    "started": "when the run was first started (ISO time)",
    "finished": "when it completed",
    "resumed": "how many times it was resumed",
    "error": "why it failed (type: message), while failed",
    "versions": "python, torch, transformers, ray, deepspeed, ... versions",
    "git": "the cwa_dist commit (and whether the tree was dirty)",
    "host": "host name, platform, CPU count",
    "device": "the resolved device: cpu or cuda",
    "plan": "the plan made before any stage: device, dtype, dtype_note (why the weights are rounded, or null), "
            "backend, workers and actors with their resources, estimated peak bytes per process",
    "checkpoint": "where the weights came from: kind (hub, local, gguf), directory, revision (the Hub commit every "
                  "node read), headers_sha256 (every tensor's name, file, dtype and shape), content_sha256 (a "
                  "local checkpoint's files: names and bytes; null for the Hub, whose commit names its bytes), "
                  "files, bytes",
    "corpus": "where the texts came from: kind (bundled, file, hub, saved, files), source, config, split, revision "
              "(a Hub dataset's commit), column, document_split (rows or wikitext), documents",
    "ray": "the Ray cluster's resources when the run started",
    "model_class": "the transformers class of the model",
    "scored_parameters": "name → shape of every scored parameter",
    "stages": "per stage: status (done) and seconds",
    "stage_timings_s": "seconds of each stage, this try and earlier ones",
    "timeline": "this try's phases in order (imports, Ray start-up, plan, each stage, Ray shutdown): wall seconds and "
                "CPU seconds per kind of process (driver, Ray's daemons, workers, actors), measured",
    "memory": "measured peaks: driver, gradient_ranks (each with live_tensor_bytes), eval_actors (each with load_s, "
              "from_gradient_worker, replay_blocks_kept, replay_bytes)",
    "summary": "the summary facts of finished stages, which a resumed run needs",
}
SUMMARY_FIELDS = {
    "model_name": "--model as given",
    "num_parameters": "parameters of the model (tied ones once)",
    "num_scored_weights": "weights scored and ranked",
    "data": "texts, windows, seq_len, stride (null: non-overlapping); per set (calibration, evaluation): its texts' "
            "positions, windows, predicted tokens; with --stability-folds, calibration.folds: the same per fold",
    "baseline_perplexity": "perplexity of the unperturbed model on the evaluation chunks",
    "baseline_perplexity_ci": "its 95% bootstrap interval over evaluation windows [low, high]",
    "baseline_tasks": "with --eval-tasks, per task: examples, and per metric (acc, acc_norm, ...) the unperturbed "
                      "model's value and standard error",
    "super_weights": "super-weight candidates: the rows of super_weights.csv",
    "ablation_study": "weights (studied) and measured; per metric: spearman, spearman_ci, top_tenth_share",
    "calibration_loss": "mean NLL over the calibration chunks",
    "sensitivity": "backend, and per rank: node, backward and scoring seconds, elements held, peak memory",
    "weights_intact_after_perturbation": "every parameter had its loaded bytes at the end",
    "experiments_failed": "experiments recorded as failed",
    "experiments_completed": "experiments that ran to a result",
    "max_ppl_increase": "largest perplexity increase over the metric (not control) experiments",
    "most_impactful_perturbation": "that experiment's metric, K, ratio, weights and perplexities",
    "comparison": "per (K, ratio): each metric's perplexity beside the random controls' mean/min/max/std, the "
                  "magnitude control and, per metric, its random-same-tensor controls' mean/min/max/std",
    "findings": "per K: each method's damage per weight (nats of mean NLL), the most damaging one, each "
                "metric's verdict against each control (beat / lost / overlap of the 95% intervals); "
                "small_calibration; the same as sentences, with the stability folds' where they ran",
    "stability": "with --stability-folds, per metric and K: folds, fold_overlap_mean/min/max and fold_rho_mean/"
                 "low/high over pairs of folds, all_overlap_mean (each fold against the whole set), unstable "
                 "(the folds share under 80% of the top-K)",
    "quantization_study": "with --quantization-study: bits, block_size, and per kept set: kept, seed, "
                          "weights_kept, perplexity with its interval, ppl_ratio, vs_nothing_kept",
    "run_directory": "where the files are",
    "stage_timings_s": "seconds of each stage",
}


class RunRecord:
    """manifest.json and experiment_summary.json, declared above and written only here.

    Stages report what they found (`fact`, `set`); `stage` runs a stage unless an earlier try
    finished it, so resuming is this one wrapper rather than checks spread over the pipeline.
    """

    def __init__(self, run_dir: RunDirectory, manifest: dict):
        self.run_dir = run_dir
        self.manifest = manifest
        self.timings: dict[str, float] = {}

    @property
    def summary(self) -> dict:
        return self.manifest.setdefault("summary", {})

    def set(self, **fields) -> None:
        _check_declared(fields, MANIFEST_FIELDS, "manifest")
        self.manifest.update(fields)

    def fact(self, **facts) -> None:
        _check_declared(facts, SUMMARY_FIELDS, "summary")
        self.summary.update(facts)

    def memory(self, **kinds) -> None:
        self.manifest.setdefault("memory", {}).update(kinds)

    def done(self, stage: str) -> bool:
        return self.manifest.get("stages", {}).get(stage, {}).get("status") == "done"

    def mark(self, stage: str) -> None:
        entry = self.manifest.setdefault("stages", {}).setdefault(stage, {})
        entry["status"] = "done"
        if stage in self.timings:
            entry["seconds"] = self.timings[stage]
        self.manifest["stage_timings_s"] = {**self.manifest.get("stage_timings_s", {}), **self.timings}
        self.write()

    def stage(self, name: str, compute, restore):
        """`restore()` if an earlier try finished stage `name`, else `compute()`, then mark it done."""
        if self.done(name):
            return restore()
        out = compute()
        self.mark(name)
        return out

    def write(self) -> None:
        self.run_dir.write_json("manifest.json", self.manifest)

    def fail(self, error: BaseException) -> None:
        self.manifest.update(status="failed", error=f"{type(error).__name__}: {error}")
        self.write()

    def complete(self, **final) -> dict:
        """Write experiment_summary.json (the summary facts plus `final`) and mark the run complete."""
        self.fact(**final)
        self.run_dir.write_json("experiment_summary.json", self.summary)
        self.manifest.pop("error", None)
        self.manifest.update(status="complete", finished=_now())
        self.mark("export")
        return self.summary


def _check_declared(values: dict, declared: dict, what: str) -> None:
    unknown = set(values) - set(declared)
    if unknown:  # a key written here must be documented above (and in the README)
        raise KeyError(f"undeclared {what} field(s): {', '.join(sorted(unknown))}")


def _now() -> str:
    import datetime as dt

    return dt.datetime.now().isoformat(timespec="seconds")
