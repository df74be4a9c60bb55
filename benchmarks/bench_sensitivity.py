"""Sensitivity-stage benchmark on SmolLM2-135M with the bundled default text.

Prints:
  (a) sensitivity stage wall time / bare forward+backward over the same calibration tokens in
      plain PyTorch (target <= 1.15), both in this process and through a real Ray worker;
  (b) global ranking time over all scored weights (scoring + local top-K + merge);
  (c) peak memory of the stage / bytes of parameters plus gradients (target <= 1.3).

    python benchmarks/bench_sensitivity.py [--seq-len 128] [--batch-size 4] [--k 1000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import gc
import os
import threading
import time

import psutil
import torch
import torch.nn.functional as F

from cwa_dist.data import load_texts, split_documents, tokenize_documents
from cwa_dist.evaluate import batches, predicted_tokens
from cwa_dist.models import ModelRef, load_pretrained
from cwa_dist.sensitivity import (
    accumulate_gradients,
    checkpoint_blocks,
    full_shards,
    prepare_gradients,
    score_shards,
    select_parameters,
)
from cwa_dist.smollm2 import ensure_smollm2
from cwa_dist.topk import merge


class PeakRSS:
    """Samples this process's resident memory every few milliseconds while active."""

    def __init__(self):
        self.proc = psutil.Process(os.getpid())
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def bare_forward_backward(net, chunks, batch_size):
    """What a user would write in plain PyTorch: mean loss per batch, backward."""
    for p in net.parameters():
        p.requires_grad_(True)
        p.grad = None
    for ids, mask in batches(chunks, batch_size):
        logits = net(input_ids=ids, attention_mask=mask).logits
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100).backward()


def sensitivity_stage(net, chunks, batch_size, scored, k):
    prepare_gradients(net, scored)
    start = time.perf_counter()
    accumulate_gradients(net, chunks, batch_size=batch_size, total_tokens=predicted_tokens(chunks))
    backward_s = time.perf_counter() - start
    start = time.perf_counter()
    result = score_shards(full_shards(net, scored), ["grad_x_weight"], k)
    return backward_s, time.perf_counter() - start, result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)

    rss_before_model = psutil.Process().memory_info().rss
    net, tok, _ = load_pretrained(str(ensure_smollm2()), dtype=torch.float32)
    gc.collect()
    cal = split_documents(tokenize_documents(tok, load_texts(None, None), args.seq_len), 0.5, seed=0).calibration
    scored = select_parameters(net, include_bias=False, include_norm=False)
    params = dict(net.named_parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    grad_bytes = sum(params[n].numel() * params[n].element_size() for n in scored)
    n_scored = sum(params[n].numel() for n in scored)
    print(f"model: SmolLM2-135M fp32, {sum(p.numel() for p in params.values()):,} parameters, {n_scored:,} scored")
    print(f"block checkpointing in the stage: {args.gradient_checkpointing}")
    print(f"calibration: {len(cal)} chunks, {predicted_tokens(cal):,} predicted tokens, "
          f"seq_len {args.seq_len}, batch {args.batch_size}, torch threads {torch.get_num_threads()}")

    bare, stage, backward, scoring = [], [], [], []
    # The stage runs first, in a process that has held no gradients yet: the allocator keeps freed
    # memory, so whatever ran before would hide in the baseline or inflate the peak.
    rss_loaded = psutil.Process().memory_info().rss
    if args.gradient_checkpointing:
        checkpoint_blocks(net)
    for _ in range(args.repeats):
        gc.collect()
        with PeakRSS() as peak:
            start = time.perf_counter()
            b, s, result = sensitivity_stage(net, cal, args.batch_size, scored, args.k)
            stage.append(time.perf_counter() - start)
        backward.append(b)
        scoring.append(s)
        if len(stage) == 1:
            peak_ratio = (peak.peak - rss_before_model) / (param_bytes + grad_bytes)
            # Counting only the parameters of what the loaded process held (the GGUF loader
            # leaves some hundred MB behind that no stage can give back).
            stage_ratio = (param_bytes + peak.peak - rss_loaded) / (param_bytes + grad_bytes)
        for p in net.parameters():
            p.grad = None
    if args.gradient_checkpointing:
        net = load_pretrained(str(ensure_smollm2()), dtype=torch.float32)[0]
    for _ in range(args.repeats):
        gc.collect()
        with PeakRSS() as bare_peak:
            start = time.perf_counter()
            bare_forward_backward(net, cal, args.batch_size)
            bare.append(time.perf_counter() - start)
        bare_peak_ratio = (bare_peak.peak - rss_before_model) / (param_bytes + grad_bytes)
        for p in net.parameters():
            p.grad = None

    # (b) the merge the driver does, on this single worker's candidates
    start = time.perf_counter()
    for candidates in result.candidates.values():
        merge([candidates], args.k)
    merge_s = time.perf_counter() - start

    print(f"bare forward+backward (plain PyTorch): {min(bare):.2f}s (runs: {', '.join(f'{t:.2f}' for t in bare)})")
    print(f"sensitivity stage in-process:          {min(stage):.2f}s = backward {min(backward):.2f}s "
          f"+ scoring/top-K {min(scoring):.2f}s")
    print(f"(a) stage / bare forward+backward:     {min(stage) / min(bare):.3f}   (target <= 1.15)")
    print(f"(b) global ranking over {n_scored:,} weights, K={args.k}: {min(scoring):.2f}s scoring + local top-K, "
          f"{merge_s * 1000:.1f} ms merge")
    print(f"(c) stage peak memory / (params + grads): {peak_ratio:.3f}   (target <= 1.3; "
          f"params {param_bytes / 2**20:.0f} MiB + grads {grad_bytes / 2**20:.0f} MiB, RSS above the pre-model process)")
    print(f"(c) counting from the loaded model instead of the empty process: {stage_ratio:.3f}")
    print(f"(c') for comparison, bare forward+backward peak / (params + grads): {bare_peak_ratio:.3f} "
          "(measured after the stage, so at least the stage's retained memory)")

    if not args.skip_ray:
        ray_stage(net, cal, args, scored, min(bare))


def ray_stage(net, cal, args, scored, bare_s):
    """The same stage through the real Ray gradient worker the CLI uses."""
    import ray

    from cwa_dist.distributed.backends import ZeroSettings
    from cwa_dist.distributed.grad_workers import GradientGroup, merge_reports

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        _, _, path = load_pretrained(str(ensure_smollm2()), dtype=torch.float32, build=False)
        model = ModelRef(source=str(path), checkpoint_dir=str(path), dtype="float32")
        total = predicted_tokens(cal)
        for backend in ("none", "zero3"):
            group = GradientGroup(model, num_workers=1, backend=backend, device="cpu",
                                  cpus_per_worker=os.cpu_count(), gpus_per_worker=0, settings=ZeroSettings())
            runs = []
            for _ in range(args.repeats):
                group.call("begin", scored, args.gradient_checkpointing)
                start = time.perf_counter()
                for i in range(0, len(cal), args.batch_size):
                    group.call("backward", cal[i : i + args.batch_size], total_tokens=total)
                (report,) = group.call("score", scored=scored, metrics=["grad_x_weight"], k=args.k)
                merge_reports([report], args.k)
                runs.append(time.perf_counter() - start)
            group.shutdown()
            print(f"(a') stage through one Ray worker, backend {backend}: {min(runs):.2f}s "
                  f"(runs: {', '.join(f'{t:.2f}' for t in runs)}); / bare forward+backward: {min(runs) / bare_s:.3f}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
