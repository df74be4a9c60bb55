"""DeepSpeed ZeRO-3's host memory per parameter, measured, with and without --offload-optimizer.

Each setting runs in a fresh process: one ZeRO-3 rank at world size 1 (gloo) loads a random
Llama from its safetensors files through the real backend, then runs one calibration backward.
Measured in that process:
- the bytes of every tensor storage the DeepSpeed optimizer holds, by role (found by walking its
  attributes: the fp32 master partitions, their gradient buffers, the flat gradient-partition
  buffer), each storage counted once;
- the bytes of every CPU tensor storage the process holds (memory.live_tensor_bytes);
- the kernel's high-water mark of its resident memory (VmHWM), before loading and at the end.
Printed per parameter. On a CPU machine every buffer is host memory whatever the setting; what
the offload setting adds is the buffers DeepSpeed keeps on the host for the GPU's partitions,
which is what sizing.py charges each rank's node. Pinned-memory rounding needs a GPU
(torch.cuda.host_memory_stats; benchmarks/gpu_check.py).

    python benchmarks/bench_offload_host.py [--hidden 1024 --layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROLE_ATTRIBUTES = {
    "fp32 master partitions": "fp32_partitioned_groups_flat",
    "flat gradient-partition buffer": "grad_partitions_flat_buffer",
}


def storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if t is None or t.device.type != "cpu" or t.numel() == 0:
            continue
        s = t.untyped_storage()
        out[s.data_ptr()] = max(out.get(s.data_ptr(), 0), s.nbytes())
    return out


def rank(path: str, offload: bool) -> dict:
    import torch

    from cwa_dist.analysis.sensitivity import select_parameters
    from cwa_dist.distributed.backends import Zero3Backend, ZeroSettings
    from cwa_dist.distributed.process_group import init_group
    from cwa_dist.modeling.loading import ModelRef
    from cwa_dist.reporting.memory import current_rss_bytes, live_tensor_bytes, peak_rss_bytes

    torch.set_num_threads(2)
    init_group(rank=0, world_size=1, address="127.0.0.1", port=29533 + offload, backend="gloo")
    before = current_rss_bytes()
    backend = Zero3Backend()
    backend.load(ModelRef(source=path, checkpoint_dir=path, dtype="float32"), device="cpu", rank=0, world_size=1,
                 settings=ZeroSettings(offload_optimizer=offload))
    names = select_parameters(backend.model, include_bias=False, include_norm=False)
    backend.prepare(names, False, metrics=["grad_x_weight"], k=100, keep_gradients=False)
    ids = torch.randint(0, 32000, (2, 64))
    backend.step_start(final=True)
    backend.forward_backward(ids, torch.ones_like(ids), total_tokens=126)
    backend.step_end(None)
    backend.finish_scoring(["grad_x_weight"], 100)
    opt = backend.engine.optimizer
    roles = {role: sum(storages(getattr(opt, attr) if isinstance(getattr(opt, attr), list)
                                else [getattr(opt, attr)]).values())
             for role, attr in ROLE_ATTRIBUTES.items()}
    roles["gradient buffers of the fp32 master"] = sum(
        storages([p.grad for p in opt.fp32_partitioned_groups_flat]).values())
    params = sum(p.ds_numel for p in backend.model.parameters())
    return {"params": params, "roles": roles, "live_cpu_bytes": live_tensor_bytes("cpu"),
            "rss_before_load": before, "peak_rss": peak_rss_bytes()}


def build(path: str, hidden: int, layers: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path, max_shard_size="200MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rank", nargs=2, help=argparse.SUPPRESS)  # path offload: the measured process
    args = ap.parse_args()
    if args.rank:
        print(json.dumps(rank(args.rank[0], args.rank[1] == "1")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp, args.hidden, args.layers)
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        results = {}
        for offload in (0, 1):
            out = subprocess.run([sys.executable, __file__, "--rank", tmp, str(offload)], capture_output=True,
                                 text=True, env=env, timeout=1200)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            results[offload] = json.loads(out.stdout.strip().splitlines()[-1])
    p = results[0]["params"]
    print(f"ZeRO-3 rank at world 1, random Llama of {p:,} parameters (float32), one calibration backward")
    print(f"{'':34}{'no offload':>14}{'--offload-optimizer':>22}   (bytes per parameter)")
    roles = list(results[1]["roles"])
    for role in roles:
        a, b = (results[o]["roles"].get(role, 0) / p for o in (0, 1))
        print(f"  {role:32}{a:>14.2f}{b:>22.2f}")
    for key, label in (("live_cpu_bytes", "every CPU tensor held at the end"),):
        a, b = (results[o][key] / p for o in (0, 1))
        print(f"  {label:32}{a:>14.2f}{b:>22.2f}")
    a, b = ((results[o]["peak_rss"] - results[o]["rss_before_load"]) / p for o in (0, 1))
    print(f"  {'peak RSS above the loaded-libs base':32}{a:>14.2f}{b:>22.2f}")
    held = sum(results[1]["roles"].values()) / p
    print(f"DeepSpeed's own buffers under --offload-optimizer: {held:.2f} B/param "
          f"(without: {sum(results[0]['roles'].values()) / p:.2f})")


if __name__ == "__main__":
    main()
