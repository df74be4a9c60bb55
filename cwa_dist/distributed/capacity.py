"""What the Ray cluster has now and what its autoscaler could add: GPUs, GPU memory, memory for tasks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml

from cwa_dist.planning.run_plan import ClusterView, NodeShape, autoscaler_gpus, gpu_node, worker_types


@dataclass(frozen=True, slots=True)
class Outlook:
    gpus_now: int
    gpus_possible: int  # more GPUs the autoscaler may add (0 without an autoscaler or GPU node types)
    source: str  # where gpus_possible was read
    addable: tuple[NodeShape, ...] = ()  # node types the autoscaler can add, where its config says


def outlook() -> Outlook:
    """GPUs the cluster has, and those its autoscaler could add: from the cluster config the
    autoscaler reports to the GCS (autoscaler v2, KubeRay), else from the autoscaling config file of
    the monitor process on this node (`ray up` puts it on the head; `ray start --head
    --autoscaling-config=...` names it), which is where a `ray job submit` driver runs."""
    now = int(ray.cluster_resources().get("GPU", 0))
    possible, source = _from_gcs()
    config = _autoscaling_config()
    addable = tuple(s for s, count in worker_types(config) if count) if config else _gcs_node_types()
    if not possible and config:
        possible, source = autoscaler_gpus(config), f"autoscaling config {autoscaling_config_path()}"
    return Outlook(gpus_now=now, gpus_possible=max(0, possible - now), source=source, addable=addable)


def _from_gcs() -> tuple[int, str]:
    try:
        limits = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception:  # an older GCS without the call: fall back to the config file
        return 0, ""
    gpus = int(min(limits.get("GPU", 0), 1 << 20))
    return gpus, "the cluster config the autoscaler reported" if gpus else ""


def _gcs_node_types() -> tuple[NodeShape, ...]:
    """The node groups the autoscaler reported to the GCS (autoscaler v2, KubeRay), as shapes."""
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # an older GCS without the call
        return ()
    if config is None:
        return ()
    out = []
    for group in config.node_group_configs:
        res = dict(group.resources)
        if group.max_count != 0:
            out.append(NodeShape(group.name or "?", int(res.get("CPU", 0)), int(res.get("GPU", 0)),
                                 int(res["memory"]) if res.get("memory") else None))
    return tuple(out)


def _autoscaling_config() -> dict | None:
    path = autoscaling_config_path()
    if path is None:
        return None
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def autoscaling_config_path() -> str | None:
    """The --autoscaling-config of the Ray monitor on this node that serves this cluster's GCS."""
    import psutil

    gcs = ray.get_runtime_context().gcs_address
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not any(part.endswith("monitor.py") for part in cmd):
            continue
        args = dict(a.split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
        # The same GCS may be named by another of the node's addresses (127.0.0.1 or its IP): the port decides.
        same = args.get("--gcs-address", "").rpartition(":")[2] == gcs.rpartition(":")[2]
        if same and args.get("--autoscaling-config"):
            return os.path.expanduser(args["--autoscaling-config"])
    return None


def gpu_memory_bytes() -> int | None:
    """Memory of one of the cluster's GPUs, asked of a GPU there; None when it has none yet, or
    none that answers (Ray's logical GPUs on a machine without one)."""
    if not ray.cluster_resources().get("GPU"):
        return None

    @ray.remote(num_gpus=1, num_cpus=0)
    def total_memory() -> int | None:
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None

    try:
        memory = ray.get(total_memory.remote(), timeout=120)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
        return None
    return int(memory) if memory else None


def live_nodes() -> list[NodeShape]:
    """The shapes of the cluster's alive nodes, from Ray's view of each."""
    out = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources") or {}
        out.append(NodeShape(node.get("NodeManagerAddress", "?"), int(res.get("CPU", 0)), int(res.get("GPU", 0)),
                             int(res["memory"]) if res.get("memory") else None))
    return out


def live_view(*, gpu_memory_gb: float | None) -> ClusterView:
    """The cluster this process is connected to: its GPUs now and those its autoscaler could add, its
    free CPUs, memory for tasks, the memory of one GPU (--gpu-memory-gb, else asked of one), and the
    GPU node shape (an alive GPU node, else the GPU node type the autoscaler would add)."""
    o = outlook()
    gpu_bytes = int(gpu_memory_gb * 1e9) if gpu_memory_gb else gpu_memory_bytes()
    return ClusterView(gpus_now=o.gpus_now, gpus_possible=o.gpus_possible, source=o.source,
                       free_cpus=int(ray.available_resources().get("CPU", 0)), task_memory_bytes=task_memory_bytes(),
                       gpu_bytes=gpu_bytes, gpu_node=gpu_node(live_nodes()) or gpu_node(list(o.addable)))


def task_memory_bytes() -> int:
    """Ray's memory resource: what the cluster's nodes offer to tasks and actors."""
    return int(ray.cluster_resources().get("memory", 0))
