"""The run configuration: typed, documented, validated once, written to config.json."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import asdict, dataclass

from cwa_dist.errors import UsageError
from cwa_dist.metrics import METRICS
from cwa_dist.perturb import MODES
from cwa_dist.sharding import ZeroSettings

CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("auto", "float32", "bfloat16"),
    "shard_backend": ("auto", "zero3", "fsdp2", "none"),
}
"""The closed sets of values, checked in RunConfig and listed in --help."""


def setting(default=dataclasses.MISSING, *, section: str, flag: str | None = None, operational: bool = False):
    """A RunConfig field. `section` groups it in --help; `flag` overrides --field-name; an
    `operational` setting changes how a run is carried out, not what it computes, so a resume
    may change it."""
    return dataclasses.field(default=default, metadata={"section": section, "flag": flag, "operational": operational})


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Every setting of a run, in one place: the command line (`run.build_parser`), sweep files
    and resume checks are generated from these fields, their types and the docstrings below them."""

    # -- model
    model: str = setting(section="model")
    """Hugging Face Hub id, local save_pretrained directory, or .gguf file."""
    device: str = setting("auto", section="model", operational=True)
    """Where workers run: cuda, cpu, or auto (cuda when the Ray cluster has GPUs). The dtype it
    resolves is recorded and checked on resume."""
    dtype: str = setting("auto", section="model")
    """float32, bfloat16, or auto (float32 on CPU, bfloat16 on GPU). float16 is refused: its
    gradients underflow without loss scaling; float32 holds a float16 checkpoint exactly."""
    revision: str | None = setting(None, section="model")
    """A Hub model's branch, tag or commit (default: the main branch's head). The driver resolves it to
    one commit, recorded in config.json, and every node reads the weights at that commit."""
    trust_remote_code: bool = setting(False, section="model")
    """Allow the model repository to run its own Python code."""
    # -- analysis
    metrics: tuple[str, ...] = setting(("grad_x_weight",), section="analysis", flag="--metric")
    """Sensitivity metrics to rank by."""
    topk: tuple[int, ...] = setting((100,), section="analysis")
    """Ranking sizes; the largest is computed once and the others are its prefixes."""
    include_bias: bool = setting(False, section="analysis")
    """Also score 1-D bias vectors."""
    include_norm: bool = setting(False, section="analysis")
    """Also score normalisation weights (and other 1-D non-bias parameters)."""
    # -- data
    data_file: str | None = setting(None, section="data")
    """Text file, one text per line (blank lines ignored); the bundled English prose when not given."""
    eval_limit: int | None = setting(100, section="data")
    """Use at most this many texts."""
    seq_len: int = setting(128, section="data")
    """Tokens per chunk."""
    stride: int | None = setting(None, section="data")
    """Rolling-context scoring: a text's next window starts this many tokens later and predicts only
    its last `stride` tokens, reading the rest as context; the default, --seq-len, is non-overlapping."""
    batch_size: int = setting(4, section="data")
    """Chunks per forward/backward pass (changes speed and memory, not results)."""
    gradient_checkpointing: bool = setting(False, section="data")
    """Recompute block activations during backward: less memory, about a third more time."""
    calibration_fraction: float = setting(0.5, section="data")
    """Share of chunks used for gradients; the rest, disjoint, measure perplexity."""
    seed: int = setting(0, section="data")
    """Seeds the chunk split and the random controls."""
    # -- perturbation
    perturbation_ratios: tuple[float, ...] = setting((0.1, 0.25, 0.5, 1.0), section="perturbation")
    """Fractions of each top-K to perturb, each in (0, 1]."""
    perturbation_mode: str = setting("zero", section="perturbation")
    """How a selected weight is perturbed: zero; sign_flip (−w); scale (w·--perturbation-scale);
    gauss_noise (w + --perturbation-noise·|w|·ε, seeded per experiment); bit_flip (one bit of the
    stored value, --perturbation-bit). Every mode is undone bit for bit after each experiment."""
    perturbation_scale: float = setting(0.5, section="perturbation")
    """scale mode: the factor each selected weight is multiplied by."""
    perturbation_noise: float = setting(1.0, section="perturbation")
    """gauss_noise mode: the noise's standard deviation relative to |w|."""
    perturbation_bit: int | None = setting(None, section="perturbation")
    """bit_flip mode: the bit to flip, 0 = least significant; default the most significant exponent
    bit of the weights' dtype (30 in float32, 14 in bfloat16)."""
    random_seeds: int = setting(3, section="perturbation")
    """Random-K controls per (K, ratio)."""
    no_magnitude_control: bool = setting(False, section="perturbation")
    """Skip the largest-|W| control experiments (the |W| ranking is still written)."""
    bootstrap_samples: int = setting(1000, section="perturbation")
    """Resamples of the evaluation windows for each perplexity's 95% confidence interval."""
    super_weights: int = setting(3, section="perturbation")
    """Super-weight candidates to detect from MLP activation outliers (Yu et al. 2024) and zero one at
    a time; 0 turns detection off."""
    ablation_study: int = setting(0, section="perturbation")
    """Single-weight ablation study: the top N of every metric and N random weights, each zeroed
    alone; per metric, Spearman's ρ between score and the measured change in NLL (0: off)."""
    fast_perturbation: bool = setting(False, section="perturbation")
    """Measure perturbation perplexity on the first --fast-eval-chunks evaluation chunks."""
    fast_eval_chunks: int = setting(4, section="perturbation")
    """Size of that subset."""
    no_perturbation: bool = setting(False, section="perturbation")
    """Stop after the ranking."""
    gpus_per_eval_actor: int | None = setting(None, section="perturbation", operational=True)
    """GPUs per evaluation actor; default on a GPU cluster: as many as one replica needs (1 when the GPUs'
    memory is unknown). The model is split over them by blocks."""
    num_eval_actors: int | None = setting(None, section="perturbation", operational=True)
    """Evaluation actors in the pool; default one per free CPU (or GPU), at most one per experiment."""
    replay_memory_gb: float = setting(1.0, section="perturbation", operational=True)
    """Memory each evaluation actor may spend on kept block outputs, so an experiment recomputes only
    from the first block it changes (same perplexity, bit for bit); 0 runs every experiment as a
    full forward."""
    # -- sharded gradients
    num_workers: int | None = setting(None, section="sharded gradients", operational=True)
    """Gradient workers (ranks of one process group); parameters are sharded across them. Default:
    1 on CPU; on a GPU cluster one GPU node's GPUs, or as many more as the model needs to fit."""
    shard_backend: str = setting("auto", section="sharded gradients")
    """zero3 (DeepSpeed ZeRO-3), fsdp2 (PyTorch FSDP2), none (one worker holding the whole model),
    or auto: none for a single CPU worker without offload, else zero3."""
    cpus_per_worker: int | None = setting(None, section="sharded gradients", operational=True)
    """CPUs per gradient worker; default the free CPUs divided evenly."""
    gpus_per_worker: int | None = setting(None, section="sharded gradients", operational=True)
    """GPUs per gradient worker; default 1 on a GPU cluster, else 0."""
    offload_params: bool = setting(False, section="sharded gradients", operational=True)
    """ZeRO-3: keep parameter partitions in CPU memory between uses (models larger than the GPUs)."""
    offload_optimizer: bool = setting(False, section="sharded gradients", operational=True)
    """ZeRO-3: keep DeepSpeed's fp32 master and gradient partitions in CPU memory."""
    zero_reduce_bucket_size: int = setting(50_000_000, section="sharded gradients", operational=True)
    """ZeRO-3: elements per gradient reduce-scatter bucket."""
    zero_prefetch_bucket_size: int = setting(50_000_000, section="sharded gradients", operational=True)
    """ZeRO-3: elements of parameters gathered ahead of use."""
    zero_max_live_parameters: int = setting(1_000_000_000, section="sharded gradients", operational=True)
    """ZeRO-3: most gathered parameter elements alive at once per rank."""
    zero_max_reuse_distance: int = setting(50_000_000, section="sharded gradients", operational=True)
    """ZeRO-3: a gathered parameter is kept (not re-gathered) only if it is used again within this
    many elements. DeepSpeed's default of 1e9 keeps every parameter of a smaller model gathered from
    its forward to its backward, that is the whole model on every rank."""
    zero_param_persistence_threshold: int = setting(100_000, section="sharded gradients", operational=True)
    """ZeRO-3: parameters smaller than this stay gathered (saves collectives on tiny tensors)."""
    # -- run
    ray_address: str | None = setting(None, section="run", operational=True)
    """Ray cluster to join; default RAY_ADDRESS, else a local Ray started and stopped for the run."""
    output: str = setting("outputs", section="run", operational=True)
    """Parent directory of the run directory."""
    experiment_id: str | None = setting(None, section="run", operational=True)
    """Run directory name; default critical_analysis_<timestamp>."""
    resume: bool = setting(False, section="run", operational=True)
    """Continue an interrupted run: the one named by --experiment-id, else the newest unfinished run
    under --output; finished stages and experiments are kept."""
    max_retries: int = setting(2, section="run", operational=True)
    """Times an experiment is retried after its actor died or timed out, before it is recorded as failed."""
    stage_timeout_s: float = setting(3600.0, section="run", operational=True)
    """Deadline of each call to the gradient workers (load, one lockstep step, scoring): ranks that
    have not answered by then fail the stage, named."""
    experiment_timeout_s: float = setting(1800.0, section="run", operational=True)
    """Deadline of one perturbation experiment: a stuck evaluation actor is killed and the
    experiment retried, as for an actor that died."""
    dry_run: bool = setting(False, section="run", operational=True)
    """Read only the model's config, resolve device, dtype, backend, workers and actors, estimate each
    process's memory, check it against the cluster's devices, print the plan and exit; a plan that
    cannot fit is refused with the flags that would make it fit."""
    gpu_memory_gb: float | None = setting(None, section="run", operational=True)
    """Memory of one GPU in GB, for the plan's check on a cluster whose GPU nodes do not exist yet (or
    a --cluster file); default: asked of a GPU of the cluster."""
    cluster: str | None = setting(None, section="run", operational=True)
    """With --dry-run: plan against this Ray autoscaler cluster file (`ray up`'s, e.g. cluster.yaml)
    instead of a running cluster: its node types' GPUs, CPUs and `memory`; nothing is started."""
    placement_timeout_s: float | None = setting(None, section="run", operational=True)
    """How long the gradient workers wait to be placed (progress is printed meanwhile); default 600 s
    on a fixed cluster, 3600 s where the autoscaler may first have to start GPU nodes."""
    verbose: bool = setting(False, section="run", operational=True)
    """More console output (per-process memory and timings), Ray's worker logs, tracebacks on errors."""

    def __post_init__(self) -> None:
        if not self.model:
            raise UsageError("--model is empty; give a Hub id, a local model directory or a .gguf file")
        _one_of("--device", self.device, CHOICES["device"])
        if self.dtype == "float16":
            raise UsageError("--dtype float16 is not supported: small gradients underflow in float16 without loss "
                             "scaling; use --dtype bfloat16, or float32 (which holds a float16 checkpoint exactly)")
        _one_of("--dtype", self.dtype, CHOICES["dtype"])
        if not self.metrics:
            raise UsageError("--metric needs at least one metric")
        for m in self.metrics:
            if m not in METRICS:
                raise UsageError(METRICS.unknown_message(m))
        if self.perturbation_mode not in MODES:
            raise UsageError(MODES.unknown_message(self.perturbation_mode))
        if not math.isfinite(self.perturbation_scale):
            raise UsageError(f"--perturbation-scale {self.perturbation_scale} is not a finite number")
        if not (self.perturbation_noise > 0 and math.isfinite(self.perturbation_noise)):
            raise UsageError(f"--perturbation-noise {self.perturbation_noise} must be a positive number")
        if self.perturbation_bit is not None and not 0 <= self.perturbation_bit < 64:
            raise UsageError(f"--perturbation-bit {self.perturbation_bit} is outside 0..63")
        if not self.topk:
            raise UsageError("--topk needs at least one value")
        for k in self.topk:
            if k <= 0:
                raise UsageError(f"--topk {k} is not positive; every K must be at least 1")
        for r in self.perturbation_ratios:
            if not (0 < r <= 1) or math.isnan(r):
                raise UsageError(f"--perturbation-ratios {r} is outside (0, 1]; a ratio is the share of the top-K "
                                 "to perturb")
        _positive("--seq-len", self.seq_len, minimum=2)
        if self.stride is not None and not 1 <= self.stride <= self.seq_len:
            raise UsageError(f"--stride {self.stride} is outside 1..--seq-len ({self.seq_len}); a window moves on by "
                             "at most its own length")
        _positive("--batch-size", self.batch_size)
        if not (self.replay_memory_gb >= 0 and math.isfinite(self.replay_memory_gb)):
            raise UsageError(f"--replay-memory-gb {self.replay_memory_gb} must be a number of GB, 0 or more")
        _positive("--fast-eval-chunks", self.fast_eval_chunks)
        _positive("--bootstrap-samples", self.bootstrap_samples, minimum=100)
        if self.eval_limit is not None:
            _positive("--eval-limit", self.eval_limit)
        for flag, v in (("--stage-timeout-s", self.stage_timeout_s),
                        ("--experiment-timeout-s", self.experiment_timeout_s)):
            if not v > 0:
                raise UsageError(f"{flag} {v} must be a positive number of seconds")
        _non_negative("--max-retries", self.max_retries)
        _non_negative("--ablation-study", self.ablation_study)
        _non_negative("--super-weights", self.super_weights)
        _non_negative("--random-seeds", self.random_seeds)
        if self.num_workers is not None:
            _positive("--num-workers", self.num_workers)
        _one_of("--shard-backend", self.shard_backend, CHOICES["shard_backend"])
        if self.shard_backend == "fsdp2" and self.gradient_checkpointing:
            raise UsageError("--gradient-checkpointing works with --shard-backend zero3 or none, not fsdp2")
        if self.shard_backend == "none" and (self.num_workers or 1) > 1:
            raise UsageError("--shard-backend none runs one worker; use --shard-backend zero3 with --num-workers > 1")
        if self.cpus_per_worker is not None:
            _positive("--cpus-per-worker", self.cpus_per_worker)
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise UsageError(f"--gpus-per-worker {self.gpus_per_worker} is negative")
        if self.zero_max_reuse_distance < 0:
            raise UsageError(f"--zero-max-reuse-distance {self.zero_max_reuse_distance} is negative")
        for flag, v in (("--zero-reduce-bucket-size", self.zero_reduce_bucket_size),
                        ("--zero-prefetch-bucket-size", self.zero_prefetch_bucket_size),
                        ("--zero-max-live-parameters", self.zero_max_live_parameters)):
            _positive(flag, v)
        if self.gpus_per_eval_actor is not None:
            _positive("--gpus-per-eval-actor", self.gpus_per_eval_actor)
        if self.cluster is not None and not self.dry_run:
            raise UsageError("--cluster plans against a cluster file and needs --dry-run; a run uses the cluster it "
                             "joins (--ray-address, RAY_ADDRESS, or ray job submit)")
        if self.placement_timeout_s is not None and not self.placement_timeout_s > 0:
            raise UsageError(f"--placement-timeout-s {self.placement_timeout_s} must be a positive number of seconds")
        if self.gpu_memory_gb is not None and not self.gpu_memory_gb > 0:
            raise UsageError(f"--gpu-memory-gb {self.gpu_memory_gb} must be a positive number of GB")
        if self.num_eval_actors is not None:
            _positive("--num-eval-actors", self.num_eval_actors)
        if self.experiment_id is not None:
            check_run_id(self.experiment_id, "--experiment-id")
        if not (0 < self.calibration_fraction < 1):
            raise UsageError(f"--calibration-fraction {self.calibration_fraction} is outside (0, 1)")
        # Duplicates would only repeat work and rows.
        self.metrics = tuple(dict.fromkeys(self.metrics))
        self.topk = tuple(sorted(set(self.topk)))
        self.perturbation_ratios = tuple(sorted(set(self.perturbation_ratios)))

    @property
    def asks_for_gpus(self) -> bool:
        return bool(self.gpus_per_worker) or self.gpus_per_eval_actor is not None

    @property
    def replay_budget_bytes(self) -> int:
        return int(self.replay_memory_gb * 2**30)

    @property
    def max_k(self) -> int:
        return max(self.topk)

    def backend_for(self, device: str, num_workers: int | None = None) -> str:
        """The backend `auto` stands for with `num_workers` (default --num-workers, else 1). One CPU
        worker gains nothing from sharding and ZeRO-3's hooks cost it 1.5-2x in time (measured on
        SmolLM2), so it runs the plain replica; anything that shards or offloads runs ZeRO-3."""
        if self.shard_backend != "auto":
            return self.shard_backend
        workers = num_workers or self.num_workers or 1
        single_cpu = workers == 1 and device == "cpu" and not (self.offload_params or self.offload_optimizer)
        return "none" if single_cpu else "zero3"

    def mode_options(self):
        from cwa_dist.perturb import ModeOptions

        return ModeOptions(scale=self.perturbation_scale, noise=self.perturbation_noise, bit=self.perturbation_bit,
                           seed=self.seed)

    def zero_settings(self):
        return ZeroSettings(
            offload_params=self.offload_params,
            offload_optimizer=self.offload_optimizer,
            reduce_bucket_size=self.zero_reduce_bucket_size,
            prefetch_bucket_size=self.zero_prefetch_bucket_size,
            max_live_parameters=self.zero_max_live_parameters,
            max_reuse_distance=self.zero_max_reuse_distance,
            param_persistence_threshold=self.zero_param_persistence_threshold,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def operational_settings() -> frozenset[str]:
    """Settings a resume may change (they change how a run is carried out, not what it computes)."""
    return frozenset(f.name for f in dataclasses.fields(RunConfig) if f.metadata["operational"])


def setting_docs() -> dict[str, str]:
    """Each field's docstring, read from this file's source (one place for the documentation)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(RunConfig)).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def config_from_mapping(values: dict, where: str) -> RunConfig:
    """A RunConfig from plain data (a sweep file's entry), with each key and type checked so a typo
    is named, with the closest setting, instead of being ignored."""
    hints = typing.get_type_hints(RunConfig)
    known = [f.name for f in dataclasses.fields(RunConfig)]
    out = {}
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"{where}: unknown setting {key!r}.{hint}")
        out[key] = _coerce(hints[key], value, f"{where}: {key}")
    if "model" not in out:
        raise UsageError(f"{where}: no 'model' given")
    return RunConfig(**out)


def _coerce(hint, value, where: str):
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:  # tuple[X, ...]: a list in YAML, or one value
        items = value if isinstance(value, list) else [value]
        return tuple(_coerce(args[0], v, where) for v in items)
    if type(None) in args:  # X | None
        return None if value is None else _coerce(next(a for a in args if a is not type(None)), value, where)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, True)
    if not ok:
        raise UsageError(f"{where} should be {hint.__name__}, not {value!r}")
    return float(value) if hint is float else value


_RUN_ID = re.compile(r"[A-Za-z0-9._-]+")


def path_component(name: str) -> str:
    """`name` made into one safe path component (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def check_run_id(value: str, what: str) -> None:
    """A run (or sweep) id names one directory under --output: one path component of letters,
    digits, '.', '_' and '-', and not '.' or '..', so it can never point outside --output."""
    if not _RUN_ID.fullmatch(value) or value in (".", ".."):
        raise UsageError(f"{what} {value!r} must be one path component of letters, digits, '.', '_' and '-'")


def _one_of(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"{flag} {value!r} is not one of {', '.join(allowed)}")


def _non_negative(flag: str, value: int) -> None:
    if value < 0:
        raise UsageError(f"{flag} {value} is negative")


def _positive(flag: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise UsageError(f"{flag} {value} is too small; it must be at least {minimum}")
