"""Perturbation throughput on SmolLM2-135M with the bundled default text, on the real actor pool.

For each pool size (1 and 2 actors) and each setting of block replay (off: every experiment a
full forward; on: recompute from the first changed block), runs the same experiments and prints,
all measured with a clock:
  - experiments per second (first submission to last result, actors already loaded);
  - per experiment: the evaluation time the actor measured, and Ray's overhead (round trip at one
    actor minus that evaluation time: dispatch, argument and result transfer, scheduling);
  - each perplexity equal between replay off and on (bit for bit), and the speedup.

Workloads: `ablation` (single weights at random positions over the scored matrices: the shape of
--ablation-study and super-weight experiments) and `topk` (the default run's experiments: top-K
by |g·w| at four ratios, plus three random controls and |W|, taken from a finished run's
rankings.parquet if given, else from a quick |W| ranking).

    python benchmarks/bench_perturbation.py [--experiments 24] [--workload ablation]
"""

from __future__ import annotations

import argparse
import time

import ray
import torch

from cwa_dist.analysis.data import load_texts, split_documents, tokenize_documents
from cwa_dist.analysis.experiments import single_weight_spec
from cwa_dist.analysis.perturb import PerturbationSpec, Targets
from cwa_dist.analysis.sensitivity import numel, select_parameters
from cwa_dist.config import RunConfig
from cwa_dist.distributed.eval_actors import EvalPool
from cwa_dist.modeling.loading import ModelRef, empty_model, load_config, load_tokenizer
from cwa_dist.modeling.sources import resolve_checkpoint, resolve_source
from cwa_dist.smollm2 import ensure_smollm2


def single_weight_specs(names: list[str], shapes: dict, n: int, seed: int) -> list[PerturbationSpec]:
    gen = torch.Generator().manual_seed(seed)
    specs = []
    for i in range(n):
        name = names[int(torch.randint(len(names), (1,), generator=gen))]
        flat = int(torch.randint(numel(shapes[name]), (1,), generator=gen))
        specs.append(single_weight_spec("bench", name, flat, f"{i}:{flat}"))
    return specs


def magnitude_topk_specs(net: torch.nn.Module, names: list[str], k: int, ratios=(0.1, 0.25, 0.5, 1.0)) -> list:
    """Top-K by |W| at each ratio: experiments that touch weights wherever the largest ones are."""
    params = dict(net.named_parameters())
    values, where = [], []
    for i, n in enumerate(names):
        top = torch.topk(params[n].detach().abs().reshape(-1), k)
        values.append(top.values)
        where += [(i, int(j)) for j in top.indices]
    best = torch.topk(torch.cat(values), k).indices.tolist()
    chosen = [where[j] for j in best]
    specs = []
    for r in ratios:
        m = max(1, round(r * k))
        t = Targets(names, torch.tensor([c[0] for c in chosen[:m]]), torch.tensor([c[1] for c in chosen[:m]]))
        specs.append(PerturbationSpec(key=f"mag|{r}", method="magnitude", is_control=True, topk=k, mask_ratio=r,
                                      seed=None, mode="zero", targets=t))
    return specs


def measure(model: ModelRef, chunks, specs, *, actors: int, budget: int, batch_size: int) -> dict:
    pool = EvalPool(model, chunks, num_actors=actors, device="cpu", gpus_per_actor=0, batch_size=batch_size,
                    replay_budget_bytes=budget)
    try:
        pool.describe()  # every actor loaded and its baseline measured before the clock starts
        results = {}
        start = time.perf_counter()
        pool.run(specs, on_result=lambda r: results.__setitem__(r.key, r),
                 on_failure=lambda s, e: (_ for _ in ()).throw(RuntimeError(f"{s.key}: {e}")), max_retries=0)
        elapsed = time.perf_counter() - start
        memory = pool.memory()
    finally:
        pool.shutdown()
    evals = [r.wall_s for r in results.values()]
    return {"elapsed": elapsed, "per_s": len(specs) / elapsed, "eval_s": sum(evals) / len(evals),
            "nll": {k: r.perturbed.window_nll for k, r in results.items()},
            "kept": memory[0].get("replay_blocks_kept"), "kept_mib": memory[0].get("replay_bytes", 0) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=24)
    parser.add_argument("--workload", choices=["ablation", "topk"], default="ablation")
    parser.add_argument("--budget-gb", type=float, default=RunConfig.of(model="x").replay_memory_gb)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    gguf = ensure_smollm2()
    path = resolve_checkpoint(resolve_source(str(gguf)), announce=print)
    tok = load_tokenizer(path, trust_remote_code=False)
    docs = tokenize_documents(tok, load_texts(None, 100), args.seq_len)
    chunks = split_documents(docs, 0.5, seed=0).evaluation
    skeleton = empty_model(load_config(path, trust_remote_code=False), dtype=torch.float32, trust_remote_code=False)
    names = select_parameters(skeleton, include_bias=False, include_norm=False)
    shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    if args.workload == "ablation":
        specs = single_weight_specs(names, shapes, args.experiments, seed=0)
    else:
        from cwa_dist.modeling.checkpoint import Checkpoint
        from cwa_dist.modeling.loading import load_replica

        ckpt = Checkpoint(path)
        net = load_replica(ckpt, load_config(path, trust_remote_code=False), dtype=torch.float32,
                           trust_remote_code=False)
        specs = magnitude_topk_specs(net, names, 100)
        del net
    model = ModelRef(source=str(gguf), checkpoint_dir=str(path), dtype="float32")
    print(f"SmolLM2-135M, {len(chunks)} evaluation windows, {len(specs)} {args.workload} experiments, "
          f"batch {args.batch_size}; 2 CPU cores, one thread per actor")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = {}
        for actors in (1, 2):
            for budget in (0, int(args.budget_gb * 2**30)):
                m = measure(model, chunks, specs, actors=actors, budget=budget, batch_size=args.batch_size)
                rows[actors, budget > 0] = m
                overhead = m["elapsed"] / len(specs) - m["eval_s"] if actors == 1 else float("nan")
                print(f"{actors} actor(s), replay {'on ' if budget else 'off'}: {m['per_s']:.2f} experiments/s "
                      f"({m['elapsed']:.1f} s); evaluation {m['eval_s']:.3f} s per experiment on the actor"
                      + (f"; Ray overhead {overhead * 1000:.1f} ms per experiment "
                         f"({overhead / m['eval_s']:.2%} of one evaluation)" if actors == 1 else "")
                      + (f"; {m['kept']} block outputs kept ({m['kept_mib']:.0f} MiB)" if budget else ""))
    finally:
        ray.shutdown()
    for actors in (1, 2):
        off, on = rows[actors, False], rows[actors, True]
        same = all(off["nll"][k] == on["nll"][k] for k in off["nll"])
        print(f"{actors} actor(s): replay on / off = {on['per_s'] / off['per_s']:.2f}x experiments per second; "
              f"every perplexity bit for bit the same: {same}")
    print(f"2 actors / 1 actor (replay on): {rows[2, True]['per_s'] / rows[1, True]['per_s']:.2f}x; "
          f"replay on at 2 actors / replay off at 1 actor: {rows[2, True]['per_s'] / rows[1, False]['per_s']:.2f}x")


if __name__ == "__main__":
    main()
