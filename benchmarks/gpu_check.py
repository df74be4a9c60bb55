"""The sensitivity stage on one GPU with nccl, per backend and dtype: timings, peak GPU memory, top-10.

Run through scripts/gpu_check.sh on a GPU machine. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import time

import ray
import torch

from cwa_dist.data import load_texts, split_documents, tokenize_documents
from cwa_dist.distributed.backends import ZeroSettings
from cwa_dist.distributed.grad_workers import GradientGroup, merge_reports
from cwa_dist.evaluate import predicted_tokens
from cwa_dist.models import ModelRef, load_pretrained
from cwa_dist.sensitivity import select_parameters
from cwa_dist.smollm2 import ensure_smollm2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["zero3", "fsdp2"])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--k", type=int, default=1000)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no GPU visible"
    ray.init(address="local", num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    path = str(ensure_smollm2())
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        net, tok, ckpt_dir = load_pretrained(path, dtype=dtype)
        cal = split_documents(tokenize_documents(tok, load_texts(None, None), 128), 0.5, seed=0).calibration
        names = select_parameters(net, include_bias=False, include_norm=False)
        model = ModelRef(source=path, checkpoint_dir=str(ckpt_dir), dtype=dtype_name)
        for backend in args.backends:
            group = GradientGroup(model, num_workers=1, backend=backend, device="cuda", cpus_per_worker=1,
                                  gpus_per_worker=1, settings=ZeroSettings())
            try:
                start = time.perf_counter()
                (report,) = group.score_calibration(cal, scored=names, metrics=["grad_x_weight"], k=args.k,
                                                    batch_size=args.batch_size)
                total_s = time.perf_counter() - start
                backward_s = report.backward_s  # scoring inside the final backward included
            finally:
                group.shutdown()
            top = merge_reports([report], args.k).candidates["grad_x_weight"]
            print(f"\n== {backend} {dtype_name}: {len(cal)} chunks ({predicted_tokens(cal)} tokens), "
                  f"backward {backward_s:.2f}s, stage {total_s:.2f}s (scoring {report.scoring_s:.2f}s), "
                  f"peak GPU memory {report.peak_device_bytes / 2**30:.2f} GiB, loss {report.loss:.4f}")
            for i, (name, idx, score) in enumerate(zip(top.names()[:10], top.flat_index[:10].tolist(),
                                                       top.score[:10].tolist()), 1):
                print(f"  {i:2d} {name} [{idx}] {score:.4e}")
    ray.shutdown()


if __name__ == "__main__":
    main()
