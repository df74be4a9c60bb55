"""Shared fixtures: tiny randomly initialised models of several families, saved with
save_pretrained; a local Ray with fixed resources; the real SmolLM2 model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

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
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2_path():
    from cwa_dist.smollm2 import ensure_smollm2

    return ensure_smollm2()


def calibration_chunks(n: int, length: int, seed: int = 0, ragged: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = [length - (i % 3 if ragged else 0) for i in range(n)]
    return [torch.randint(0, VOCAB, (L,), generator=g) for L in lengths]
