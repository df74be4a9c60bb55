"""Shared fixtures: tiny randomly initialised models of several families, saved with
save_pretrained; a local Ray with fixed resources; the real SmolLM2 model. The tests mirror the
package (tests/analysis/ for cwa_dist/analysis/, ...); whole runs and entry points sit at the top."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
VOCAB = 96


def _tiny_config(family: str):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    if family == "llama":  # untied, odd sizes so nothing divides evenly
        return LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=False)
    if family == "llama_tied":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=36, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                           tie_word_embeddings=True)
    if family == "llama_odd":  # sizes that no world size of 2 or 3 divides
        return LlamaConfig(vocab_size=97, hidden_size=20, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                           tie_word_embeddings=False)
    if family == "gpt2":  # tied by default, Conv1D weights, biases
        return GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if family == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=64, word_embed_proj_dim=16)
    raise ValueError(family)


FAMILIES = ["llama", "llama_tied", "gpt2", "gpt_neox", "opt"]
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]


def moe_config(family: str, hidden: int = 16, intermediate: int = 12, experts: int = 4):
    """A tiny mixture-of-experts model of each kind transformers fuses: Mixtral (experts only),
    Qwen2-MoE (plus a gated shared expert), Qwen3-MoE, DeepSeek-V3 (a dense first block, then
    routed and shared experts, grouped routing)."""
    from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    if family == "mixtral":
        return MixtralConfig(intermediate_size=intermediate, num_local_experts=experts, num_experts_per_tok=2, **common)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(intermediate_size=2 * intermediate, moe_intermediate_size=intermediate,
                              shared_expert_intermediate_size=intermediate + 4, num_experts=experts,
                              num_experts_per_tok=2, decoder_sparse_step=1, **common)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(intermediate_size=2 * intermediate, moe_intermediate_size=intermediate,
                              num_experts=experts, num_experts_per_tok=2, head_dim=8, **common)
    if family == "deepseek_v3":  # multi-head latent attention: as many key/value heads as heads
        common["num_key_value_heads"] = common["num_attention_heads"]
        return DeepseekV3Config(intermediate_size=2 * intermediate, moe_intermediate_size=intermediate,
                                n_routed_experts=experts, num_experts_per_tok=2, n_shared_experts=1,
                                first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=8, q_lora_rank=None,
                                qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, **common)
    raise ValueError(family)


def build_tiny_moe(family: str, seed: int = 0, **sizes):
    """A randomly initialised MoE model, weights spread as build_tiny_model's."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(moe_config(family, **sizes))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return net.eval()


def moe_input_norms(net, chunks):
    """Σ x_j² per input feature of every scored weight, by hand in float64, one chunk at a time
    (so no padding): Linear and router inputs as they are; for each expert, the hidden states of
    the tokens routed to it and silu(gate) · up of them, from the routing the router chose.
    parameter → per-element ‖x_j‖₂, shaped like the parameter."""
    import torch.nn.functional as F
    from transformers.pytorch_utils import Conv1D

    from cwa_dist.analysis.experts import experts_modules

    seen, routing = {}, {}

    def linear(module, args, _):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        seen[module] = seen.get(module, 0) + x.square().sum(0)

    def experts(module, args):
        routing.setdefault(module, []).append((args[0].detach().double(), args[1].detach()))

    hooks = [m.register_forward_hook(linear) for m in net.modules()
             if isinstance(m, (torch.nn.Linear, Conv1D)) or type(m).__name__.lower().endswith("router")]
    hooks += [m.register_forward_pre_hook(experts) for _, m in experts_modules(net)]
    with torch.no_grad():
        for c in chunks:
            net(input_ids=c[None])
    for h in hooks:
        h.remove()
    out = {}
    for m, total in seen.items():
        out[id(m.weight)] = total.sqrt()[None, :].expand_as(m.weight)
    for m, calls in routing.items():
        n_exp, two_i, hidden = m.gate_up_proj.shape
        up_sq = torch.zeros(n_exp, hidden, dtype=torch.float64)
        down_sq = torch.zeros(n_exp, two_i // 2, dtype=torch.float64)
        for x, index in calls:
            for e in range(n_exp):
                xe = x[(index == e).any(-1)]
                gate, up = (xe @ m.gate_up_proj[e].detach().double().T).chunk(2, dim=-1)
                up_sq[e] += xe.square().sum(0)
                down_sq[e] += (F.silu(gate) * up).square().sum(0)
        out[id(m.gate_up_proj)] = up_sq.sqrt()[:, None, :].expand_as(m.gate_up_proj)
        out[id(m.down_proj)] = down_sq.sqrt()[:, None, :].expand_as(m.down_proj)
    embed = net.get_input_embeddings().weight
    counts = torch.bincount(torch.cat(chunks), minlength=embed.shape[0]).double()
    out[id(embed)] = counts.sqrt()[:, None].expand_as(embed)
    return out


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """save_pretrained directories of each tiny MoE family, in many small files, with a
    tokenizer: family → path. transformers saves the experts one tensor each."""
    root = tmp_path_factory.mktemp("tiny_moe")
    out = {}
    for family in MOE_FAMILIES:
        path = root / family
        build_tiny_moe(family).save_pretrained(path, max_shard_size="20KB")
        _tiny_tokenizer(path)
        out[family] = path
    return out

SMALL = ["--seq-len", "32", "--eval-limit", "12", "--batch-size", "4"]
"""CLI flags of a small, quick run (short windows, few texts)."""


def wide_llama_config(tied: bool = False):
    """A model DeepSpeed really partitions: its embeddings (3.3M elements) and MLP matrices
    (160k) are far above ZeRO-3's default persistence threshold of 1e5 elements, and no size
    divides evenly by 3 (so the last partition is padded)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32003, hidden_size=104, intermediate_size=1537, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=tied)


def build_wide_llama(seed: int = 0, dtype=torch.float32, tied: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(wide_llama_config(tied))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.to(dtype).eval()


def token_chunks(n: int, length: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """n chunks of random token ids, lengths length, length-1, length-2, ... (unequal, so padding
    and unequal shares across ranks are exercised)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length - i % 3,), generator=g) for i in range(n)]


def force_accelerator_without_fp16() -> None:
    """Make DeepSpeed's CPU accelerator answer "no fp16, bf16 yes" on every machine.

    Whether the real one says fp16 depends on the CPU (mkldnn fp16 support). Under these answers
    DeepSpeed 0.19.8's zero.Init(dtype=float32) silently builds bfloat16 parameters, so a test
    run with them fails on every machine if that path comes back, not only on some CPUs.
    """
    import deepspeed.accelerator.cpu_accelerator as cpu

    cpu.CPU_Accelerator.is_fp16_supported = lambda self: False
    cpu.CPU_Accelerator.is_bf16_supported = lambda self: True


def build_tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    net = AutoModelForCausalLM.from_config(_tiny_config(family))
    # Random init gives near-uniform scores; spread the weights so rankings are well separated.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return net.eval()


def _tiny_tokenizer(save_dir):
    """A real word-level tokenizers.Tokenizer over a fixed vocabulary, wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(save_dir)
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """save_pretrained directories of each tiny family, with a tokenizer: family → path."""
    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for family in FAMILIES:
        path = root / family
        build_tiny_model(family).save_pretrained(path)
        _tiny_tokenizer(path)
        out[family] = path
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, with fixed logical resources: 4 CPUs, so a group of
    3 gradient workers (which must all run at once) fits on a 2-core machine."""
    import ray

    if not ray.is_initialized():
        # Workers cannot import this file: ship the setup hook by value.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": force_accelerator_without_fp16})
    yield ray
    ray.shutdown()


def write_llama_config(path: Path, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> Path:
    """A Llama-2 config, as its Hub repository holds it; no weights."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads, "vocab_size": 32000, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16",
    }))
    return path


@pytest.fixture(scope="session")
def sums_task(tmp_path_factory) -> Path:
    """tests/tasks/ as an --eval-tasks-include directory: the cwa_sums task (24 multiple-choice
    sums), its data file named by absolute path."""
    out = tmp_path_factory.mktemp("tasks")
    data = out / "cwa_sums.jsonl"
    data.write_text((REPO / "tests" / "tasks" / "cwa_sums.jsonl").read_text())
    task = (REPO / "tests" / "tasks" / "cwa_sums.yaml").read_text().replace("DATA_FILE", str(data))
    (out / "cwa_sums.yaml").write_text(task)
    return out


@pytest.fixture(scope="session")
def smollm2_path():
    from cwa_dist.smollm2 import ensure_smollm2

    return ensure_smollm2()


def calibration_chunks(n: int, length: int, seed: int = 0, ragged: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = [length - (i % 3 if ragged else 0) for i in range(n)]
    return [torch.randint(0, VOCAB, (L,), generator=g) for L in lengths]


def saved_model(net, path=None, max_shard_size="2MB"):
    """Save `net` with save_pretrained (safetensors, split into several files by a small
    max_shard_size) and return the ModelRef that workers and actors load it by."""
    import tempfile

    from cwa_dist.modeling.loading import ModelRef

    path = path or tempfile.mkdtemp(prefix="cwa_model_")
    net.save_pretrained(path, max_shard_size=max_shard_size)
    dtype = str(next(net.parameters()).dtype).removeprefix("torch.")
    return ModelRef(source=str(path), checkpoint_dir=str(path), dtype=dtype)


def run_gradient_group(ray, net, chunks, names, *, world_size, backend, metrics, k, batch_size=2, settings=None):
    """The gradient stage as the CLI runs it: a real Ray worker group over gloo, loading the
    model from its checkpoint files. Returns the merged candidates and each rank's report."""
    from cwa_dist.distributed.backends import ZeroSettings
    from cwa_dist.distributed.grad_workers import GradientGroup

    model = net if not isinstance(net, torch.nn.Module) else saved_model(net)
    group = GradientGroup(model, num_workers=world_size, backend=backend, device="cpu", cpus_per_worker=1,
                          gpus_per_worker=0, settings=settings or ZeroSettings())
    try:
        result = group.sensitivity(evaluation=chunks[:1], calibration=chunks, scored=names, metrics=metrics, k=k,
                                   batch_size=batch_size, checkpointing=False)
    finally:
        group.shutdown()
    return result.merged, result.reports


# Fixtures that start Ray, or run something that does: a test using one (directly or through
# another fixture) is marked `ray`, as are tests marked so by hand (Ray started in a subprocess).
RAY_FIXTURES = {"ray_local", "full_run", "cluster", "gpu_head"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.ray)


def brute_force_topk(scores: dict[str, torch.Tensor], k: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The one reference ranking the tests compare with: (names, flat indices, scores) of the k
    highest scores over every tensor, ordered by score (highest first), then parameter name, then
    flat index, the tie order the package documents. A full sort of each tensor's candidates in
    float64; elements below their own tensor's k-th score cannot be in the top k (ties at it are
    all kept)."""
    names, flats, values = [], [], []
    for name, s in scores.items():
        s = s.detach().reshape(-1).double()
        idx = torch.nonzero(s >= torch.topk(s, k).values[-1]).reshape(-1) if len(s) > k else torch.arange(len(s))
        names += [name] * len(idx)
        flats.append(idx.numpy())
        values.append(s[idx].numpy())
    flat, score = np.concatenate(flats), np.concatenate(values)
    order = np.lexsort((flat, np.unique(names, return_inverse=True)[1], -score))[:k]
    return [names[i] for i in order], flat[order], score[order]


def random_specs(net, n: int, k: int = 20):
    """n random-control experiments of k weights each over the model's weight matrices."""
    from cwa_dist.analysis.perturb import PerturbationSpec, random_targets
    from cwa_dist.analysis.sensitivity import select_parameters

    names = select_parameters(net, include_bias=False, include_norm=False)
    numels = [dict(net.named_parameters())[x].numel() for x in names]
    return [PerturbationSpec(key=f"random|seed={i}", method="random", is_control=True, topk=k, mask_ratio=1.0,
                             seed=i, mode="zero", targets=random_targets(names, numels, k, seed=i)) for i in range(n)]
