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


@dataclass(kw_only=True, slots=True)
class RunConfig:
    model: str
    """Hugging Face Hub id, local save_pretrained directory, or .gguf file."""
    device: str = "auto"
    """cuda, cpu, or auto (cuda when the Ray cluster has GPUs)."""
    dtype: str = "auto"
    """float32, bfloat16, or auto (float32 on CPU, bfloat16 on GPU). float16 is refused: its
    gradients underflow without loss scaling; a float16 checkpoint is held exactly in float32."""
    metrics: tuple[str, ...] = ("grad_x_weight",)
    """Sensitivity metrics to rank by."""
    topk: tuple[int, ...] = (100,)
    """Ranking sizes; the largest is computed once and the others are its prefixes."""
    perturbation_ratios: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    """Fractions of each top-K to perturb, each in (0, 1]."""
    perturbation_mode: str = "zero"
    """How a selected weight is perturbed."""
    random_seeds: int = 3
    """How many random-K controls per (K, ratio)."""
    eval_limit: int | None = 100
    """Use at most this many texts (lines) of the data."""
    data_file: str | None = None
    """One text per line; the bundled default text when None."""
    seq_len: int = 128
    """Tokens per chunk."""
    batch_size: int = 4
    """Chunks per forward/backward pass (does not change the gradient, only speed and memory)."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward: less memory, about a third more time."""
    calibration_fraction: float = 0.5
    """Share of chunks used for gradients; the rest measure perplexity."""
    fast_perturbation: bool = False
    """Measure perturbation perplexity on a subset of the evaluation chunks."""
    fast_eval_chunks: int = 4
    """Size of that subset."""
    no_perturbation: bool = False
    """Stop after the ranking."""
    include_bias: bool = False
    """Also score 1-D bias vectors."""
    include_norm: bool = False
    """Also score normalisation weights (and other 1-D non-bias parameters)."""
    num_workers: int = 1
    """Gradient workers (ranks of one process group); parameters are sharded across them."""
    shard_backend: str = "auto"
    """How the gradient workers shard the model: zero3 (DeepSpeed ZeRO-3), fsdp2 (PyTorch FSDP2), none
    (one whole replica), or auto: none for a single CPU worker without offload, else zero3."""
    cpus_per_worker: int | None = None
    """CPUs per gradient worker; None divides the free CPUs evenly."""
    gpus_per_worker: int | None = None
    """GPUs per gradient worker; None gives 1 on a GPU cluster, else 0."""
    offload_params: bool = False
    """ZeRO-3: keep parameter partitions in CPU memory between uses (models larger than the GPUs)."""
    offload_optimizer: bool = False
    """ZeRO-3: keep DeepSpeed's fp32 master and gradient partitions in CPU memory."""
    zero_reduce_bucket_size: int = 50_000_000
    """ZeRO-3: elements per gradient reduce-scatter bucket."""
    zero_prefetch_bucket_size: int = 50_000_000
    """ZeRO-3: elements of parameters gathered ahead of use."""
    zero_max_live_parameters: int = 1_000_000_000
    """ZeRO-3: most gathered parameter elements alive at once per rank."""
    zero_param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters smaller than this stay gathered (saves collectives on tiny tensors)."""
    gpus_per_eval_actor: int = 1
    """GPUs per evaluation actor on a GPU cluster; the model is split over them by blocks."""
    num_eval_actors: int | None = None
    """Evaluation actors in the pool; None picks one per free CPU (or GPU), at most the number of experiments."""
    max_retries: int = 2
    """Times an experiment is retried after its actor died or timed out, before it is recorded as failed."""
    stage_timeout_s: float = 3600.0
    """Deadline of each call to the gradient workers (load, one lockstep step, scoring): a rank
    that has not answered by then fails the stage, naming it."""
    experiment_timeout_s: float = 1800.0
    """Deadline of one perturbation experiment: a stuck evaluation actor is killed and the
    experiment retried, as for an actor that died."""
    resume: bool = False
    """Continue the run in --output/--experiment-id (default: the newest unfinished one)."""
    seed: int = 0
    """Seeds the chunk split and the random controls."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code."""
    ray_address: str | None = None
    """Ray cluster to join; None uses RAY_ADDRESS or starts a local Ray."""
    output: str = "outputs"
    """Parent directory of the run directory."""
    experiment_id: str | None = None
    """Run directory name; None gives critical_analysis_<timestamp>."""
    verbose: bool = False
    """More console output, and tracebacks on errors."""

    def __post_init__(self) -> None:
        if not self.model:
            raise UsageError("--model is empty; give a Hub id, a local model directory or a .gguf file")
        _one_of("--device", self.device, ("auto", "cpu", "cuda"))
        if self.dtype == "float16":
            raise UsageError("--dtype float16 is not supported: small gradients underflow in float16 without loss "
                             "scaling; use --dtype bfloat16, or float32 (which holds a float16 checkpoint exactly)")
        _one_of("--dtype", self.dtype, ("auto", "float32", "bfloat16"))
        if not self.metrics:
            raise UsageError("--metric needs at least one metric")
        for m in self.metrics:
            if m not in METRICS:
                raise UsageError(METRICS.unknown_message(m))
        if self.perturbation_mode not in MODES:
            raise UsageError(MODES.unknown_message(self.perturbation_mode))
        if not self.topk:
            raise UsageError("--topk needs at least one value")
        for k in self.topk:
            if k <= 0:
                raise UsageError(f"--topk {k} is not positive; every K must be at least 1")
        for r in self.perturbation_ratios:
            if not (0 < r <= 1) or math.isnan(r):
                raise UsageError(f"--perturbation-ratios {r} is outside (0, 1]; a ratio is the share of the top-K to perturb")
        _positive("--seq-len", self.seq_len, minimum=2)
        _positive("--batch-size", self.batch_size)
        _positive("--fast-eval-chunks", self.fast_eval_chunks)
        if self.eval_limit is not None:
            _positive("--eval-limit", self.eval_limit)
        for flag, v in (("--stage-timeout-s", self.stage_timeout_s), ("--experiment-timeout-s", self.experiment_timeout_s)):
            if not v > 0:
                raise UsageError(f"{flag} {v} must be a positive number of seconds")
        if self.max_retries < 0:
            raise UsageError(f"--max-retries {self.max_retries} is negative")
        if self.random_seeds < 0:
            raise UsageError(f"--random-seeds {self.random_seeds} is negative")
        _positive("--num-workers", self.num_workers)
        _one_of("--shard-backend", self.shard_backend, ("auto", "zero3", "fsdp2", "none"))
        if self.shard_backend == "fsdp2" and self.gradient_checkpointing:
            raise UsageError("--gradient-checkpointing works with --shard-backend zero3 or none, not fsdp2")
        if self.shard_backend == "none" and self.num_workers > 1:
            raise UsageError("--shard-backend none runs one worker; use --shard-backend zero3 with --num-workers > 1")
        if self.cpus_per_worker is not None:
            _positive("--cpus-per-worker", self.cpus_per_worker)
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise UsageError(f"--gpus-per-worker {self.gpus_per_worker} is negative")
        for flag, v in (("--zero-reduce-bucket-size", self.zero_reduce_bucket_size),
                        ("--zero-prefetch-bucket-size", self.zero_prefetch_bucket_size),
                        ("--zero-max-live-parameters", self.zero_max_live_parameters)):
            _positive(flag, v)
        _positive("--gpus-per-eval-actor", self.gpus_per_eval_actor)
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
    def max_k(self) -> int:
        return max(self.topk)

    def backend_for(self, device: str) -> str:
        """The backend `auto` stands for. One CPU worker gains nothing from sharding and ZeRO-3's
        hooks cost it 1.5-2x in time (measured on SmolLM2), so it runs the plain replica; anything
        that shards or offloads runs ZeRO-3."""
        if self.shard_backend != "auto":
            return self.shard_backend
        single_cpu = self.num_workers == 1 and device == "cpu" and not (self.offload_params or self.offload_optimizer)
        return "none" if single_cpu else "zero3"

    def zero_settings(self):
        from cwa_dist.distributed.backends import ZeroSettings

        return ZeroSettings(
            offload_params=self.offload_params,
            offload_optimizer=self.offload_optimizer,
            reduce_bucket_size=self.zero_reduce_bucket_size,
            prefetch_bucket_size=self.zero_prefetch_bucket_size,
            max_live_parameters=self.zero_max_live_parameters,
            param_persistence_threshold=self.zero_param_persistence_threshold,
        )

    def to_dict(self) -> dict:
        return asdict(self)


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


def check_run_id(value: str, what: str) -> None:
    """A run (or sweep) id names one directory under --output: one path component of letters,
    digits, '.', '_' and '-', and not '.' or '..', so it can never point outside --output."""
    if not _RUN_ID.fullmatch(value) or value in (".", ".."):
        raise UsageError(f"{what} {value!r} must be one path component of letters, digits, '.', '_' and '-'")


def _one_of(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"{flag} {value!r} is not one of {', '.join(allowed)}")


def _positive(flag: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise UsageError(f"{flag} {value} is too small; it must be at least {minimum}")
