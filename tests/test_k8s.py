"""The Kubernetes manifests validate against the KubeRay v1 schemas (copies of ../shared/schemas/kuberay/
in tests/schemas/kuberay/), and a broken copy does not."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO / "tests" / "schemas" / "kuberay"
SHARED = REPO.parent / "shared" / "schemas" / "kuberay"
MANIFESTS = {"k8s/rayjob.yaml": "rayjob_v1.json", "k8s/raycluster.yaml": "raycluster_v1.json"}


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


@pytest.mark.parametrize("name", sorted(set(MANIFESTS.values())))
def test_the_copied_schemas_are_the_shared_ones(name):
    if not (SHARED / name).is_file():
        pytest.skip(f"no shared schemas at {SHARED} on this checkout")
    assert (SCHEMAS / name).read_bytes() == (SHARED / name).read_bytes()


def manifest(path: str) -> dict:
    docs = [d for d in yaml.safe_load_all((REPO / path).read_text()) if d]
    assert len(docs) == 1
    return docs[0]


@pytest.mark.parametrize("path", MANIFESTS)
def test_manifest_validates(path):
    doc = manifest(path)
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, schema(MANIFESTS[path]))


def test_rayjob_runs_the_documented_command_with_the_token_from_a_secret():
    job = manifest("k8s/rayjob.yaml")["spec"]
    assert job["entrypoint"].startswith("python -m cwa_dist.run --model meta-llama/Llama-2-70b-hf")
    cluster = job["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu_group = cluster["workerGroupSpecs"][0]
    assert gpu_group["minReplicas"] == 0 and gpu_group["maxReplicas"] >= 1
    container = gpu_group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    for c in (head, container):
        token = next(e for e in c["env"] if e["name"] == "HF_TOKEN")
        assert token["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
    assert "runtimeEnvYAML" not in job  # its env_vars would show in `ray job list`


def _broken(doc: dict, kind: str) -> list[dict]:
    """Copies with one mistake each: a misspelled key at the top of the spec, one inside a worker
    group, and a string where an integer belongs."""
    out = []
    spec_key = "entrypoint" if kind == "RayJob" else "rayVersion"
    a = copy.deepcopy(doc)
    a["spec"][spec_key + "x"] = a["spec"].pop(spec_key)
    out.append(a)
    groups = (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"]) if kind == "RayJob" else \
        (lambda d: d["spec"]["workerGroupSpecs"])
    b = copy.deepcopy(doc)
    groups(b)[0]["maxReplica"] = groups(b)[0].pop("maxReplicas")
    out.append(b)
    c = copy.deepcopy(doc)
    groups(c)[0]["replicas"] = "two"
    out.append(c)
    return out


@pytest.mark.parametrize("path", MANIFESTS)
def test_broken_copies_fail(path):
    doc = manifest(path)
    for bad in _broken(doc, doc["kind"]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema(MANIFESTS[path]))


@pytest.mark.parametrize("path", MANIFESTS)
def test_every_pod_has_a_memory_backed_dev_shm(path):
    """NCCL and Ray's object store use /dev/shm, 64 MiB in a pod unless a volume replaces it."""
    spec = manifest(path)["spec"]
    cluster = spec.get("rayClusterSpec", spec)
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert "/dev/shm" in mounts, group.get("groupName", "head")
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_the_rayjob_runs_the_documented_command_without_hand_tuned_workers():
    entry = manifest("k8s/rayjob.yaml")["spec"]["entrypoint"]
    for flag in ("--num-workers", "--gpus-per-worker", "--gpus-per-eval-actor"):
        assert flag not in entry
