"""Command line: python -m cwa_dist.run --model MODEL [options]."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable

from cwa_dist.config import RunConfig
from cwa_dist.errors import UsageError
from cwa_dist.metrics import METRICS
from cwa_dist.perturb import MODES


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig(model="x")  # defaults, read from the one place they are declared
    p = argparse.ArgumentParser(
        prog="python -m cwa_dist.run",
        description="Rank the weights of a causal language model by gradient-based sensitivity, "
        "then perturb the top-K against random and magnitude controls and measure perplexity.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="Hugging Face Hub id, local save_pretrained directory, or .gguf file")
    g.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="where workers run; auto = cuda if the Ray cluster has GPUs (default: %(default)s)")
    g.add_argument("--dtype", default=d.dtype, help="model dtype: float32, bfloat16, or auto = float32 on CPU, bfloat16 on GPU (float16 is refused: its gradients underflow) (default: %(default)s)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model repository to run its own Python code (off unless given)")

    g = p.add_argument_group("analysis")
    g.add_argument("--metric", dest="metrics", nargs="+", default=list(d.metrics), metavar="NAME", help=f"sensitivity metrics: {', '.join(METRICS.names())} (default: %(default)s)")
    g.add_argument("--topk", nargs="+", type=int, default=list(d.topk), metavar="K", help="ranking sizes (the largest is computed, the others are its prefixes) (default: %(default)s)")
    g.add_argument("--include-bias", action="store_true", help="also score bias vectors")
    g.add_argument("--include-norm", action="store_true", help="also score normalisation weights")

    g = p.add_argument_group("data")
    g.add_argument("--data-file", default=None, help="text file, one text per line (blank lines ignored); default: the bundled English prose")
    g.add_argument("--eval-limit", type=int, default=d.eval_limit, help="use at most this many texts (default: %(default)s)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per chunk (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="chunks per forward/backward (does not change results) (default: %(default)s)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations during backward: less memory, about a third more time")
    g.add_argument("--calibration-fraction", type=float, default=d.calibration_fraction, help="share of chunks used for gradients; the rest, disjoint, measure perplexity (default: %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the chunk split and the random controls (default: %(default)s)")

    g = p.add_argument_group("perturbation")
    g.add_argument("--perturbation-ratios", nargs="+", type=float, default=list(d.perturbation_ratios), metavar="R", help="fractions of each top-K to perturb, in (0, 1] (default: %(default)s)")
    g.add_argument("--perturbation-mode", default=d.perturbation_mode, help=f"how weights are perturbed: {', '.join(MODES.names())} (default: %(default)s)")
    g.add_argument("--random-seeds", type=int, default=d.random_seeds, help="random-K controls per (K, ratio) (default: %(default)s)")
    g.add_argument("--fast-perturbation", action="store_true", help="measure perturbations on a subset of the evaluation chunks")
    g.add_argument("--fast-eval-chunks", type=int, default=d.fast_eval_chunks, help="size of that subset (default: %(default)s)")
    g.add_argument("--no-perturbation", action="store_true", help="stop after the ranking")
    g.add_argument("--gpus-per-eval-actor", type=int, default=d.gpus_per_eval_actor, help="GPUs per evaluation actor on a GPU cluster; the model is split over them with accelerate's device_map (default: %(default)s)")
    g.add_argument("--num-eval-actors", type=int, default=None, help="evaluation actors (default: one per free CPU, or GPU)")

    g = p.add_argument_group("sharded gradients")
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="gradient workers forming one process group; parameters and gradients are sharded across them (default: %(default)s)")
    g.add_argument("--shard-backend", default=d.shard_backend, choices=["auto", "zero3", "fsdp2", "none"], help="zero3 = DeepSpeed ZeRO-3, fsdp2 = PyTorch FSDP2, none = one worker holding the whole model; auto = none for one CPU worker without offload, else zero3 (default: %(default)s)")
    g.add_argument("--cpus-per-worker", type=int, default=None, help="CPUs per gradient worker (default: the free CPUs divided evenly)")
    g.add_argument("--gpus-per-worker", type=int, default=None, help="GPUs per gradient worker (default: 1 on a GPU cluster, else 0)")
    g.add_argument("--offload-params", action="store_true", help="ZeRO-3: keep parameter partitions in CPU memory (models larger than the GPUs)")
    g.add_argument("--offload-optimizer", action="store_true", help="ZeRO-3: keep DeepSpeed's fp32 master and gradient partitions in CPU memory (70B in bf16 on 8x80 GB)")
    g.add_argument("--zero-reduce-bucket-size", type=int, default=d.zero_reduce_bucket_size, help="ZeRO-3: elements per gradient reduce-scatter bucket (default: %(default)s)")
    g.add_argument("--zero-prefetch-bucket-size", type=int, default=d.zero_prefetch_bucket_size, help="ZeRO-3: parameter elements gathered ahead of use (default: %(default)s)")
    g.add_argument("--zero-max-live-parameters", type=int, default=d.zero_max_live_parameters, help="ZeRO-3: most gathered parameter elements alive per rank (default: %(default)s)")
    g.add_argument("--zero-param-persistence-threshold", type=int, default=d.zero_param_persistence_threshold, help="ZeRO-3: parameters smaller than this stay gathered (default: %(default)s)")

    g = p.add_argument_group("run")
    g.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    g.add_argument("--output", default=d.output, help="parent directory of the run directory (default: %(default)s)")
    g.add_argument("--experiment-id", default=None, help="run directory name (default: critical_analysis_<timestamp>)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run: the one named by --experiment-id, else the newest unfinished run under --output; finished stages and experiments are kept")
    g.add_argument("--max-retries", type=int, default=d.max_retries, help="retries of an experiment whose actor died, before it is recorded as failed (default: %(default)s)")
    g.add_argument("--stage-timeout-s", type=float, default=d.stage_timeout_s, help="deadline of each call to the gradient workers; a rank that has not answered fails the stage, naming it (default: %(default)s)")
    g.add_argument("--experiment-timeout-s", type=float, default=d.experiment_timeout_s, help="deadline of one perturbation experiment; a stuck actor is killed and the experiment retried (default: %(default)s)")
    g.add_argument("--verbose", action="store_true", help="more detail, Ray's worker logs, and tracebacks on errors")
    return p


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    return RunConfig(
        model=ns.model,
        device=ns.device,
        dtype=ns.dtype,
        trust_remote_code=ns.trust_remote_code,
        metrics=tuple(ns.metrics),
        topk=tuple(ns.topk),
        include_bias=ns.include_bias,
        include_norm=ns.include_norm,
        data_file=ns.data_file,
        eval_limit=ns.eval_limit,
        seq_len=ns.seq_len,
        batch_size=ns.batch_size,
        gradient_checkpointing=ns.gradient_checkpointing,
        calibration_fraction=ns.calibration_fraction,
        seed=ns.seed,
        perturbation_ratios=tuple(ns.perturbation_ratios),
        perturbation_mode=ns.perturbation_mode,
        random_seeds=ns.random_seeds,
        fast_perturbation=ns.fast_perturbation,
        fast_eval_chunks=ns.fast_eval_chunks,
        no_perturbation=ns.no_perturbation,
        num_eval_actors=ns.num_eval_actors,
        gpus_per_eval_actor=ns.gpus_per_eval_actor,
        num_workers=ns.num_workers,
        shard_backend=ns.shard_backend,
        cpus_per_worker=ns.cpus_per_worker,
        gpus_per_worker=ns.gpus_per_worker,
        offload_params=ns.offload_params,
        offload_optimizer=ns.offload_optimizer,
        zero_reduce_bucket_size=ns.zero_reduce_bucket_size,
        zero_prefetch_bucket_size=ns.zero_prefetch_bucket_size,
        zero_max_live_parameters=ns.zero_max_live_parameters,
        zero_param_persistence_threshold=ns.zero_param_persistence_threshold,
        ray_address=ns.ray_address,
        output=ns.output,
        experiment_id=ns.experiment_id,
        verbose=ns.verbose,
        resume=ns.resume,
        max_retries=ns.max_retries,
        stage_timeout_s=ns.stage_timeout_s,
        experiment_timeout_s=ns.experiment_timeout_s,
    )


def quiet_libraries(verbose: bool) -> None:
    """Hub downloads and tokenizers print through their own loggers; unless asked, keep them quiet,
    so an error is one clear line."""
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def report_errors(work: Callable[[], None], verbose: bool) -> int:
    """Run `work`; turn what it raises into one line on stderr and an exit code (2: bad input)."""
    try:
        work()
        return 0
    except UsageError as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e} (run with --verbose for the traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    quiet_libraries(ns.verbose)

    def work() -> None:
        from cwa_dist import pipeline  # heavy imports (ray, transformers) after argument parsing

        pipeline.run(config_from_args(ns))

    return report_errors(work, ns.verbose)


if __name__ == "__main__":
    sys.exit(main())
