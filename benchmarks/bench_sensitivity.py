"""Sensitivity-stage benchmark on SmolLM2-135M (float32) with the bundled default text.

Each side runs in a fresh process of its own (this script re-runs itself with --side), loads the
model tensor by tensor from the converted safetensors checkpoint, resets the kernel's peak-RSS
mark (/proc/self/clear_refs) and runs twice: memory is read from the first pass (a second one
would reuse what the allocator kept from the first, hiding it), time from the second (warm):

  bare   what a user would write in plain PyTorch: the same parameters requiring grad as the stage
         (the scored matrices), use_cache=False, mean loss per batch, backward;
  stage  cwa_dist's stage as one gradient worker runs it (its backend, without Ray): accumulation of
         the token-weighted mean NLL's gradient, each weight scored and the exact local top-K kept
         inside the final step's backward, each gradient freed once scored.

Prints, at the calibration set's tokens and at four times as many (each window four times):
  (a) stage seconds / bare seconds (target <= 1.10);
  (b) scoring + exact top-K seconds over all scored weights (target <= 0.5 s);
  (c) stage peak memory / (parameters + gradients) (target <= 1.25), the peak being the kernel's
      high-water mark (VmHWM) during the pass, above the loaded process, plus the parameters.

    python benchmarks/bench_sensitivity.py [--seq-len 128] [--batch-size 4] [--k 1000] [--gradient-checkpointing]
    python benchmarks/bench_sensitivity.py --in-run    # the real CLI with Ray, against the bare pass

--gradient-checkpointing applies to the stage only (what --gradient-checkpointing does in a run); the
bare side stays plain PyTorch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from cwa_dist.analysis.data import load_texts, split_documents, tokenize_documents
from cwa_dist.analysis.evaluate import attention_mask, batches, predicted_tokens
from cwa_dist.analysis.sensitivity import checkpoint_blocks, prepare_gradients, select_parameters
from cwa_dist.distributed.backends import ReplicaBackend, ZeroSettings
from cwa_dist.modeling.loading import ModelRef, load_tokenizer
from cwa_dist.modeling.sources import resolve_checkpoint, resolve_source
from cwa_dist.smollm2 import ensure_smollm2


def _status(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def bare_pass(net, chunks, batch_size, scored):
    prepare_gradients(net, scored)
    for ids, mask in batches(chunks, batch_size):
        logits = net(input_ids=ids, attention_mask=attention_mask(mask), use_cache=False).logits
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100).backward()


def stage_pass(backend, chunks, batch_size, scored, k) -> float:
    """The gradient stage exactly as a worker runs it (its backend, without Ray): every parameter
    scored inside the final step's backward as its gradient completes, then freed. Returns the
    seconds spent scoring."""
    backend.prepare(scored, False, metrics=["grad_x_weight"], k=k, keep_gradients=False)
    steps = list(batches(chunks, batch_size))
    total = predicted_tokens(chunks)
    for i, (ids, mask) in enumerate(steps):
        backend.step_start(final=i == len(steps) - 1)
        backend.forward_backward(ids, mask, total)
        backend.step_end(None)
    return backend.finish_scoring(["grad_x_weight"], k).seconds


def side(args) -> None:
    """One side, one process; prints one JSON line."""
    torch.manual_seed(0)
    path = resolve_checkpoint(resolve_source(str(ensure_smollm2())), announce=lambda _: None)
    backend = ReplicaBackend()  # loads tensor by tensor from the checkpoint, as a worker does
    backend.load(ModelRef(source=str(path), checkpoint_dir=str(path), dtype="float32"), device="cpu", rank=0,
                 world_size=1, settings=ZeroSettings())
    net = backend.model
    cal = split_documents(tokenize_documents(load_tokenizer(path, trust_remote_code=False), load_texts(None, None),
                                             args.seq_len), 0.5, seed=0).calibration * args.factor
    scored = select_parameters(net, include_bias=False, include_norm=False)
    if args.side == "stage" and args.gradient_checkpointing:
        checkpoint_blocks(net)  # prepare() would do the same
    params = dict(net.named_parameters())
    out = {"param_bytes": sum(p.numel() * p.element_size() for p in params.values()),
           "grad_bytes": sum(params[n].numel() * params[n].element_size() for n in scored),
           "scored": sum(params[n].numel() for n in scored), "tokens": predicted_tokens(cal), "windows": len(cal)}
    for attempt in ("first", "second"):
        for p in net.parameters():
            p.grad = None
        _reset_peak()
        loaded = _status("VmRSS")
        start = time.perf_counter()
        scoring = stage_pass(backend, cal, args.batch_size, scored, args.k) if args.side == "stage" else 0.0
        if args.side == "bare":
            bare_pass(net, cal, args.batch_size, scored)
        if attempt == "first":
            out["peak_above_loaded"] = _status("VmHWM") - loaded
            out["first_seconds"] = time.perf_counter() - start
        else:
            out.update(seconds=time.perf_counter() - start, scoring_s=scoring)
    print(json.dumps(out))


def run_side(args, which: str, factor: int) -> dict:
    cmd = [sys.executable, __file__, "--side", which, "--factor", str(factor), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--k", str(args.k)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli_backward_seconds(args, out_dir: str) -> float:
    """One real run (`python -m cwa_dist.run`, its own embedded Ray) stopped after the ranking:
    the gradient worker's own clock over its forward and backward passes, scoring included."""
    run_id = f"in_run_{time.time_ns()}"
    cmd = [sys.executable, "-m", "cwa_dist.run", "--model", str(ensure_smollm2()), "--metric", "grad_x_weight",
           "--topk", str(args.k), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--no-perturbation", "--output", out_dir, "--experiment-id", run_id]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    with open(f"{out_dir}/{run_id}/experiment_summary.json") as f:
        (worker,) = json.load(f)["sensitivity"]["workers"]
    return worker["backward_s"]


def in_run(args) -> None:
    import tempfile

    print("SmolLM2-135M float32: the gradient stage inside a real run (one gradient worker on the embedded Ray, "
          "its backward_s) against the bare forward+backward, each in a fresh process, fastest of three")
    bare = [run_side(args, "bare", 1) for _ in range(3)]
    with tempfile.TemporaryDirectory() as out:
        runs = [cli_backward_seconds(args, out) for _ in range(3)]
    cold, warm = min(b["first_seconds"] for b in bare), min(b["seconds"] for b in bare)
    firsts = ", ".join(f"{b['first_seconds']:.2f}" for b in bare)
    print(f"  bare: first pass {cold:.2f} s (runs: {firsts}), second pass {warm:.2f} s")
    print(f"  in the run: {min(runs):.2f} s (runs: {', '.join(f'{r:.2f}' for r in runs)})")
    print(f"  in-run / bare first pass = {min(runs) / cold:.3f}   (target <= 1.10; the run makes one pass, as a "
          f"user's script would); / bare second pass = {min(runs) / warm:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--side", choices=["bare", "stage"])
    ap.add_argument("--factor", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--in-run", action="store_true",
                    help="the real CLI on its embedded Ray against the bare pass, fastest of three each")
    args = ap.parse_args()
    if args.side:
        return side(args)
    if args.in_run:
        return in_run(args)
    print(f"SmolLM2-135M float32, seq_len {args.seq_len}, batch {args.batch_size}, K {args.k}, "
          f"{torch.get_num_threads()} threads, stage block checkpointing {args.gradient_checkpointing}; each side a "
          "fresh process, memory from its first pass, time from its second")
    for factor in (1, 4):
        bare, stage = run_side(args, "bare", factor), run_side(args, "stage", factor)
        held = stage["param_bytes"] + stage["grad_bytes"]
        print(f"\n{stage['windows']} windows, {stage['tokens']:,} predicted tokens ({factor}x the calibration set), "
              f"{stage['scored']:,} scored weights")
        print(f"  bare forward+backward {bare['seconds']:.2f} s; stage {stage['seconds']:.2f} s "
              f"(of which scoring + exact top-K {stage['scoring_s']:.2f} s)")
        print(f"  (a) stage / bare = {stage['seconds'] / bare['seconds']:.3f}   (target <= 1.10)")
        print(f"  (b) scoring + exact top-K = {stage['scoring_s']:.2f} s   (target <= 0.5 s)")
        print(f"  (c) stage peak / (params + grads) = {(stage['param_bytes'] + stage['peak_above_loaded']) / held:.3f}"
              f"   (target <= 1.25); bare: {(bare['param_bytes'] + bare['peak_above_loaded']) / held:.3f}")


if __name__ == "__main__":
    main()
