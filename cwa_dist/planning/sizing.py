"""What a run will need before it starts: the device it resolves to, and per-process memory
estimates checked against the devices it will get. Pure arithmetic on the model's config; no Ray,
no weights.

The per-byte figures come from measurements (README, "Memory of every process"; docs/scaling.md):
a ZeRO-3 rank peaks while `deepspeed.initialize` runs, holding its parameter partition, DeepSpeed's
flat copy of it, the float32 master clone and the float32 gradient partition at once; afterwards
the master clone is freed. Under --offload-optimizer DeepSpeed keeps 12 bytes per parameter of the
rank's share on the host (master, flat gradient partition, the master's gradient buffer;
benchmarks/bench_offload_host.py), 8 once the master is freed. Pinned blocks are kept at their size
(grad_workers.exact_pinned_blocks), not rounded up to a power of two. An evaluation actor holds its
replica plus about half a GiB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

GiB = 2**30
PROCESS_HOST_BYTES = 1 * GiB  # measured: a gradient rank's memory that does not depend on the model
ACTOR_EXTRA_BYTES = GiB // 2  # measured: an evaluation actor's peak beyond its replica
CUDA_CONTEXT_BYTES = GiB // 2  # CUDA context and kernels per process and GPU (typical, not measured here)


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """Sizes read from the config (through an empty model on the meta device)."""

    num_parameters: int
    largest_block: int  # parameters of the largest transformer block (ZeRO-3 gathers about one at a time)
    hidden: int
    intermediate: int
    layers: int
    vocab: int


def model_facts(net, config) -> ModelFacts:
    """ModelFacts of a (meta-device) model and its config."""
    from cwa_dist.reporting.outputs import describe_param

    blocks: dict[int, int] = {}
    total = 0
    for name, p in net.named_parameters():
        total += p.numel()
        layer, _ = describe_param(name)
        if layer is not None:
            blocks[layer] = blocks.get(layer, 0) + p.numel()
    text = getattr(config, "text_config", None) or config
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    return ModelFacts(
        num_parameters=total,
        largest_block=max(blocks.values(), default=total),
        hidden=hidden,
        intermediate=_first(text, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden) or 4 * hidden,
        layers=_first(text, "num_hidden_layers", "n_layer", "num_layers", default=max(len(blocks), 1)),
        vocab=_first(text, "vocab_size"),
    )


def _first(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v:
            return int(v)
    if default is None:
        raise ValueError(f"the model config has none of {', '.join(names)}")
    return default


@dataclass(frozen=True, slots=True)
class Layout:
    """How a run is laid out: everything the estimate depends on beyond the model."""

    device: str  # cpu | cuda
    dtype_bytes: int
    backend: str  # zero3 | fsdp2 | none
    num_workers: int
    gpus_per_worker: int
    cpus_per_worker: int
    num_eval_actors: int
    gpus_per_eval_actor: int
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    offload_params: bool
    offload_optimizer: bool
    max_live_parameters: int
    prefetch_bucket_size: int
    reduce_bucket_size: int
    per_window: bool = False  # fisher/obd: float32 gradient sums and Fisher squares beside the gradients
    replay_budget_bytes: int = 0  # each actor's kept block outputs, at most


@dataclass(frozen=True, slots=True)
class Need:
    """One kind of process: how many, what each asks of Ray, and its estimated peak memory."""

    role: str
    count: int
    resources: dict
    device_bytes: int  # per GPU it uses (0 on CPU)
    host_bytes: int
    parts: dict  # name → bytes, what the peak is made of


def activation_bytes(m: ModelFacts, lay: Layout, *, backward: bool) -> int:
    """Activations of one micro-batch. Each block keeps about 8·hidden + 4·intermediate values per
    token for backward (attention inputs and outputs, residuals, the MLP's gate/up/act/down inputs)
    plus float32 norm statistics; checkpointing keeps one hidden state per block and one block's
    full set. The logits exist in the model dtype and float32, plus their gradient."""
    tokens = lay.batch_size * lay.seq_len
    per_block = tokens * ((8 * m.hidden + 4 * m.intermediate) * lay.dtype_bytes + 8 * m.hidden)
    if not backward:
        blocks = per_block  # inference keeps one block's worth alive
    elif lay.gradient_checkpointing:
        blocks = m.layers * tokens * m.hidden * lay.dtype_bytes + per_block
    else:
        blocks = m.layers * per_block
    logits = tokens * m.vocab * (lay.dtype_bytes + 4 + (4 if backward else 0))
    return blocks + logits


def rank_need(m: ModelFacts, lay: Layout) -> Need:
    """A gradient rank's peak: the larger of initialisation and one micro-batch's backward."""
    P, b, N = m.num_parameters, lay.dtype_bytes, lay.num_workers
    share = math.ceil(P / N)
    acts = activation_bytes(m, lay, backward=True)
    host, dev = {}, {}
    if lay.backend == "zero3":
        on_host = host if lay.offload_params else dev
        on_host["parameter partition"] = share * b
        (host if lay.offload_params else dev)["flat copy at initialisation"] = share * b
        states = host if lay.offload_optimizer else dev
        states["fp32 master at initialisation"] = share * 4
        states["fp32 gradient partition"] = share * 4
        if lay.offload_optimizer:  # measured (bench_offload_host.py): the master's own gradient buffer
            host["fp32 gradient buffer of the master"] = share * 4
        dev["gathered parameters"] = min(lay.max_live_parameters, 2 * m.largest_block) * b \
            + lay.prefetch_bucket_size * b + 2 * lay.reduce_bucket_size * 4
    elif lay.backend == "fsdp2":
        dev["fp32 parameter shard"] = share * 4
        dev["fp32 gradient shard"] = share * 4
        dev["gathered unit"] = 2 * m.largest_block * b
    else:
        dev["parameters"] = P * b
        dev["gradients"] = P * b + (P * 4 if b < 4 else 0)  # bf16 adds a float32 accumulator
    if lay.per_window:
        dev["fp32 gradient sums and Fisher squares"] = 2 * 4 * (P if lay.backend == "none" else share)
    dev["activations (one micro-batch)"] = acts
    # Initialisation's extra copies and backward's activations do not coexist: the peak is the larger.
    init_only = dev.get("flat copy at initialisation", 0) + dev.get("fp32 master at initialisation", 0)
    device_total = sum(dev.values()) - min(init_only, acts)
    return _need("gradient rank", lay.num_workers,
                 {"CPU": lay.cpus_per_worker, **({"GPU": lay.gpus_per_worker} if lay.gpus_per_worker else {})},
                 device_total, sum(host.values()), {**dev, **{f"{k} (host)": v for k, v in host.items()}},
                 lay, gpus=lay.gpus_per_worker)


def actor_need(m: ModelFacts, lay: Layout) -> Need:
    """An evaluation actor: a whole replica, split over its GPUs by blocks, and one forward's activations."""
    g = lay.gpus_per_eval_actor if lay.device == "cuda" else 0
    replica = m.num_parameters * lay.dtype_bytes
    parts = {"replica": math.ceil(replica / max(g, 1)),
             "activations (forward)": activation_bytes(m, lay, backward=False),
             "kept block outputs (at most)": math.ceil(lay.replay_budget_bytes / max(g, 1)),
             "actor overhead (measured)": ACTOR_EXTRA_BYTES}
    resources = {"CPU": 1, **({"GPU": g} if g else {})}
    return _need("evaluation actor", lay.num_eval_actors, resources, sum(parts.values()), 0, parts, lay, gpus=g)


def _need(role, count, resources, device_total, host_total, parts, lay: Layout, *, gpus: int) -> Need:
    if lay.device == "cuda" and gpus:
        return Need(role, count, resources, device_total + CUDA_CONTEXT_BYTES, host_total + PROCESS_HOST_BYTES,
                    {**parts, "CUDA context": CUDA_CONTEXT_BYTES})
    # On CPU everything is host memory.
    return Need(role, count, resources, 0, device_total + host_total + PROCESS_HOST_BYTES, parts)


def device_for(requested: str, *, gpus_now: int, gpus_possible: int, gpus_asked: bool) -> tuple[str, str]:
    """(cpu | cuda, why). `auto` is cuda when the cluster has GPUs now, when its autoscaler can
    add GPU nodes, or when the run asks for GPUs; otherwise cpu."""
    if requested != "auto":
        return requested, f"--device {requested}"
    if gpus_now:
        return "cuda", f"the cluster has {gpus_now} GPU(s)"
    if gpus_possible:
        return "cuda", f"the autoscaler can add up to {gpus_possible} GPU(s)"
    if gpus_asked:
        return "cuda", "--gpus-per-worker / --gpus-per-eval-actor ask for GPUs"
    return "cpu", "the cluster has no GPUs and cannot add any"


@dataclass(frozen=True, slots=True)
class Fit:
    ok: bool
    problems: list[str]
    fix: str | None  # the flags that would make it fit, when one of the remedies does


REMEDIES = (
    ("--offload-optimizer", {"offload_optimizer": True}),
    ("--offload-optimizer --offload-params", {"offload_optimizer": True, "offload_params": True}),
    ("--offload-optimizer --offload-params --gradient-checkpointing",
     {"offload_optimizer": True, "offload_params": True, "gradient_checkpointing": True}),
)


def check_fit(m: ModelFacts, lay: Layout, *, gpu_bytes: int | None, host_bytes: int | None,
              gpus_total: int = 0, node_memory_bytes: int | None = None, node_gpus: int | None = None) -> Fit:
    """Whether every process fits its device (`gpu_bytes` per GPU), the CPU plan fits `host_bytes`
    (the cluster's memory for tasks), and on GPUs the processes one node holds at once fit its host
    memory (`node_memory_bytes`, a node of `node_gpus` GPUs); if not, the first remedy that would
    make it fit."""
    node = (node_memory_bytes, node_gpus)
    problems = _problems(m, lay, gpu_bytes, host_bytes, node=node)
    if not problems:
        return Fit(True, [], None)
    fixes = []
    rank_fails = any(p.startswith("gradient rank") for p in problems)
    actor_fails = any(p.startswith("evaluation actor") for p in problems)
    if rank_fails and lay.backend == "zero3":
        options = []
        for flags, change in REMEDIES:
            if not _problems(m, replace(lay, **change), gpu_bytes, host_bytes, roles=("gradient rank",), node=node):
                options.append(flags)
                break
        if lay.device == "cuda" and gpu_bytes:
            for n in range(lay.num_workers + 1, max(gpus_total, lay.num_workers) + 1):
                if not _problems(m, replace(lay, num_workers=n), gpu_bytes, host_bytes, roles=("gradient rank",),
                                 node=node):
                    options.append(f"--num-workers {n}")
                    break
        if options:
            fixes.append(options[0] if len(options) == 1 else f"{options[0]} (or {options[1]})")
    if actor_fails and lay.device == "cuda" and gpu_bytes:
        for g in range(lay.gpus_per_eval_actor + 1, max(gpus_total, lay.gpus_per_eval_actor) + 1):
            if not _problems(m, replace(lay, gpus_per_eval_actor=g), gpu_bytes, host_bytes, roles=("evaluation actor",),
                             node=node):
                fixes.append(f"--gpus-per-eval-actor {g}")
                break
    return Fit(False, problems, " ".join(fixes) or None)


def per_node(need: Need, lay: Layout, node_gpus: int | None) -> int:
    """How many processes of `need` one GPU node holds at once."""
    gpus = need.resources.get("GPU", 0)
    return min(need.count, node_gpus // gpus) if gpus and node_gpus else need.count


def _problems(m, lay, gpu_bytes, host_bytes, roles=("gradient rank", "evaluation actor"),
              node=(None, None)) -> list[str]:
    out = []
    node_memory, node_gpus = node
    for need in (rank_need(m, lay), actor_need(m, lay)):
        if need.role not in roles:
            continue
        if lay.device == "cuda" and gpu_bytes and need.device_bytes > gpu_bytes:
            out.append(f"{need.role}: {need.device_bytes / GiB:.1f} GiB per GPU, over the {gpu_bytes / GiB:.1f} GiB "
                       "each GPU has")
        together = per_node(need, lay, node_gpus)
        if lay.device == "cuda" and node_memory and need.count and together * need.host_bytes > node_memory:
            out.append(f"{need.role}: {together} per node × {need.host_bytes / GiB:.1f} GiB of host memory, over "
                       f"the {node_memory / GiB:.0f} GiB each GPU node offers")
        if lay.device == "cpu" and host_bytes and need.host_bytes * need.count > host_bytes:
            out.append(f"{need.role}: {need.count} × {need.host_bytes / GiB:.1f} GiB, over the cluster's "
                       f"{host_bytes / GiB:.1f} GiB of memory for tasks")
    return out


def plan_table(needs: list[Need]) -> list[str]:
    """The plan as aligned text lines: one row per kind of process, then what its peak is made of."""
    rows = [("process", "count", "resources each", "peak per GPU", "host memory each")]
    for n in needs:
        res = ", ".join(f"{k} {v:g}" for k, v in n.resources.items())
        rows.append((n.role, str(n.count), res, f"{n.device_bytes / GiB:.1f} GiB" if n.device_bytes else "-",
                     f"{n.host_bytes / GiB:.1f} GiB"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for n in needs:
        lines.append(f"  {n.role}: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in n.parts.items() if v))
    return lines
