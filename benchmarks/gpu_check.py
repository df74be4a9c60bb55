"""The GPU check: what the CPU test suite cannot run, on one GPU, in about 8 minutes.

Run by scripts/gpu_check.sh on a GPU machine without internet (models are built locally, tokens
are random). Each step runs in its own subprocess with a timeout; every step's result (passed or
not, with its figures or its error) goes into one JSON file (--out, default
gpu_check_results.json). `--device cpu` runs the same steps on the CPU (gloo), which is how the
script itself is checked on machines without a GPU.

Steps:
1. versions: torch, CUDA, the GPU, ray, deepspeed, transformers;
2. backends: none, zero3 and fsdp2 at world 1 (nccl), in bfloat16 and float32, with grad_x_weight,
   fisher and wanda: what a rank returns holds CPU tensors only and unpickles where CUDA is hidden,
   every scored parameter is scored inside the final backward, and the float32 ranking equals a
   CPU reference;
3. offload: ZeRO-3 with --offload-optimizer, --offload-params and both, each equal to the plain run;
4. memory: a ~1.3B-parameter model under ZeRO-3 with optimizer offload: peak GPU memory, peak host
   RSS and pinned host bytes (torch.cuda.host_memory_stats) against the plan's estimates;
5. evaluation: load_replica on the device, every perturbation mode applied and restored bit for bit,
   replay from the first changed block equal to the full forward;
6. a tensor over 2 GiB read from a safetensors file onto the device.

    python benchmarks/gpu_check.py [--device cuda] [--out FILE] [--steps versions backends ...]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

STEPS = ["versions", "backends", "offload", "memory", "evaluation", "big_tensor"]
TIMEOUT_S = {"versions": 60, "backends": 240, "offload": 120, "memory": 150, "evaluation": 90, "big_tensor": 60}
K = 200
METRICS = ["grad_x_weight", "fisher", "wanda"]


def llama(path: Path, *, hidden: int, layers: int, vocab: int = 32000, dtype: str = "float32", seed: int = 0) -> None:
    """A random Llama saved with save_pretrained (no hub), weights spread so rankings separate."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.7 * hidden) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=max(2, hidden // 128),
                      num_key_value_heads=max(1, hidden // 512), max_position_embeddings=512,
                      tie_word_embeddings=False)
    net = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    net.to(getattr(torch, dtype)).save_pretrained(path, max_shard_size="1GB")


def windows(n: int, length: int, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length - i % 3,), generator=g) for i in range(n)]


def start_ray(device: str) -> None:
    import ray
    import torch

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    ray.init(address="local", num_cpus=4, num_gpus=gpus, include_dashboard=False, log_to_driver=False)


def gradient_group(path: str, dtype: str, device: str, backend: str, settings=None, metrics=METRICS, k=K):
    """One rank's report and the merged scores, through the real worker group."""
    from cwa_dist.analysis.sensitivity import select_parameters
    from cwa_dist.distributed.backends import ZeroSettings
    from cwa_dist.distributed.grad_workers import GradientGroup, merge_reports
    from cwa_dist.modeling.loading import ModelRef, empty_model, load_config

    config = load_config(Path(path), trust_remote_code=False)
    names = select_parameters(empty_model(config, dtype=__import__("torch").float32, trust_remote_code=False),
                              include_bias=False, include_norm=False)
    model = ModelRef(source=path, checkpoint_dir=path, dtype=dtype)
    group = GradientGroup(model, num_workers=1, backend=backend, device=device, cpus_per_worker=1,
                          gpus_per_worker=1 if device == "cuda" else 0, settings=settings or ZeroSettings())
    try:
        chunks = windows(6, 128, config.vocab_size)
        start = time.perf_counter()
        (report,) = group.score_calibration(chunks, scored=names, metrics=metrics, k=k, batch_size=2)
        seconds = time.perf_counter() - start
    finally:
        group.shutdown()
    return report, merge_reports([report], k), names, seconds


def same_ranking(a, b, rtol: float) -> dict:
    import numpy as np

    out = {}
    for m in a.candidates:
        x, y = a.candidates[m], b.candidates[m]
        entries = list(zip(x.names(), x.flat_index.tolist())) == list(zip(y.names(), y.flat_index.tolist()))
        close = bool(np.allclose(x.score.double().numpy(), y.score.double().numpy(), rtol=rtol, atol=0))
        out[m] = {"same_entries": entries, "scores_close": close,
                  "overlap": len(set(zip(x.names(), x.flat_index.tolist())) & set(zip(y.names(),
                                                                                       y.flat_index.tolist())))}
    return out


def unpickles_without_cuda(obj) -> bool:
    """Pickled here, loaded in a fresh process that sees no GPU (a CPU-only driver)."""
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
        pickle.dump(obj, f)
    code = "import pickle, sys; pickle.load(open(sys.argv[1], 'rb')); print('ok')"
    out = subprocess.run([sys.executable, "-c", code, f.name], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    os.unlink(f.name)
    return out.returncode == 0 and out.stdout.strip() == "ok"


def step_versions(args) -> dict:
    import deepspeed
    import ray
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu, "gpus": torch.cuda.device_count(),
            "ray": ray.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "ok": args.device == "cpu" or gpu is not None}


def step_backends(args) -> dict:
    start_ray(args.device)
    results, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        llama(Path(tmp), hidden=256, layers=2)
        reference = gradient_group(tmp, "float32", "cpu", "none")[1]  # the CPU run, same code
        for dtype in ("float32", "bfloat16"):
            for backend in ("none", "zero3", "fsdp2"):
                report, merged, names, seconds = gradient_group(tmp, dtype, args.device, backend)
                entry = {"seconds": round(seconds, 2), "scored_in_backward": report.scored_in_backward,
                         "scored": len(names), "unpickles_without_cuda": unpickles_without_cuda(report),
                         "peak_device_bytes": report.peak_device_bytes}
                if dtype == "float32":
                    entry["against_cpu"] = same_ranking(merged, reference, rtol=1e-4)
                    entry["equal_to_cpu"] = all(v["overlap"] >= 0.95 * K and v["scores_close"] or v["same_entries"]
                                                for v in entry["against_cpu"].values())
                # Sharded ranks score the Fisher after the last window's reduce-scatter: checked below.
                entry["ok"] = entry["unpickles_without_cuda"] and entry.get("equal_to_cpu", True) and (
                    report.scored_in_backward == len(names) or backend != "none")
                ok &= entry["ok"]
                results[f"{backend}/{dtype}"] = entry
        for backend in ("zero3", "fsdp2"):  # without the Fisher every parameter is scored inside backward
            report, _, names, seconds = gradient_group(tmp, "float32", args.device, backend,
                                                       metrics=["grad_x_weight", "wanda"])
            entry = {"seconds": round(seconds, 2), "scored_in_backward": report.scored_in_backward,
                     "scored": len(names), "ok": report.scored_in_backward == len(names)}
            ok &= entry["ok"]
            results[f"{backend}/float32/in_backward"] = entry
    return {"runs": results, "ok": ok}


def step_offload(args) -> dict:
    from cwa_dist.distributed.backends import ZeroSettings

    start_ray(args.device)
    results, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        llama(Path(tmp), hidden=256, layers=2)
        plain = gradient_group(tmp, "float32", args.device, "zero3", metrics=["grad_x_weight"])[1]
        for name, settings in {"optimizer": ZeroSettings(offload_optimizer=True),
                               "params": ZeroSettings(offload_params=True),
                               "both": ZeroSettings(offload_optimizer=True, offload_params=True)}.items():
            merged = gradient_group(tmp, "float32", args.device, "zero3", settings, metrics=["grad_x_weight"])[1]
            compared = same_ranking(merged, plain, rtol=1e-5)["grad_x_weight"]
            results[name] = {**compared, "ok": compared["same_entries"] and compared["scores_close"]}
            ok &= results[name]["ok"]
    return {"runs": results, "ok": ok}


def step_memory(args) -> dict:
    """ZeRO-3 at world 1 with optimizer offload on a ~1.3B model, measured against the plan."""
    import torch

    from cwa_dist.config import RunConfig
    from cwa_dist.distributed.backends import ZeroSettings
    from cwa_dist.planning.run_plan import ClusterView
    from cwa_dist.stages.plan import plan_run

    start_ray(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        hidden, layers = (2048, 24) if args.device == "cuda" else (256, 2)
        llama(Path(tmp), hidden=hidden, layers=layers, dtype="bfloat16")
        report = gradient_group(tmp, "bfloat16", args.device, "zero3", ZeroSettings(offload_optimizer=True),
                                metrics=["grad_x_weight"])[0]
        gpu = torch.cuda.get_device_properties(0).total_memory if args.device == "cuda" else 0
        view = ClusterView(gpus_now=1 if gpu else 0, gpus_possible=0, source="gpu check", free_cpus=4,
                           task_memory_bytes=2**40, gpu_bytes=gpu or None, gpu_node=None)
        plan = plan_run(RunConfig.of(model=tmp, dtype="bfloat16", offload_optimizer=True, num_workers=1,
                                  batch_size=2, no_perturbation=True, device=args.device), view)
    rank = plan.needs[0]
    measured = {"peak_device_bytes": report.peak_device_bytes, "peak_rss_bytes": report.peak_rss_bytes,
                "peak_pinned_bytes": report.peak_pinned_bytes}
    planned = {"device_bytes": rank.device_bytes, "host_bytes": rank.host_bytes, "parts": rank.parts}
    ratio = {k: round(measured[m] / planned[p], 3) if planned[p] and measured[m] else None
             for k, m, p in (("device", "peak_device_bytes", "device_bytes"), ("host", "peak_rss_bytes", "host_bytes"))}
    return {"parameters": plan.facts.num_parameters, "measured": measured, "planned": planned,
            "measured_over_planned": ratio,
            "ok": args.device == "cpu" or (ratio["device"] is not None and ratio["device"] <= 1.0)}


def step_evaluation(args) -> dict:
    import torch

    from cwa_dist.analysis.evaluate import perplexity
    from cwa_dist.analysis.perturb import MODES, ModeOptions, Targets, apply, restore, restored_exactly
    from cwa_dist.analysis.replay import BlockReplay
    from cwa_dist.modeling.checkpoint import Checkpoint
    from cwa_dist.modeling.loading import load_config, load_replica

    out, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        llama(Path(tmp), hidden=256, layers=4)
        ckpt = Checkpoint(tmp)
        model = load_replica(ckpt, load_config(Path(tmp), trust_remote_code=False), dtype=torch.float32,
                             trust_remote_code=False, device=args.device, gpus=1 if args.device == "cuda" else 0)
        ckpt.close()
        params = dict(model.named_parameters())
        chunks = windows(4, 64, 32000)
        replay = BlockReplay(model, 2**30)
        baseline = replay.capture(lambda: perplexity(model, chunks, 2), chunks, 2)
        name = "model.layers.2.mlp.down_proj.weight"
        targets = Targets([name], torch.zeros(50, dtype=torch.long), torch.arange(0, 5000, 100))
        before = {n: p.detach().clone() for n, p in params.items()}
        for mode in MODES.names():
            saved = apply(params, targets, mode, ModeOptions(seed=3))
            with replay.from_block(replay.first_block(saved.values)):
                replayed = perplexity(model, chunks, 2)
            full = perplexity(model, chunks, 2)
            restore(params, saved)
            exact = restored_exactly(params, saved) and all(torch.equal(params[n], before[n]) for n in params)
            same = replayed.window_nll == full.window_nll
            out[mode] = {"restored_exact": exact, "replay_equals_full_forward": same,
                         "ppl": full.value, "baseline_ppl": baseline.value}
            ok &= exact and same
    return {"modes": out, "ok": ok}


def step_big_tensor(args) -> dict:
    from cwa_dist.modeling.checkpoint import Checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_checkpoint import LINUX_READ_MAX, sparse_safetensors

    numel = LINUX_READ_MAX // 4 + 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        sparse_safetensors(Path(tmp) / "model.safetensors", numel, {numel - 1: 7.0})
        ckpt = Checkpoint(tmp)
        start = time.perf_counter()
        t = ckpt.read("big").to(args.device)
        seconds = time.perf_counter() - start
        ckpt.close()
        last = float(t[-1])
    return {"bytes": numel * 4, "seconds": round(seconds, 2), "last": last, "ok": last == 7.0}


def run_step(name: str, args) -> dict:
    """One step in a fresh process, under its timeout."""
    cmd = [sys.executable, __file__, "--device", args.device, "--one-step", name]
    timeout_s = TIMEOUT_S[name] * (1 if args.device == "cuda" else 5)  # 2 CPU cores are slower than one GPU
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s} s"}
    result = None
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            break
    if result is None:
        result = {"ok": False, "error": (out.stderr or out.stdout)[-3000:]}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", default="gpu_check_results.json")
    ap.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS)
    ap.add_argument("--one-step", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_step:
        try:
            result = globals()[f"step_{args.one_step}"](args)
        except Exception as e:  # reported in the JSON, not lost in a log
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        print("RESULT " + json.dumps(result, default=str))
        return
    results = {}
    for name in args.steps:
        results[name] = run_step(name, args)
        print(f"{name}: {'ok' if results[name].get('ok') else 'FAILED'} ({results[name]['wall_s']} s)", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"{sum(r.get('ok', False) for r in results.values())} passed, "
          f"{sum(not r.get('ok', False) for r in results.values())} failed")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
