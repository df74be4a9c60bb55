"""The plan before the spend, without Ray: device choice, memory estimates against the cluster's
GPUs, the shipped cluster.yaml, and run directories stored under a URI (file://, through pyarrow)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import replace

import pytest
import torch
import yaml
from conftest import REPO, write_llama_config

from cwa_dist.distributed.capacity import autoscaler_gpus
from cwa_dist.modeling.loading import empty_model, read_config
from cwa_dist.modeling.sources import resolve_source
from cwa_dist.planning.resume import ResultLog, latest_unfinished
from cwa_dist.planning.sizing import GiB, Layout, check_fit, device_for, model_facts, rank_need
from cwa_dist.reporting.outputs import RunDirectory
from cwa_dist.reporting.storage import Output
from cwa_dist.run import build_parser, config_from_args


@pytest.mark.parametrize("requested,now,possible,asked,expected", [
    ("auto", 0, 0, False, "cpu"),
    ("auto", 4, 0, False, "cuda"),
    ("auto", 0, 16, False, "cuda"),  # no GPU node yet, but the autoscaler can add them
    ("auto", 0, 0, True, "cuda"),  # --gpus-per-worker / --gpus-per-eval-actor ask for them
    ("cpu", 8, 0, False, "cpu"),
])
def test_device_choice(requested, now, possible, asked, expected):
    assert device_for(requested, gpus_now=now, gpus_possible=possible, gpus_asked=asked)[0] == expected


def documented_command() -> list[str]:
    """The run command in cluster.yaml's header comment, as arguments."""
    text = (REPO / "cluster.yaml").read_text()
    lines = [line.lstrip("# ").rstrip(" \\") for line in text.splitlines()[:12]]
    start = next(i for i, line in enumerate(lines) if line.startswith("python -m cwa_dist.run"))
    command = " ".join(lines[start:start + 2])
    return shlex.split(command)[3:]


def test_shipped_cluster_and_documented_command_resolve_to_cuda_zero3_on_one_node(tmp_path):
    from ray.autoscaler._private.util import prepare_config

    from cwa_dist.planning.run_plan import cluster_file_view
    from cwa_dist.stages.plan import plan_run

    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    gpus = autoscaler_gpus(config)
    assert gpus == 16  # two 8-GPU nodes
    cfg = config_from_args(build_parser().parse_args(documented_command()))
    assert cfg.model.name == "meta-llama/Llama-2-70b-hf" and cfg.sharding.num_workers is None
    assert cfg.sharding.zero.offload_optimizer
    # The Hub model's config, as its repository holds it (no network here).
    local = write_llama_config(tmp_path / "70b", hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8)
    plan = plan_run(cfg.replace(model=str(local)), cluster_file_view(str(REPO / "cluster.yaml"), gpu_memory_gb=80))
    assert plan.device == "cuda" and plan.backend == "zero3" and plan.layout.num_workers == 8
    assert plan.fit.ok


def test_autoscaler_gpus_respects_the_cluster_node_cap():
    config = {"max_workers": 1, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 4}, "max_workers": 0},
        "a": {"resources": {"GPU": 8}, "max_workers": 3},
        "b": {"resources": {"GPU": 4}, "max_workers": 3},
        "cpu": {"resources": {"CPU": 16}, "max_workers": 5},
    }}
    assert autoscaler_gpus(config) == 8
    assert autoscaler_gpus({**config, "max_workers": 4}) == 3 * 8 + 4
    assert autoscaler_gpus({"available_node_types": {"cpu": {"resources": {"CPU": 2}, "max_workers": 9}}}) == 0


def layout(**changes) -> Layout:
    base = Layout(device="cuda", dtype_bytes=2, backend="zero3", num_workers=8, gpus_per_worker=1, cpus_per_worker=8,
                  num_eval_actors=4, gpus_per_eval_actor=2, batch_size=4, seq_len=128, gradient_checkpointing=False,
                  offload_params=False, offload_optimizer=False, max_live_parameters=10**9,
                  prefetch_bucket_size=5 * 10**7, reduce_bucket_size=5 * 10**7)
    return replace(base, **changes)


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    """Facts of Llama-2-13B and 70B, read from their configs (no weights)."""
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for name, shape in {"13b": dict(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40),
                        "70b": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8)}.items():
        config = read_config(resolve_source(str(write_llama_config(root / name, **shape))), trust_remote_code=False)
        out[name] = model_facts(empty_model(config, dtype=torch.bfloat16, trust_remote_code=False), config)
    return out


def test_model_facts_from_config_alone(llama2):
    # Published sizes: Llama-2-13B 13,015,864,320 and 70B 68,976,648,192 parameters.
    assert llama2["13b"].num_parameters == 13_015_864_320
    assert llama2["70b"].num_parameters == 68_976_648_192
    h, i = 8192, 28672
    assert llama2["70b"].largest_block == 2 * h * h + 2 * (h * h // 8) + 3 * h * i + 2 * h  # q, o; GQA k, v; MLP; norms


def test_70b_on_8x80gb_needs_optimizer_offload(llama2):
    m, gpu = llama2["70b"], 80 * 10**9
    refused = check_fit(m, layout(), gpu_bytes=gpu, host_bytes=None, gpus_total=8)
    assert not refused.ok and refused.fix == "--offload-optimizer"
    # The initialisation peak: 2 + 2 + 4 + 4 bytes per parameter of the rank's eighth (docs/scaling.md).
    assert rank_need(m, layout()).device_bytes > 12 * m.num_parameters / 8
    assert check_fit(m, layout(offload_optimizer=True), gpu_bytes=gpu, host_bytes=None, gpus_total=8).ok


def test_13b_fits_four_80gb_gpus_not_one_24gb_gpu(llama2):
    m = llama2["13b"]
    assert check_fit(m, layout(num_workers=4, gpus_per_eval_actor=1), gpu_bytes=80 * 10**9, host_bytes=None,
                     gpus_total=4).ok
    small = check_fit(m, layout(num_workers=1, gpus_per_eval_actor=1), gpu_bytes=24 * 10**9, host_bytes=None,
                      gpus_total=1)
    assert not small.ok
    assert any(p.startswith("evaluation actor") for p in small.problems)  # a 26 GB replica on a 24 GB GPU


def test_an_actor_too_large_for_one_gpu_is_told_how_many_it_needs(llama2):
    fit = check_fit(llama2["70b"], layout(offload_optimizer=True, gpus_per_eval_actor=1), gpu_bytes=80 * 10**9,
                    host_bytes=None, gpus_total=8)
    assert not fit.ok and fit.fix == "--gpus-per-eval-actor 2"


def test_a_cpu_plan_is_checked_against_the_memory_for_tasks(llama2):
    lay = layout(device="cpu", dtype_bytes=4, backend="none", num_workers=1, gpus_per_worker=0,
                 num_eval_actors=1, gpus_per_eval_actor=1)
    fit = check_fit(llama2["13b"], lay, gpu_bytes=None, host_bytes=16 * GiB)
    assert not fit.ok and "memory for tasks" in fit.problems[0]


# -- run directories under a URI ---------------------------------------------------------------

def test_a_run_under_a_uri_uploads_every_file_as_written_and_pulls_it_back(tmp_path, monkeypatch):
    monkeypatch.setenv("CWA_DIST_STAGING", str(tmp_path / "staging"))
    remote = tmp_path / "bucket"
    remote.mkdir()
    output = Output(f"file://{remote}")
    output.check_writable()
    output.pull("r1")
    run = RunDirectory.create(output.local / "r1", on_write=output.uploader("r1"), where=output.where("r1"))
    run.write_json("manifest.json", {"status": "running"})
    run.write_json("plots/nested.json", [1, 2])
    log = ResultLog(run.path / "perturbation_results.jsonl", on_write=run.on_write)
    log.append({"key": "a", "status": "ok"})
    assert json.loads((remote / "r1" / "manifest.json").read_text()) == {"status": "running"}
    assert json.loads((remote / "r1" / "plots" / "nested.json").read_text()) == [1, 2]
    assert (remote / "r1" / "perturbation_results.jsonl").read_text().count("\n") == 1  # synced per line

    # Another machine's staging copy: pulled from the URI, the newest unfinished run found there.
    monkeypatch.setenv("CWA_DIST_STAGING", str(tmp_path / "elsewhere"))
    again = Output(f"file://{remote}")
    assert latest_unfinished(again.manifests()) == "r1"
    again.pull("r1")
    assert ResultLog(again.local / "r1" / "perturbation_results.jsonl").read() == [{"key": "a", "status": "ok"}]
    assert run.where == f"file://{remote}/r1"


def test_an_unusable_uri_is_refused_in_one_line():
    from cwa_dist.errors import UsageError

    with pytest.raises(UsageError, match=re.escape("--output nosuch://x")):
        Output("nosuch://x")


def test_a_gguf_is_planned_from_its_header_without_converting(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setenv("CWA_DIST_CACHE", str(tmp_path / "cache"))
    config = read_config(resolve_source(str(smollm2_path)), trust_remote_code=False)
    facts = model_facts(empty_model(config, dtype=torch.float32, trust_remote_code=False), config)
    assert facts.num_parameters == 134_515_008 and facts.layers == 30 and facts.vocab == 49152  # SmolLM2-135M
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing cached


def test_the_fisher_adds_its_two_float32_buffers_to_each_rank(llama2):
    m = llama2["13b"]
    plain, fisher = rank_need(m, layout(num_workers=4)), rank_need(m, layout(num_workers=4, per_window=True))
    assert fisher.device_bytes - plain.device_bytes == 2 * 4 * -(-m.num_parameters // 4)
