"""The run configuration: typed, documented, validated once, written to config.json.

`RunConfig` is made of sections (model, data, analysis, perturbation, sharding, run), each a
dataclass that validates itself; ZeRO's knobs and the perturbation modes' options are sections of
their own, declared where they are used. Every setting keeps one flat name, which is its flag, its
key in config.json and in sweep files (`cwa_dist.settings` holds that machinery)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cwa_dist import settings
from cwa_dist.analysis.metrics import MAGNITUDE, METRICS
from cwa_dist.analysis.perturb import MODES, ModeOptions
from cwa_dist.analysis.quantize import check_bits
from cwa_dist.analysis.zero_shot import TaskRequest
from cwa_dist.errors import UsageError
from cwa_dist.settings import check_choices, check_run_id, non_negative, positive, setting
from cwa_dist.sharding import ZeroSettings

SECTION_TITLES = {"sharding": "sharded gradients"}
"""--help's name of a section, where it is not the section's own."""


@dataclass(kw_only=True, slots=True)
class ModelSection:
    """Which model, read how."""

    name: str = setting(flat="model")
    """Hugging Face Hub id, local save_pretrained directory, or .gguf file."""
    device: Literal["auto", "cpu", "cuda"] = setting("auto", operational=True)
    """Where workers run: cuda, cpu, or auto (cuda when the Ray cluster has GPUs). The dtype it
    resolves is recorded and checked on resume."""
    dtype: Literal["auto", "float32", "bfloat16"] = setting("auto")
    """float32, bfloat16, or auto (float32 on CPU, bfloat16 on GPU). float16 is refused: its
    gradients underflow without loss scaling; float32 holds a float16 checkpoint exactly."""
    revision: str | None = setting(None)
    """A Hub model's branch, tag or commit (default: the main branch's head). The driver resolves it to
    one commit, recorded in config.json, and every node reads the weights at that commit."""
    trust_remote_code: bool = setting(False)
    """Allow the model repository to run its own Python code."""

    def __post_init__(self) -> None:
        if not self.name:
            raise UsageError("--model is empty; give a Hub id, a local model directory or a .gguf file")
        if self.dtype == "float16":
            raise UsageError("--dtype float16 is not supported: small gradients underflow in float16 without loss "
                             "scaling; use --dtype bfloat16, or float32 (which holds a float16 checkpoint exactly)")
        check_choices(self)


@dataclass(kw_only=True, slots=True)
class DataSection:
    """Which texts, cut into which windows."""

    data_file: str | None = setting(None)
    """Text file, one text per line (blank lines ignored); the bundled English prose when neither it
    nor --dataset is given."""
    dataset: str | None = setting(None)
    """A dataset read through 🤗 datasets: a Hub id (e.g. wikitext), a directory written by
    save_to_disk, or a local data file (parquet, json/jsonl, csv, txt) or directory of them."""
    dataset_config: str | None = setting(None)
    """--dataset's configuration (subset), e.g. wikitext-2-raw-v1."""
    dataset_split: str | None = setting(None)
    """--dataset's split; default its only split, else test."""
    text_column: str | None = setting(None)
    """--dataset's column holding the text; default text, else its only string column."""
    dataset_revision: str | None = setting(None)
    """A Hub dataset's branch, tag or commit (default: main), resolved once to a commit that
    config.json records and a resume checks."""
    document_split: Literal["auto", "rows", "wikitext"] = setting("auto")
    """What one document of --dataset is: rows (one row each), wikitext (rows joined into articles,
    cut at top-level ' = Title = ' headings), or auto (wikitext for a dataset named wikitext, else
    rows)."""
    eval_limit: int | None = setting(100)
    """Use at most this many documents (texts), the first in the source's order."""
    seq_len: int = setting(128)
    """Tokens per chunk."""
    stride: int | None = setting(None)
    """Rolling-context scoring: a text's next window starts this many tokens later and predicts only
    its last `stride` tokens, reading the rest as context; the default, --seq-len, is non-overlapping."""
    batch_size: int = setting(4)
    """Chunks per forward/backward pass (changes speed and memory, not results)."""
    calibration_fraction: float = setting(0.5)
    """Share of the texts whose windows give the gradients; the other texts' windows, disjoint,
    measure perplexity (the split is by text, so no text is on both sides)."""
    seed: int = setting(0)
    """Seeds the split of the texts and the random controls."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.data_file is not None and self.dataset is not None:
            raise UsageError("--data-file and --dataset both name the texts; give one of them")
        if self.dataset is None:
            for flag, value in (("--dataset-config", self.dataset_config), ("--dataset-split", self.dataset_split),
                                ("--text-column", self.text_column), ("--dataset-revision", self.dataset_revision)):
                if value is not None:
                    raise UsageError(f"{flag} needs --dataset")
        positive("--seq-len", self.seq_len, minimum=2)
        if self.stride is not None and not 1 <= self.stride <= self.seq_len:
            raise UsageError(f"--stride {self.stride} is outside 1..--seq-len ({self.seq_len}); a window moves on by "
                             "at most its own length")
        positive("--batch-size", self.batch_size)
        if self.eval_limit is not None:
            positive("--eval-limit", self.eval_limit)
        if not (0 < self.calibration_fraction < 1):
            raise UsageError(f"--calibration-fraction {self.calibration_fraction} is outside (0, 1)")


@dataclass(kw_only=True, slots=True)
class AnalysisSection:
    """What is scored and how much of it is ranked."""

    metrics: tuple[str, ...] = setting(("grad_x_weight",), flag="--metric")
    """Sensitivity metrics to rank by."""
    topk: tuple[int, ...] = setting((100,))
    """Ranking sizes; the largest is computed once and the others are its prefixes."""
    include_bias: bool = setting(False)
    """Also score 1-D bias vectors."""
    include_norm: bool = setting(False)
    """Also score normalisation weights (and other 1-D non-bias parameters)."""
    stability_folds: int = setting(0)
    """Split the calibration texts into this many disjoint folds (at least 2; 0 = off) and rank each
    fold on its own beside the whole set: top-K overlap, Spearman ρ and each weight's inclusion
    frequency (stability.csv, fold_rankings.parquet). Keeps B more float32 gradient sums."""

    def __post_init__(self) -> None:
        if not self.metrics:
            raise UsageError("--metric needs at least one metric")
        for m in self.metrics:
            if m not in METRICS:
                raise UsageError(METRICS.unknown_message(m))
        if not self.topk:
            raise UsageError("--topk needs at least one value")
        non_negative("--stability-folds", self.stability_folds)
        if self.stability_folds == 1:
            raise UsageError("--stability-folds 1 has nothing to compare; give 2 or more folds, or 0 for none")
        for k in self.topk:
            if k <= 0:
                raise UsageError(f"--topk {k} is not positive; every K must be at least 1")
        # Duplicates would only repeat work and rows.
        self.metrics = tuple(dict.fromkeys(self.metrics))
        self.topk = tuple(sorted(set(self.topk)))

    @property
    def max_k(self) -> int:
        return max(self.topk)


@dataclass(kw_only=True, slots=True)
class PerturbationSection:
    """Which experiments perturb the ranked weights, their controls, and the pool that measures them."""

    ratios: tuple[float, ...] = setting((0.1, 0.25, 0.5, 1.0), flat="perturbation_ratios")
    """Fractions of each top-K to perturb, each in (0, 1]."""
    mode: str = setting("zero", flat="perturbation_mode")
    """How a selected weight is perturbed: zero; sign_flip (−w); scale (w·--perturbation-scale);
    gauss_noise (w + --perturbation-noise·|w|·ε, seeded per experiment); bit_flip (one bit of the
    stored value, --perturbation-bit). Every mode is undone bit for bit after each experiment."""
    options: ModeOptions = setting(ModeOptions)
    random_seeds: int = setting(3)
    """Random-K controls per (K, ratio)."""
    no_magnitude_control: bool = setting(False)
    """Skip the largest-|W| control experiments (the |W| ranking is still written)."""
    same_tensor_seeds: int = setting(1)
    """Random-same-tensor controls per metric, K and ratio: as many weights as the metric's selection
    holds in each tensor, drawn at random from that tensor (0: off)."""
    bootstrap_samples: int = setting(1000)
    """Resamples of the evaluation windows for each perplexity's 95% confidence interval."""
    super_weights: int = setting(3)
    """Super-weight candidates to detect from MLP activation outliers (Yu et al. 2024) and zero one at
    a time; 0 turns detection off."""
    ablation_study: int = setting(0)
    """Single-weight ablation study: the top N of every metric and N random weights, each zeroed
    alone; per metric, Spearman's ρ between score and the measured change in NLL (0: off)."""
    quantization_study: int = setting(0)
    """Quantize every scored matrix round-to-nearest at this many bits (2–8; 0: off), once with
    nothing kept at full precision and once per kept set: each metric's top-K, its random, |W| and
    same-tensor controls, the super weights (quantization_results.csv)."""
    quant_block_size: int = setting(128)
    """--quantization-study's blocks: this many consecutive weights along each row share one scale."""
    fast_perturbation: bool = setting(False)
    """Measure perturbation perplexity on the first --fast-eval-chunks evaluation chunks."""
    fast_eval_chunks: int = setting(4)
    """Size of that subset."""
    no_perturbation: bool = setting(False)
    """Stop after the ranking."""
    eval_tasks: tuple[str, ...] = setting(())
    """lm-evaluation-harness tasks (e.g. arc_easy,piqa) run on the baseline and after every perturbation
    experiment and super-weight candidate, on each evaluation actor's own model in memory; each row
    gets each task's metric, its standard error and a paired 95% interval for the change."""
    eval_tasks_limit: int | None = setting(None)
    """At most this many examples per task (the first in the task's order); default all."""
    eval_tasks_include: str | None = setting(None)
    """A directory of your own task YAMLs, added to the harness's tasks (its include path); data files
    they name should be absolute paths, as actors may run elsewhere."""
    gpus_per_eval_actor: int | None = setting(None, operational=True)
    """GPUs per evaluation actor; default on a GPU cluster: as many as one replica needs (1 when the GPUs'
    memory is unknown). The model is split over them by blocks."""
    num_eval_actors: int | None = setting(None, operational=True)
    """Evaluation actors in the pool; default one per free CPU (or GPU), at most one per experiment."""
    replay_memory_gb: float = setting(1.0, operational=True)
    """Memory each evaluation actor may spend on kept block outputs, so an experiment recomputes only
    from the first block it changes (same perplexity, bit for bit); 0 runs every experiment as a
    full forward."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(MODES.unknown_message(self.mode))
        options = self.options
        if not math.isfinite(options.scale):
            raise UsageError(f"--perturbation-scale {options.scale} is not a finite number")
        if not (options.noise > 0 and math.isfinite(options.noise)):
            raise UsageError(f"--perturbation-noise {options.noise} must be a positive number")
        if options.bit is not None and not 0 <= options.bit < 64:
            raise UsageError(f"--perturbation-bit {options.bit} is outside 0..63")
        for r in self.ratios:
            if not (0 < r <= 1) or math.isnan(r):
                raise UsageError(f"--perturbation-ratios {r} is outside (0, 1]; a ratio is the share of the top-K "
                                 "to perturb")
        if not (self.replay_memory_gb >= 0 and math.isfinite(self.replay_memory_gb)):
            raise UsageError(f"--replay-memory-gb {self.replay_memory_gb} must be a number of GB, 0 or more")
        positive("--fast-eval-chunks", self.fast_eval_chunks)
        positive("--bootstrap-samples", self.bootstrap_samples, minimum=100)
        non_negative("--ablation-study", self.ablation_study)
        if self.quantization_study:
            check_bits(self.quantization_study)
            if self.no_perturbation:
                raise UsageError("--quantization-study runs on the evaluation actors; it cannot run with "
                                 "--no-perturbation")
        positive("--quant-block-size", self.quant_block_size)
        non_negative("--super-weights", self.super_weights)
        non_negative("--random-seeds", self.random_seeds)
        non_negative("--same-tensor-seeds", self.same_tensor_seeds)
        if self.gpus_per_eval_actor is not None:
            positive("--gpus-per-eval-actor", self.gpus_per_eval_actor)
        if self.num_eval_actors is not None:
            positive("--num-eval-actors", self.num_eval_actors)
        self.ratios = tuple(sorted(set(self.ratios)))
        # "arc_easy,piqa" or "arc_easy piqa": one task each, in the order given.
        self.eval_tasks = tuple(dict.fromkeys(t.strip() for item in self.eval_tasks for t in item.split(",")
                                              if t.strip()))
        if self.eval_tasks_limit is not None:
            positive("--eval-tasks-limit", self.eval_tasks_limit)
        if not self.eval_tasks and (self.eval_tasks_limit is not None or self.eval_tasks_include is not None):
            raise UsageError("--eval-tasks-limit and --eval-tasks-include need --eval-tasks")
        if self.eval_tasks_include is not None and not Path(self.eval_tasks_include).expanduser().is_dir():
            raise UsageError(f"--eval-tasks-include {self.eval_tasks_include} is not a directory of task YAMLs")

    @property
    def replay_budget_bytes(self) -> int:
        return int(self.replay_memory_gb * 2**30)

    @property
    def tasks_include(self) -> str | None:
        """--eval-tasks-include as an absolute path: actors may run in another directory."""
        return str(Path(self.eval_tasks_include).expanduser().resolve()) if self.eval_tasks_include else None

    def task_request(self, batch_size: int) -> TaskRequest | None:
        """What the evaluation actors run besides perplexity (None: perplexity only)."""
        if not self.eval_tasks:
            return None
        return TaskRequest(self.eval_tasks, self.eval_tasks_limit, self.tasks_include, batch_size)


@dataclass(kw_only=True, slots=True)
class ShardingSection:
    """How the gradient workers split the model."""

    num_workers: int | None = setting(None, operational=True)
    """Gradient workers (ranks of one process group); parameters are sharded across them. Default:
    1 on CPU; on a GPU cluster one GPU node's GPUs, or as many more as the model needs to fit."""
    shard_backend: Literal["auto", "zero3", "fsdp2", "none"] = setting("auto")
    """zero3 (DeepSpeed ZeRO-3), fsdp2 (PyTorch FSDP2), none (one worker holding the whole model),
    or auto: none for a single CPU worker without offload, else zero3."""
    cpus_per_worker: int | None = setting(None, operational=True)
    """CPUs per gradient worker; default the free CPUs divided evenly."""
    gpus_per_worker: int | None = setting(None, operational=True)
    """GPUs per gradient worker; default 1 on a GPU cluster, else 0."""
    gradient_checkpointing: bool = setting(False)
    """Recompute block activations during backward: less memory, about a third more time."""
    zero: ZeroSettings = setting(ZeroSettings, operational=True)

    def __post_init__(self) -> None:
        if self.num_workers is not None:
            positive("--num-workers", self.num_workers)
        check_choices(self)
        if self.shard_backend == "fsdp2" and self.gradient_checkpointing:
            raise UsageError("--gradient-checkpointing works with --shard-backend zero3 or none, not fsdp2")
        if self.shard_backend == "none" and (self.num_workers or 1) > 1:
            raise UsageError("--shard-backend none runs one worker; use --shard-backend zero3 with --num-workers > 1")
        if self.cpus_per_worker is not None:
            positive("--cpus-per-worker", self.cpus_per_worker)
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise UsageError(f"--gpus-per-worker {self.gpus_per_worker} is negative")
        z = self.zero
        if z.max_reuse_distance < 0:
            raise UsageError(f"--zero-max-reuse-distance {z.max_reuse_distance} is negative")
        for flag, v in (("--zero-reduce-bucket-size", z.reduce_bucket_size),
                        ("--zero-prefetch-bucket-size", z.prefetch_bucket_size),
                        ("--zero-max-live-parameters", z.max_live_parameters)):
            positive(flag, v)

    def backend_for(self, device: str, num_workers: int | None = None) -> str:
        """The backend `auto` stands for with `num_workers` (default --num-workers, else 1). One CPU
        worker gains nothing from sharding and ZeRO-3's hooks cost it 1.5-2x in time (measured on
        SmolLM2), so it runs the plain replica; anything that shards or offloads runs ZeRO-3."""
        if self.shard_backend != "auto":
            return self.shard_backend
        workers = num_workers or self.num_workers or 1
        return "none" if workers == 1 and device == "cpu" and not self.zero.offloads else "zero3"


@dataclass(kw_only=True, slots=True)
class RunSection:
    """Where the run goes, where it runs, and how long it may take."""

    ray_address: str | None = setting(None, operational=True)
    """Ray cluster to join; default RAY_ADDRESS, else a local Ray started and stopped for the run."""
    output: str = setting("outputs", operational=True)
    """Parent directory of the run directory."""
    experiment_id: str | None = setting(None, operational=True)
    """Run directory name; default critical_analysis_<timestamp>."""
    resume: bool = setting(False, operational=True)
    """Continue an interrupted run: the one named by --experiment-id, else the newest unfinished run
    under --output; finished stages and experiments are kept."""
    max_retries: int = setting(2, operational=True)
    """Times an experiment is retried after its actor died or timed out, before it is recorded as failed."""
    stage_timeout_s: float = setting(3600.0, operational=True)
    """Deadline of each call to the gradient workers (load, one lockstep step, scoring): ranks that
    have not answered by then fail the stage, named."""
    experiment_timeout_s: float = setting(1800.0, operational=True)
    """Deadline of one perturbation experiment: a stuck evaluation actor is killed and the
    experiment retried, as for an actor that died."""
    dry_run: bool = setting(False, operational=True)
    """Read only the model's config, resolve device, dtype, backend, workers and actors, estimate each
    process's memory, check it against the cluster's devices, print the plan and exit; a plan that
    cannot fit is refused with the flags that would make it fit."""
    gpu_memory_gb: float | None = setting(None, operational=True)
    """Memory of one GPU in GB, for the plan's check on a cluster whose GPU nodes do not exist yet (or
    a --cluster file); default: asked of a GPU of the cluster."""
    cluster: str | None = setting(None, operational=True)
    """With --dry-run: plan against this Ray autoscaler cluster file (`ray up`'s, e.g. cluster.yaml)
    instead of a running cluster: its node types' GPUs, CPUs and `memory`; nothing is started."""
    placement_timeout_s: float | None = setting(None, operational=True)
    """How long the gradient workers wait to be placed (progress is printed meanwhile); default 600 s
    on a fixed cluster, 3600 s where the autoscaler may first have to start GPU nodes."""
    verbose: bool = setting(False, operational=True)
    """More console output (per-process memory and timings), Ray's worker logs, tracebacks on errors."""


    def __post_init__(self) -> None:
        for flag, v in (("--stage-timeout-s", self.stage_timeout_s),
                        ("--experiment-timeout-s", self.experiment_timeout_s)):
            if not v > 0:
                raise UsageError(f"{flag} {v} must be a positive number of seconds")
        non_negative("--max-retries", self.max_retries)
        if self.cluster is not None and not self.dry_run:
            raise UsageError("--cluster plans against a cluster file and needs --dry-run; a run uses the cluster it "
                             "joins (--ray-address, RAY_ADDRESS, or ray job submit)")
        if self.placement_timeout_s is not None and not self.placement_timeout_s > 0:
            raise UsageError(f"--placement-timeout-s {self.placement_timeout_s} must be a positive number of seconds")
        if self.gpu_memory_gb is not None and not self.gpu_memory_gb > 0:
            raise UsageError(f"--gpu-memory-gb {self.gpu_memory_gb} must be a positive number of GB")
        if self.experiment_id is not None:
            check_run_id(self.experiment_id, "--experiment-id")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Every setting of a run, in sections: the command line (`run.build_parser`), sweep files,
    config.json and resume checks are generated from their fields, types and docstrings. Build one
    from flat names with `RunConfig.of(model=..., topk=(10,))`."""

    model: ModelSection
    data: DataSection = setting(DataSection)
    analysis: AnalysisSection = setting(AnalysisSection)
    perturbation: PerturbationSection = setting(PerturbationSection)
    sharding: ShardingSection = setting(ShardingSection)
    run: RunSection = setting(RunSection)

    @classmethod
    def of(cls, **flat) -> RunConfig:
        """A RunConfig from settings by their flat names; the others keep their defaults."""
        return settings.build(cls, flat)

    def replace(self, **flat) -> RunConfig:
        """A copy with the given settings (by flat name) changed, validated anew."""
        return settings.build(RunConfig, {**self.to_dict(), **flat})

    @property
    def perturbed_metrics(self) -> tuple[str, ...]:
        """The rankings whose top-K are perturbed: |w| asked for as a metric runs once, as the
        largest-|W| control, unless that control is off."""
        return tuple(m for m in self.analysis.metrics
                     if m != MAGNITUDE.name or self.perturbation.no_magnitude_control)

    @property
    def asks_for_gpus(self) -> bool:
        return bool(self.sharding.gpus_per_worker) or self.perturbation.gpus_per_eval_actor is not None

    def to_dict(self) -> dict:
        """{flat name: value}: config.json's settings, as the flags name them."""
        return settings.flatten(self)


def operational_settings() -> frozenset[str]:
    """Settings a resume may change (they change how a run is carried out, not what it computes)."""
    return frozenset(leaf.flat for leaf in settings.leaves(RunConfig) if leaf.operational)


def config_from_mapping(values: dict, where: str) -> RunConfig:
    """A RunConfig from plain data (a sweep file's entry), with each key and type checked so a typo
    is named, with the closest setting, instead of being ignored."""
    if "model" not in values:
        raise UsageError(f"{where}: no 'model' given")
    return settings.build(RunConfig, values, where)
