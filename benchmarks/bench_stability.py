"""What --stability-folds costs: the gradient stage on SmolLM2-135M and the bundled text, the
README's default K (10 and 100), without folds and with B folds.

Each run is the real command (`--no-perturbation`) in a fresh process with its own embedded Ray,
the sides alternating. Per side it prints the fastest of N runs: the gradient worker's forward and
backward seconds (scoring inside it), the whole sensitivity stage (the folds' read-back and
comparison included), the worker's peak RSS and the bytes of tensors it still held after scoring
(measured by the worker), then the ratios with folds / without.

    python benchmarks/bench_stability.py [--folds 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from cwa_dist.smollm2 import ensure_smollm2


def one_run(model: str, out: str, run_id: str, folds: int) -> dict:
    cmd = [sys.executable, "-m", "cwa_dist.run", "--model", model, "--topk", "10", "100", "--no-perturbation",
           "--output", out, "--experiment-id", run_id, *(["--stability-folds", str(folds)] if folds else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, run_id, "experiment_summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, run_id, "manifest.json")) as f:
        rank = json.load(f)["memory"]["gradient_ranks"][0]
    worker = summary["sensitivity"]["workers"][0]
    return {"backward_s": worker["backward_s"], "stage_s": summary["stage_timings_s"]["sensitivity"],
            "peak_rss_gib": rank["peak_rss_bytes"] / 2**30, "live_tensor_gib": rank["live_tensor_bytes"] / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    model = str(ensure_smollm2())
    sides = {0: [], args.folds: []}
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.runs):
            for folds, runs in sides.items():
                runs.append(one_run(model, out, f"s{folds}_{i}", folds))
    best = {f: {key: min(r[key] for r in runs) for key in runs[0]} for f, runs in sides.items()}
    print(f"SmolLM2-135M, bundled text, --topk 10 100, fastest of {args.runs} per side")
    print(f"{'':<22}{'backward s':>12}{'stage s':>10}{'peak RSS GiB':>14}{'held GiB':>10}")
    for folds, b in best.items():
        label = f"--stability-folds {folds}" if folds else "no folds"
        print(f"{label:<22}{b['backward_s']:>12.2f}{b['stage_s']:>10.2f}{b['peak_rss_gib']:>14.2f}"
              f"{b['live_tensor_gib']:>10.2f}")
    on, off = best[args.folds], best[0]
    print(f"{'ratio':<22}" + "".join(f"{on[k] / off[k]:>{w}.2f}" for k, w in
                                     (("backward_s", 12), ("stage_s", 10), ("peak_rss_gib", 14),
                                      ("live_tensor_gib", 10))))


if __name__ == "__main__":
    main()
