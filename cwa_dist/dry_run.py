"""--dry-run: the plan of a run, and whether it fits, before anything is downloaded or started.

Reads only the model's config (a local directory, the Hub's config.json, or a .gguf header),
resolves the device, dtype, backend, workers and actors as the run would, estimates each process's
peak memory (`sizing`) and checks it against the cluster's GPUs, or its memory for tasks on CPU.
"""

from __future__ import annotations

from cwa_dist import placement
from cwa_dist.config import RunConfig
from cwa_dist.distributed import capacity
from cwa_dist.distributed.runtime import available_cpus
from cwa_dist.errors import UsageError
from cwa_dist.metrics import FISHER, MAGNITUDE, needed_inputs
from cwa_dist.models import empty_model, read_config, resolve_dtype, resolve_source
from cwa_dist.report import Reporter
from cwa_dist.sizing import GiB, Layout, actor_need, check_fit, model_facts, plan_table, rank_need


def experiment_count(cfg: RunConfig) -> int:
    if cfg.no_perturbation:
        return 0
    # |w| asked for as a metric is run once, as the control it also is.
    targeted = len(set(cfg.metrics) - {MAGNITUDE.name})
    controls = cfg.random_seeds + (0 if cfg.no_magnitude_control else 1)
    return len(cfg.topk) * len(cfg.perturbation_ratios) * (targeted + controls)


def dry_run(cfg: RunConfig, rep: Reporter) -> dict:
    """Print the plan; raise UsageError naming the flags that would fix a plan that cannot fit.
    Returns the plan's facts (for tests and callers)."""
    outlook = capacity.outlook()
    device, why = placement.resolve_device(cfg, outlook)
    dtype = resolve_dtype(cfg.dtype, device)
    backend = cfg.backend_for(device)
    config = read_config(resolve_source(cfg.model), trust_remote_code=cfg.trust_remote_code)
    facts = model_facts(empty_model(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code), config)
    gpus_total = outlook.gpus_now + outlook.gpus_possible
    n_specs = experiment_count(cfg)
    model_bytes = facts.num_parameters * dtype.itemsize
    free = {"CPU": available_cpus(), "GPU": gpus_total, "memory": capacity.task_memory_bytes()}
    lay = Layout(
        device=device, dtype_bytes=dtype.itemsize, backend=backend, num_workers=cfg.num_workers,
        gpus_per_worker=placement.worker_gpus(cfg, device), cpus_per_worker=placement.worker_cpus(cfg, free["CPU"]),
        num_eval_actors=placement.actor_count(cfg, device, max(n_specs, 1), model_bytes, free) if n_specs else 0,
        gpus_per_eval_actor=cfg.eval_actor_gpus, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
        gradient_checkpointing=cfg.gradient_checkpointing, offload_params=cfg.offload_params,
        offload_optimizer=cfg.offload_optimizer, max_live_parameters=cfg.zero_max_live_parameters,
        prefetch_bucket_size=cfg.zero_prefetch_bucket_size, reduce_bucket_size=cfg.zero_reduce_bucket_size,
        per_window=FISHER in needed_inputs(cfg.metrics), replay_budget_bytes=cfg.replay_budget_bytes,
    )
    gpu_bytes = int(cfg.gpu_memory_gb * 1e9) if cfg.gpu_memory_gb else (capacity.gpu_memory_bytes() if device == "cuda" else None)
    host_bytes = free["memory"] if device == "cpu" else None
    needs = [rank_need(facts, lay)] + ([actor_need(facts, lay)] if n_specs else [])
    fit = check_fit(facts, lay, gpu_bytes=gpu_bytes, host_bytes=host_bytes, gpus_total=gpus_total)

    rep.line("🧭 Plan (--dry-run: nothing is loaded or started)")
    rep.rule()
    rep.line(f"🤖 Model: {cfg.model}: {type(config).__name__}, {facts.num_parameters:,} parameters, "
             f"{facts.layers} blocks (largest {facts.largest_block:,}), {model_bytes / GiB:.1f} GiB in "
             f"{str(dtype).removeprefix('torch.')}")
    rep.line(f"🔧 Device: {device} ({why}); dtype {str(dtype).removeprefix('torch.')}; backend {backend}"
             + (f"; {'nccl' if device == 'cuda' else 'gloo'}" if backend != "none" else ""))
    rep.line(f"🖥️  Cluster: {outlook.gpus_now} GPU(s) now, up to {outlook.gpus_possible} more from the autoscaler; "
             f"{free['CPU']} free CPU(s); {free['memory'] / GiB:.1f} GiB memory for tasks"
             + (f"; {gpu_bytes / GiB:.1f} GiB per GPU" if gpu_bytes else ""))
    rep.line(f"🎯 Experiments: {n_specs}")
    for line in plan_table(needs):
        rep.line(line)
    if device == "cuda" and not gpu_bytes:
        rep.line("⚠️  GPU memory unknown (no GPU node exists yet): give --gpu-memory-gb to check that the plan fits")
    if not fit.ok:
        fix = f"; {fit.fix} would make it fit" if fit.fix else ""
        raise UsageError(f"the plan does not fit: {'; '.join(fit.problems)}{fix}")
    rep.line("✅ The plan fits" if (gpu_bytes or host_bytes) else "✅ Plan printed")
    return {"device": device, "dtype": str(dtype).removeprefix("torch."), "backend": backend,
            "facts": facts, "layout": lay, "needs": needs, "fit": fit}
