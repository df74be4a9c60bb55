"""Evaluating from the first perturbed block gives the full forward's perplexity, bit for bit, for
every family (Llama tied and untied, GPT-2, GPT-NeoX, OPT), and really skips the earlier blocks."""

import pytest
import torch
from conftest import FAMILIES, build_tiny_model, calibration_chunks

from cwa_dist.analysis.evaluate import perplexity
from cwa_dist.analysis.replay import BEFORE, BlockReplay, kept_blocks

BATCH = 3


def test_kept_blocks_fit_the_budget_and_keep_the_last():
    assert kept_blocks(10, 100, 10_000) == list(range(10))
    kept = kept_blocks(10, 100, 300)
    assert len(kept) == 3 and kept[-1] == 9
    assert kept_blocks(10, 100, 99) == [] and kept_blocks(0, 100, 10_000) == []


def _perturb(p: torch.Tensor):
    """Scale a spread of elements; returns the undo."""
    flat = p.data.view(-1)
    idx = torch.arange(0, flat.numel(), max(1, flat.numel() // 7))
    saved = flat[idx].clone()
    flat[idx] = saved * 1.5 + 0.01
    return lambda: flat.__setitem__(idx, saved)


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_perplexity_equals_the_full_forward_bit_for_bit(family):
    net = build_tiny_model(family)
    chunks = calibration_chunks(7, 14, ragged=True)
    full_baseline = perplexity(net, chunks, BATCH)
    replay = BlockReplay(net, budget_bytes=1 << 30)
    baseline = replay.capture(lambda: perplexity(net, chunks, BATCH), chunks, BATCH)
    assert baseline.window_nll == full_baseline.window_nll
    n = len(replay.blocks)
    assert n >= 2 and replay.kept == list(range(n))
    calls = []
    inner = next(m for m in replay.blocks[0].modules()
                 if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
    inner.register_forward_pre_hook(lambda m, a: calls.append(1))  # runs only if block 0 computes
    params = dict(net.named_parameters())
    embed = net.get_input_embeddings().weight
    names = {"embedding": next(k for k, v in params.items() if v is embed)}
    names.update({f"block {i}": next(k for k in params if replay.block_of.get(k) == i) for i in range(n)})
    after = [k for k in params if k not in replay.block_of and params[k] is not embed and replay.first_block([k]) == n]
    assert after, "the final norm (and an untied head) run after the blocks"
    names.update({f"after {k}": k for k in after})
    for what, name in names.items():
        undo = _perturb(params[name])
        try:
            full = perplexity(net, chunks, BATCH)
            first = replay.first_block([name])
            calls.clear()
            with replay.from_block(first) as replayed:
                got = perplexity(net, chunks, BATCH)
        finally:
            undo()
        assert got.window_nll == full.window_nll, what  # bit for bit, every window
        assert got.window_nll != baseline.window_nll, what  # the perturbation mattered
        if what == "embedding":
            assert first == BEFORE and replayed is None and calls
        elif what == "block 0":
            assert first == 0 and replayed is None and calls
        else:
            assert replayed == first - 1 and not calls, what  # block 0 never ran
    assert perplexity(net, chunks, BATCH).window_nll == baseline.window_nll  # weights restored, replay off


def test_a_small_budget_keeps_fewer_blocks_and_stays_exact():
    net = build_tiny_model("gpt2")
    chunks = calibration_chunks(5, 12, ragged=True)
    replay = BlockReplay(net, budget_bytes=1)  # nothing fits
    replay.capture(lambda: perplexity(net, chunks, BATCH), chunks, BATCH)
    assert replay.kept == [] and replay.kept_bytes == 0
    name = next(k for k, i in replay.block_of.items() if i == len(replay.blocks) - 1)
    params = dict(net.named_parameters())
    undo = _perturb(params[name])
    try:
        with replay.from_block(replay.first_block([name])) as replayed:
            got = perplexity(net, chunks, BATCH)
        full = perplexity(net, chunks, BATCH)
    finally:
        undo()
    assert replayed is None and got.window_nll == full.window_nll


@pytest.mark.slow
def test_replay_on_the_real_smollm2(smollm2_path):
    """Bit for bit on SmolLM2-135M (tied embeddings) for its super weight, a late block, the final
    norm and the embedding."""
    from cwa_dist.analysis.data import load_texts, tokenize_chunks
    from cwa_dist.modeling.checkpoint import Checkpoint
    from cwa_dist.modeling.loading import load_config, load_replica, load_tokenizer
    from cwa_dist.modeling.sources import resolve_checkpoint, resolve_source

    path = resolve_checkpoint(resolve_source(str(smollm2_path)), announce=print)
    net = load_replica(Checkpoint(path), load_config(path, trust_remote_code=False), dtype=torch.float32,
                       trust_remote_code=False)
    chunks = tokenize_chunks(load_tokenizer(path, trust_remote_code=False), load_texts(None, 6), 64)[:8]
    replay = BlockReplay(net, budget_bytes=1 << 30)
    baseline = replay.capture(lambda: perplexity(net, chunks, 4), chunks, 4)
    params = dict(net.named_parameters())
    cases = {"model.layers.11.mlp.down_proj.weight": (507, 1229), "model.layers.27.self_attn.q_proj.weight": (3, 5),
             "model.norm.weight": (7,), "model.embed_tokens.weight": (42, 9)}
    for name, where in cases.items():
        p = params[name]
        old = p.data[where].clone()
        p.data[where] = 0.0
        try:
            full = perplexity(net, chunks, 4)
            with replay.from_block(replay.first_block([name])) as replayed:
                got = perplexity(net, chunks, 4)
        finally:
            p.data[where] = old
        assert got.window_nll == full.window_nll != baseline.window_nll, name
        assert (replayed is None) == (name == "model.embed_tokens.weight"), name
    assert perplexity(net, chunks, 4).window_nll == baseline.window_nll
