"""What --eval-tasks costs per experiment: one zero-shot evaluation of SmolLM2-135M on the local
multiple-choice task in tests/tasks/ (24 sums, 4 choices each), through the same code the
evaluation actors run (`evaluate_tasks` on an in-memory model), on one CPU thread as an actor has.

Prints, measured with a clock, the fastest of three evaluations (after one warm-up, which also
indexes the harness's tasks) and the time per 100 examples.

    python benchmarks/bench_zero_shot.py [--threads 1] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cwa_dist.analysis.zero_shot import evaluate_tasks, task_manager
from cwa_dist.modeling.loading import load_tokenizer
from cwa_dist.modeling.sources import resolve_checkpoint, resolve_source
from cwa_dist.smollm2 import ensure_smollm2

TASKS = Path(__file__).resolve().parent.parent / "tests" / "tasks"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="torch threads (an evaluation actor on CPU uses 1)")
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = resolve_checkpoint(resolve_source(str(ensure_smollm2())), announce=print)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(path, trust_remote_code=False)
    with tempfile.TemporaryDirectory() as include:
        data = Path(include) / "cwa_sums.jsonl"
        data.write_text((TASKS / "cwa_sums.jsonl").read_text())
        (Path(include) / "cwa_sums.yaml").write_text((TASKS / "cwa_sums.yaml").read_text().replace("DATA_FILE",
                                                                                                  str(data)))
        manager = task_manager(include)

        def once() -> tuple[float, int]:
            start = time.perf_counter()
            scores = evaluate_tasks(model, tokenizer, ["cwa_sums"], limit=None, include=include,
                                    batch_size=args.batch_size, manager=manager)["cwa_sums"]
            return time.perf_counter() - start, scores.examples

        once()  # warm-up: the task's data is read and cached
        times = []
        for _ in range(3):
            seconds, examples = once()
            times.append(seconds)
    best = min(times)
    print(f"cwa_sums on SmolLM2-135M, {examples} examples, {args.threads} thread(s): fastest of three "
          f"{best:.2f} s ({', '.join(f'{t:.2f}' for t in times)}); {100 * best / examples:.1f} s per 100 examples")


if __name__ == "__main__":
    main()
