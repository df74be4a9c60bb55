"""Memory of every process, measured, on a random ~600M-parameter Llama saved as several
safetensors files (2.4 GB in float32), and on SmolLM2-135M.

Every figure is a kernel high-water mark of one process's own resident memory: the driver's and
an idle Ray driver's read from outside (/proc/PID/status VmHWM, sampled until the process
exits); each gradient rank's and evaluation actor's read by the process itself at the end
(getrusage ru_maxrss). Load times from a clock.

    python benchmarks/bench_memory.py [--models llama600m smollm2] [--skip-driver]

Targets (issue 8): driver <= 0.5 GiB above an idle Ray driver, the same at 135M and 600M; a rank's
peak at world 2 <= 0.6 x at world 1; an evaluation actor <= 1.15 x the model's bytes + 0.5 GiB.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

GiB = 2**30
IDLE_DRIVER = """
import ray, torch, transformers, cwa_dist.pipeline
ray.init(address="local", include_dashboard=False, log_to_driver=False)
import time; time.sleep(3)
ray.shutdown()
"""


def vm_hwm(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_of(cmd: list[str]) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, vm_hwm(proc.pid))
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(proc.stderr.read()[-2000:])
    return peak


def llama600m(path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                      num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, max_shard_size="500MB")


def main() -> None:
    from cwa_dist.analysis.data import load_texts, tokenize_chunks
    from cwa_dist.analysis.sensitivity import select_parameters
    from cwa_dist.distributed.backends import ZeroSettings
    from cwa_dist.distributed.eval_actors import EvalPool
    from cwa_dist.distributed.grad_workers import GradientGroup
    from cwa_dist.modeling.checkpoint import Checkpoint
    from cwa_dist.modeling.loading import ModelRef, empty_model, load_config, load_tokenizer
    from cwa_dist.modeling.sources import resolve_checkpoint, resolve_source
    from cwa_dist.smollm2 import ensure_smollm2

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2", "llama600m"])
    ap.add_argument("--backends", nargs="+", default=["zero3", "fsdp2"])
    ap.add_argument("--parts", nargs="+", default=["driver", "ranks", "actor"], choices=["driver", "ranks", "actor"])
    ap.add_argument("--skip-driver", action="store_true", help="same as leaving 'driver' out of --parts")
    args = ap.parse_args()
    if args.skip_driver and "driver" in args.parts:
        args.parts.remove("driver")

    smol = resolve_checkpoint(resolve_source(str(ensure_smollm2())), announce=print)
    tok = load_tokenizer(smol, trust_remote_code=False)
    texts = load_texts(None, 8)
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    idle = 0 if "driver" not in args.parts else peak_of([sys.executable, "-c", IDLE_DRIVER])
    if idle:
        print(f"idle Ray driver (imports + ray.init): peak RSS {idle / GiB:.2f} GiB")
    for name in args.models:
        if name == "smollm2":
            path = smol
        else:
            path = tmp / name
            start = time.perf_counter()
            llama600m(path)
            print(f"{name}: built and saved in {time.perf_counter() - start:.0f}s")
        ckpt = Checkpoint(path)
        model_bytes = ckpt.nbytes()
        files = len({t.file for t in ckpt.tensors.values()})
        print(f"\n== {name}: {model_bytes / GiB:.2f} GiB of weights in {files} safetensors file(s)")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if not (path / f).exists() and (smol / f).exists():
                (path / f).write_bytes((smol / f).read_bytes())
        if "driver" in args.parts:
            out = tmp / f"runs_{name}"
            peak = peak_of([sys.executable, "-m", "cwa_dist.run", "--model", str(path), "--seq-len", "64",
                            "--eval-limit", "4", "--batch-size", "1", "--topk", "10", "--perturbation-ratios", "1.0",
                            "--random-seeds", "1", "--num-eval-actors", "1", "--output", str(out)])
            print(f"driver, whole run: peak RSS {peak / GiB:.2f} GiB = idle + {(peak - idle) / GiB:.2f} GiB "
                  f"(target <= 0.5 GiB above idle)")
        skeleton = empty_model(load_config(path, trust_remote_code=False), dtype=torch.float32, trust_remote_code=False)
        names = select_parameters(skeleton, include_bias=False, include_norm=False)
        vocab = skeleton.config.vocab_size
        chunks = [c % vocab for c in tokenize_chunks(tok, texts, 128)[:2]]
        model = ModelRef(source=str(path), checkpoint_dir=str(path), dtype="float32")
        if not {"ranks", "actor"} & set(args.parts):
            continue
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for backend in args.backends if "ranks" in args.parts else []:
                peaks = {}
                for world in (1, 2):
                    start = time.perf_counter()
                    group = GradientGroup(model, num_workers=world, backend=backend, device="cpu",
                                          cpus_per_worker=max(1, 2 // world), gpus_per_worker=0,
                                          settings=ZeroSettings())
                    load_s = time.perf_counter() - start
                    try:
                        reports = group.score_calibration(chunks, scored=names, metrics=["grad_x_weight"], k=100,
                                                          batch_size=1)
                    finally:
                        group.shutdown()
                    peaks[world] = max(r.peak_rss_bytes for r in reports)
                    print(f"{backend} rank, world {world}: peak RSS {peaks[world] / GiB:.2f} GiB "
                          f"({peaks[world] / model_bytes:.2f} x model), tensors held after scoring "
                          f"{max(r.live_tensor_bytes for r in reports) / GiB:.2f} GiB, "
                          f"group start + load {load_s:.1f}s")
                print(f"{backend}: rank peak world 2 / world 1 = {peaks[2] / peaks[1]:.3f} (target <= 0.6)")
            if "actor" not in args.parts:
                continue
            pool = EvalPool(model, chunks, num_actors=1, device="cpu", gpus_per_actor=0, batch_size=1)
            try:
                pool.describe()
                (m,) = pool.memory()
            finally:
                pool.shutdown()
            bound = 1.15 * model_bytes + 0.5 * GiB
            print(f"evaluation actor: loaded in {m['load_s']:.1f}s, peak RSS {m['peak_rss_bytes'] / GiB:.2f} GiB "
                  f"(target <= 1.15 x model + 0.5 GiB = {bound / GiB:.2f} GiB)")
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
