"""What the Ray cluster has now and what its autoscaler could add: GPUs, GPU memory, memory for tasks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml


@dataclass(frozen=True, slots=True)
class Outlook:
    gpus_now: int
    gpus_possible: int  # more GPUs the autoscaler may add (0 without an autoscaler or GPU node types)
    source: str  # where gpus_possible was read


def outlook() -> Outlook:
    """GPUs the cluster has, and those its autoscaler could add: from the cluster config the
    autoscaler reports to the GCS (autoscaler v2, KubeRay), else from the autoscaling config file of
    the monitor process on this node (`ray up` puts it on the head; `ray start --head
    --autoscaling-config=...` names it), which is where a `ray job submit` driver runs."""
    now = int(ray.cluster_resources().get("GPU", 0))
    possible, source = _from_gcs()
    if not possible:
        possible, source = _from_autoscaling_config()
    return Outlook(gpus_now=now, gpus_possible=max(0, possible - now), source=source)


def _from_gcs() -> tuple[int, str]:
    try:
        limits = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception:  # an older GCS without the call: fall back to the config file
        return 0, ""
    gpus = int(min(limits.get("GPU", 0), 1 << 20))
    return gpus, "the cluster config the autoscaler reported" if gpus else ""


def _from_autoscaling_config() -> tuple[int, str]:
    path = autoscaling_config_path()
    if path is None:
        return 0, ""
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return 0, ""
    return autoscaler_gpus(config), f"autoscaling config {path}"


def autoscaler_gpus(config: dict) -> int:
    """The most GPUs the worker node types of an autoscaler config can add (resources × max_workers,
    capped by the cluster's max_workers nodes in all)."""
    head = config.get("head_node_type")
    per_type = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        gpus = int((node_type.get("resources") or {}).get("GPU", 0))
        if name != head and gpus:
            per_type.append((gpus, int(node_type.get("max_workers", 0))))
    cap = int(config.get("max_workers", 1 << 20))
    total, nodes = 0, 0
    for gpus, count in sorted(per_type, reverse=True):
        take = max(0, min(count, cap - nodes))
        total, nodes = total + gpus * take, nodes + take
    return total


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
    """Memory of one of the cluster's GPUs, asked of a GPU there; None when it has none yet."""
    if not ray.cluster_resources().get("GPU"):
        return None

    @ray.remote(num_gpus=1, num_cpus=0)
    def total_memory() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    return int(ray.get(total_memory.remote(), timeout=120))


def task_memory_bytes() -> int:
    """Ray's memory resource: what the cluster's nodes offer to tasks and actors."""
    return int(ray.cluster_resources().get("memory", 0))
