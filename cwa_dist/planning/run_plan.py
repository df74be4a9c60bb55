"""The plan every run makes before anything is loaded or started, and that --dry-run prints.

From the model's config alone and a view of the cluster, it resolves the device, the dtype, the
backend, the gradient workers and evaluation actors with their resources, estimates each
process's peak memory (`sizing`) and checks it against the GPUs and the nodes' host memory. A plan
that cannot fit is refused before any stage, naming the flags that would make it fit.

Defaults on a GPU cluster: the gradient workers are the GPUs of one GPU node (at most those the
cluster has or its autoscaler can add), and an evaluation actor gets as many GPUs as one replica
needs. Where the ranks do not fit, the refusal names the flags that would: offloading first, then
more workers on more nodes. No Ray here: the cluster comes in as a
`ClusterView`, read from a live cluster (distributed/capacity.py) or from a cluster file.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from cwa_dist.analysis.metrics import FISHER, needed_inputs
from cwa_dist.config import RunConfig
from cwa_dist.errors import UsageError
from cwa_dist.planning.placement import actor_count
from cwa_dist.planning.sizing import Fit, GiB, Layout, ModelFacts, Need, actor_need, check_fit, device_for, rank_need

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True, slots=True)
class NodeShape:
    """One kind of node: what Ray offers on it. `memory_bytes` is Ray's memory resource (what tasks
    and actors may use), None where the source does not say."""

    name: str
    cpus: int
    gpus: int
    memory_bytes: int | None


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What a plan is made against."""

    gpus_now: int
    gpus_possible: int  # more GPUs the autoscaler may add
    source: str  # where the GPU outlook was read
    free_cpus: int
    task_memory_bytes: int  # memory for tasks in the whole cluster (the check of a CPU plan)
    gpu_bytes: int | None  # memory of one GPU, when known
    gpu_node: NodeShape | None  # the node type gradient workers and actors go to on a GPU cluster

    @property
    def gpus_total(self) -> int:
        return self.gpus_now + self.gpus_possible


@dataclass(frozen=True, slots=True)
class RunPlan:
    device: str
    device_reason: str
    dtype: torch.dtype
    dtype_note: str | None  # set when the run's dtype does not hold the checkpoint's values exactly
    backend: str
    facts: ModelFacts
    layout: Layout
    needs: list[Need]
    fit: Fit
    experiments: int
    view: ClusterView

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def record(self) -> dict:
        """What config.json and manifest.json keep of the plan."""
        lay = self.layout
        return {"device": self.device, "dtype": self.dtype_name, "dtype_note": self.dtype_note,
                "backend": self.backend, "num_workers": lay.num_workers, "gpus_per_worker": lay.gpus_per_worker,
                "cpus_per_worker": lay.cpus_per_worker, "gpus_per_eval_actor": lay.gpus_per_eval_actor,
                "num_eval_actors": lay.num_eval_actors,
                "estimates": {n.role: {"device_bytes": n.device_bytes, "host_bytes": n.host_bytes}
                              for n in self.needs}}


def experiment_count(cfg: RunConfig) -> int:
    if cfg.perturbation.no_perturbation:
        return 0
    targeted = len(cfg.perturbed_metrics)
    controls = (cfg.perturbation.random_seeds + (0 if cfg.perturbation.no_magnitude_control else 1)
                + targeted * cfg.perturbation.same_tensor_seeds)  # each ranking has its own same-tensor draws
    return len(cfg.analysis.topk) * len(cfg.perturbation.ratios) * (targeted + controls)


def dtype_choices(requested: str, device: str, stored: torch.dtype | None) -> list[torch.dtype]:
    """The dtypes a run may use, preferred first. An explicit --dtype is the only choice. `auto` is
    float32 on CPU; on GPUs, the stored dtype where it can compute (bfloat16), else float32, which
    holds float16 and float32 values exactly, with bfloat16 as the fallback where float32 does not fit."""
    if requested != "auto":
        return [{"float32": torch.float32, "bfloat16": torch.bfloat16}[requested]]
    if device != "cuda":
        return [torch.float32]
    if stored == torch.bfloat16:
        return [torch.bfloat16]
    return [torch.float32, torch.bfloat16]


def rounding_note(dtype: torch.dtype, stored: torch.dtype | None, why: str = "") -> str | None:
    """A sentence when weights stored in `stored` are changed by loading them in `dtype`."""
    if stored is None or stored == dtype or dtype in (torch.float32, torch.float64):
        return None  # float32 holds bfloat16, float16 and float32 values exactly
    return (f"the checkpoint stores {DTYPE_NAMES.get(stored, stored)}; computing in {DTYPE_NAMES[dtype]} rounds its "
            f"weights, so the reported weights are not exactly the stored ones{why}")


def make_plan(cfg: RunConfig, facts_for, *, stored: torch.dtype | None, view: ClusterView) -> RunPlan:
    """The run's plan. `facts_for(dtype)` gives the model's ModelFacts in a dtype (from its config)."""
    device, why = device_for(cfg.model.device, gpus_now=view.gpus_now, gpus_possible=view.gpus_possible,
                             gpus_asked=cfg.asks_for_gpus)
    if device == "cuda" and cfg.model.device == "cuda" and not view.gpus_total:
        raise UsageError("--device cuda, but the Ray cluster has no GPUs and its autoscaler cannot add any; "
                         "use --device cpu, join a GPU cluster, or plan against a cluster file with --cluster")
    if view.gpus_possible and not view.gpus_now:
        why += f" (read from {view.source})"
    plans = [_plan_in(cfg, facts_for(dtype), dtype, device, why, view)
             for dtype in dtype_choices(cfg.model.dtype, device, stored)]
    # The first that fits; when none does, the last, whose remedies are the cheapest to follow.
    chosen = next((p for p in plans if p.fit.ok), plans[-1])
    note = rounding_note(chosen.dtype, stored, " (float32 would not fit)" if chosen is not plans[0] else "")
    return replace(chosen, dtype_note=note)


def _plan_in(cfg: RunConfig, facts: ModelFacts, dtype: torch.dtype, device: str, why: str,
             view: ClusterView) -> RunPlan:
    n_specs = experiment_count(cfg)
    node = view.gpu_node if device == "cuda" else None
    sharding, zero = cfg.sharding, cfg.sharding.zero
    gpus_per_worker = sharding.gpus_per_worker
    if gpus_per_worker is None:
        gpus_per_worker = 1 if device == "cuda" else 0
    lay = Layout(
        device=device, dtype_bytes=dtype.itemsize, backend=sharding.backend_for(device),
        num_workers=sharding.num_workers or 1, gpus_per_worker=gpus_per_worker, cpus_per_worker=1, num_eval_actors=0,
        gpus_per_eval_actor=cfg.perturbation.gpus_per_eval_actor or 1, batch_size=cfg.data.batch_size,
        seq_len=cfg.data.seq_len, gradient_checkpointing=sharding.gradient_checkpointing,
        offload_params=zero.offload_params, offload_optimizer=zero.offload_optimizer,
        max_live_parameters=zero.max_live_parameters, prefetch_bucket_size=zero.prefetch_bucket_size,
        reduce_bucket_size=zero.reduce_bucket_size, per_window=FISHER in needed_inputs(cfg.analysis.metrics),
        replay_budget_bytes=cfg.perturbation.replay_budget_bytes,
    )
    gpu_bytes = view.gpu_bytes
    if device == "cuda":
        node_gpus = node.gpus if node and node.gpus else max(view.gpus_total, 1)
        if cfg.sharding.num_workers is None:
            lay = replace(lay, num_workers=_default_workers(lay, view.gpus_total, node_gpus))
            lay = replace(lay, backend=cfg.sharding.backend_for(device, lay.num_workers))
        if cfg.perturbation.gpus_per_eval_actor is None:
            lay = replace(lay, gpus_per_eval_actor=_default_actor_gpus(facts, lay, gpu_bytes, node_gpus))
    cpus = cfg.sharding.cpus_per_worker or _default_worker_cpus(lay, node, view.free_cpus)
    lay = replace(lay, cpus_per_worker=cpus)
    if n_specs:  # the same count the run makes once the gradient stage has freed the cluster
        free = {"CPU": view.free_cpus, "GPU": view.gpus_total, "memory": view.task_memory_bytes}
        lay = replace(lay, num_eval_actors=actor_count(cfg, device, n_specs, facts.num_parameters * lay.dtype_bytes,
                                                       free, gpus_per_actor=lay.gpus_per_eval_actor))
    host_bytes = view.task_memory_bytes if device == "cpu" else None
    fit = check_fit(facts, lay, gpu_bytes=gpu_bytes, host_bytes=host_bytes, gpus_total=view.gpus_total,
                    node_memory_bytes=node.memory_bytes if node else None,
                    node_gpus=node.gpus if node else None)
    needs = [rank_need(facts, lay)] + ([actor_need(facts, lay)] if n_specs else [])
    return RunPlan(device=device, device_reason=why, dtype=dtype, dtype_note=None, backend=lay.backend, facts=facts,
                   layout=lay, needs=needs, fit=fit, experiments=n_specs, view=view)


def _default_workers(lay: Layout, gpus_total: int, node_gpus: int) -> int:
    """One GPU node's worth of ranks: more ranks share the windows, and a node's GPUs talk over its
    own links. Ranks on more nodes are the user's choice (--num-workers): their collectives cross
    the network, and a plan that needs them names them as a remedy beside offloading."""
    per_worker = max(lay.gpus_per_worker, 1)
    return max(1, min(gpus_total, node_gpus) // per_worker)


def _default_actor_gpus(facts: ModelFacts, lay: Layout, gpu_bytes: int | None, node_gpus: int) -> int:
    """The fewest GPUs of one node that hold a replica and its forward (1 when GPU memory is unknown)."""
    if not gpu_bytes:
        return 1
    for g in range(1, max(node_gpus, 1) + 1):
        if actor_need(facts, replace(lay, gpus_per_eval_actor=g)).device_bytes <= gpu_bytes:
            return g
    return max(node_gpus, 1)


def _default_worker_cpus(lay: Layout, node: NodeShape | None, free_cpus: int) -> int:
    """On a GPU node, its CPUs in proportion to the GPUs a worker takes; on CPUs, the free CPUs shared."""
    if lay.device == "cuda" and node and node.gpus:
        return max(1, node.cpus * lay.gpus_per_worker // node.gpus)
    return max(1, free_cpus // lay.num_workers)


def refusal(plan: RunPlan) -> str:
    if plan.fit.fix:
        fix = f"; {plan.fit.fix} would make it fit"
    elif plan.device == "cuda":
        fix = ("; nothing cwa_dist can set makes it fit this cluster (offloading, more workers or more GPUs per "
               "actor were tried): it needs GPUs or nodes with more memory")
    else:
        fix = "; it needs more memory for Ray's tasks than this machine or cluster offers"
    return f"the plan does not fit: {'; '.join(plan.fit.problems)}{fix}"


def summary_lines(plan: RunPlan) -> list[str]:
    """The plan as the console shows it (the table is sizing.plan_table)."""
    v = plan.view
    lines = [f"🖥️  Cluster: {v.gpus_now} GPU(s) now, up to {v.gpus_possible} more from the autoscaler; "
             f"{v.free_cpus} free CPU(s); {v.task_memory_bytes / GiB:.1f} GiB memory for tasks"
             + (f"; {v.gpu_bytes / GiB:.1f} GiB per GPU" if v.gpu_bytes else "")
             + (f"; GPU nodes of type {v.gpu_node.name}: {v.gpu_node.gpus} GPU(s), {v.gpu_node.cpus} CPU(s)"
                + (f", {v.gpu_node.memory_bytes / GiB:.0f} GiB memory" if v.gpu_node.memory_bytes else "")
                if v.gpu_node and plan.device == "cuda" else "")]
    if plan.dtype_note:
        lines.append(f"⚠️  {plan.dtype_note}")
    return lines


# -- cluster views that need no Ray: autoscaler configs and cluster files -----------------------

def autoscaler_gpus(config: dict) -> int:
    """The most GPUs the worker node types of an autoscaler config can add (resources × max_workers,
    capped by the cluster's max_workers nodes in all)."""
    per_type = sorted(((s.gpus, count) for s, count in worker_types(config) if s.gpus), reverse=True)
    cap = int(config.get("max_workers", 1 << 20))
    total, nodes = 0, 0
    for gpus, count in per_type:
        take = max(0, min(count, cap - nodes))
        total, nodes = total + gpus * take, nodes + take
    return total


def worker_types(config: dict) -> list[tuple[NodeShape, int]]:
    """(shape, max_workers) of each worker node type of an autoscaler config (`ray up`'s cluster
    file, or the config the autoscaler runs with). Ray's `memory` resource is read where declared."""
    head = config.get("head_node_type")
    out = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        res = node_type.get("resources") or {}
        memory = res.get("memory")
        out.append((NodeShape(name, int(res.get("CPU", 0)), int(res.get("GPU", 0)),
                              int(memory) if memory else None), int(node_type.get("max_workers", 0))))
    return out


def gpu_node(shapes: list[NodeShape]) -> NodeShape | None:
    """The node shape with the most GPUs (where a run's gradient workers go), None without GPUs."""
    with_gpus = [s for s in shapes if s.gpus]
    return max(with_gpus, key=lambda s: (s.gpus, s.memory_bytes or 0)) if with_gpus else None


def cluster_file_view(path: str, *, gpu_memory_gb: float | None) -> ClusterView:
    """The cluster a `ray up` file describes, before any of it exists: every node type can be added
    up to its max_workers. GPU memory cannot be read from the file: give --gpu-memory-gb."""
    import yaml

    try:
        config = yaml.safe_load(open(path).read()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"--cluster {path}: cannot read it as a cluster file ({e})") from None
    if not isinstance(config, dict) or not config.get("available_node_types"):
        raise UsageError(f"--cluster {path}: no available_node_types; give a Ray autoscaler cluster file "
                         "(the one `ray up` takes)")
    types = worker_types(config)
    node = gpu_node([s for s, count in types if count])
    cpus = sum(s.cpus * count for s, count in types)
    memory = sum((s.memory_bytes or 0) * count for s, count in types)
    return ClusterView(gpus_now=0, gpus_possible=autoscaler_gpus(config), source=f"cluster file {path}",
                       free_cpus=cpus, task_memory_bytes=memory,
                       gpu_bytes=int(gpu_memory_gb * 1e9) if gpu_memory_gb else None, gpu_node=node)
