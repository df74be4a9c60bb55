"""Sharded gradient stage: per-rank memory and wall time at world size 1 and 2, per backend.

Models: SmolLM2-135M (the real model, from its converted safetensors cache) and a randomly
initialised ~160M Llama saved as several safetensors files. Every rank loads its own partition
from the files. Prints, per (model, backend, world size): stage wall time (rendezvous and model
load excluded), each rank's *measured* peak RSS (the kernel's high-water mark of that rank's own
process) and the bytes of the tensors it holds after scoring (found by walking its objects), the
merge time, and the headline ratio: measured peak RSS per rank at world 2 / world 1 (target <= 0.6).

    python benchmarks/bench_sharded.py [--chunks 4] [--seq-len 128] [--backends zero3 fsdp2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray
import torch

from cwa_dist.analysis.data import load_texts, tokenize_chunks
from cwa_dist.analysis.sensitivity import select_parameters
from cwa_dist.distributed.backends import ZeroSettings
from cwa_dist.distributed.grad_workers import GradientGroup, merge_reports
from cwa_dist.modeling.loading import ModelRef, empty_model, load_config, load_tokenizer
from cwa_dist.modeling.sources import resolve_checkpoint, resolve_source
from cwa_dist.smollm2 import ensure_smollm2


def random_llama_160m():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=16,
                      num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg).eval()


def run(model, chunks, names, *, backend, world, k):
    group = GradientGroup(model, num_workers=world, backend=backend, device="cpu",
                          cpus_per_worker=max(1, 2 // world), gpus_per_worker=0, settings=ZeroSettings())
    try:
        start = time.perf_counter()
        reports = group.score_calibration(chunks, scored=names, metrics=["grad_x_weight"], k=k, batch_size=1)
        stage_s = time.perf_counter() - start
    finally:
        group.shutdown()
    start = time.perf_counter()
    merged = merge_reports(reports, k)
    merge_ms = (time.perf_counter() - start) * 1000
    return stage_s, merge_ms, reports, merged


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--backends", nargs="+", default=["zero3", "fsdp2"])
    ap.add_argument("--models", nargs="+", default=["smollm2", "llama160m"])
    args = ap.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    smol_dir = resolve_checkpoint(resolve_source(str(ensure_smollm2())), announce=print)
    tok = load_tokenizer(smol_dir, trust_remote_code=False)
    texts = load_texts(None, None)
    tmp = tempfile.mkdtemp(prefix="bench_sharded_")

    def llama160m() -> str:
        random_llama_160m().save_pretrained(tmp, max_shard_size="200MB")
        return tmp

    dirs = {"smollm2": lambda: str(smol_dir), "llama160m": llama160m}
    print(f"{'model':10} {'backend':7} {'world':>5} {'stage s':>8} {'peak RSS GiB/rank':>18} "
          f"{'tensors held GiB/rank':>22} {'merge ms':>9}")
    for model_name in args.models:
        path = dirs[model_name]()
        model = ModelRef(source=path, checkpoint_dir=path, dtype="float32")
        skeleton = empty_model(load_config(path, trust_remote_code=False), dtype=torch.float32,
                               trust_remote_code=False)
        vocab = skeleton.config.vocab_size
        chunks = [c % vocab for c in tokenize_chunks(tok, texts, args.seq_len)[: args.chunks]]
        names = select_parameters(skeleton, include_bias=False, include_norm=False)
        for backend in args.backends:
            peak, held, rankings = {}, {}, {}
            for world in (1, 2):
                stage_s, merge_ms, reports, merged = run(model, chunks, names, backend=backend, world=world, k=args.k)
                peak[world] = max(r.peak_rss_bytes for r in reports)
                held[world] = max(r.live_tensor_bytes for r in reports)
                rankings[world] = list(zip(merged.candidates["grad_x_weight"].names(),
                                           merged.candidates["grad_x_weight"].flat_index.tolist()))
                print(f"{model_name:10} {backend:7} {world:>5} {stage_s:>8.2f} {peak[world] / 2**30:>18.2f} "
                      f"{held[world] / 2**30:>22.2f} {merge_ms:>9.1f}", flush=True)
            same = sum(a == b for a, b in zip(rankings[1], rankings[2]))
            print(f"{model_name:10} {backend:7} measured peak RSS per rank, world 2 / world 1: "
                  f"{peak[2] / peak[1]:.3f} (target <= 0.6); tensors held: {held[2] / held[1]:.3f}; "
                  f"top-{args.k} entries equal in place: {same}/{args.k}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
