"""The ranking equals a brute-force reference over the whole model, and the gradient does not
depend on batching or chunk order."""

import numpy as np
import pytest
import torch
from conftest import FAMILIES, brute_force_topk, build_tiny_model, calibration_chunks

from cwa_dist.analysis.evaluate import perplexity, predicted_tokens
from cwa_dist.analysis.sensitivity import (
    accumulate_gradients,
    back_to_inference,
    checkpoint_blocks,
    full_shards,
    prepare_gradients,
    score_shards,
    select_parameters,
)


def reference_ranking(net, chunks, names, metric, k):
    """Plain PyTorch: HF's own mean loss over one batch of all chunks, every score of the model
    concatenated, and a full lexicographic sort."""
    net.zero_grad()
    for p in net.parameters():
        p.requires_grad_(True)
    ids = torch.stack(chunks)
    net(input_ids=ids, labels=ids).loss.backward()
    params = dict(net.named_parameters())
    scores = {}
    for n in names:
        g, w = params[n].grad.reshape(-1).double(), params[n].detach().reshape(-1).double()
        scores[n] = ((g * w).abs() if metric == "grad_x_weight" else g * g).float()
    return brute_force_topk(scores, k)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("metric", ["grad_x_weight", "grad_squared"])
def test_topk_equals_brute_force(family, metric):
    net = build_tiny_model(family)
    chunks = calibration_chunks(4, 16)
    names = select_parameters(net, include_bias=False, include_norm=False)
    k = 200
    ref_names, ref_flat, ref_score = reference_ranking(net, chunks, names, metric, k + 1)

    prepare_gradients(net, names)
    accumulate_gradients(net, chunks, batch_size=3, total_tokens=predicted_tokens(chunks))
    got = score_shards(full_shards(net, names), [metric], k).candidates[metric]

    # Scores agree to float rounding (different but equivalent loss reductions); where two
    # scores are that close, their order is not determined by the model, so compare the sets
    # of entries with near-ties grouped, and require the exact order elsewhere.
    np.testing.assert_allclose(got.score.numpy(), ref_score[:k], rtol=1e-4, atol=1e-12)
    got_entries = list(zip(got.names(), got.flat_index.tolist()))
    ref_entries = list(zip(ref_names, ref_flat.tolist()))
    # gaps[i]: entries i and i+1 are clearly ordered (over k+1 reference entries).
    gaps = np.abs(np.diff(ref_score)) > 1e-4 * np.abs(ref_score[1:])
    boundaries = [0] + [i + 1 for i in np.nonzero(gaps)[0] if i + 1 < k] + [k]
    groups = list(zip(boundaries, boundaries[1:]))
    for lo, hi in groups:
        if hi == k and not gaps[k - 1]:
            continue  # a near-tie group cut by K may keep different members on each side
        assert set(got_entries[lo:hi]) == set(ref_entries[lo:hi])
    assert sum(hi - lo == 1 for lo, hi in groups) > k // 2  # mostly a strict order


def test_tied_embeddings_are_scored_once_with_both_uses_in_the_gradient():
    net = build_tiny_model("llama_tied")
    names = select_parameters(net, include_bias=False, include_norm=False)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_parameter_selection_kinds():
    net = build_tiny_model("gpt2")
    plain = select_parameters(net, include_bias=False, include_norm=False)
    with_bias = select_parameters(net, include_bias=True, include_norm=False)
    everything = select_parameters(net, include_bias=True, include_norm=True)
    assert all(dict(net.named_parameters())[n].ndim == 2 for n in plain)
    assert "transformer.wte.weight" in plain and "transformer.wpe.weight" in plain
    assert set(with_bias) - set(plain) == {n for n in with_bias if n.endswith("bias")}
    assert "transformer.ln_f.weight" in everything and "transformer.ln_f.weight" not in with_bias


def _gradients(net, chunks, batch_size):
    names = [n for n, _ in net.named_parameters()]
    prepare_gradients(net, names)
    total = predicted_tokens(chunks)
    # Split the chunks over two calls, as a worker receiving batches from the driver would.
    half = len(chunks) // 2
    accumulate_gradients(net, chunks[:half], batch_size=batch_size, total_tokens=total)
    accumulate_gradients(net, chunks[half:], batch_size=batch_size, total_tokens=total)
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def test_gradient_independent_of_batch_size_and_chunk_order():
    net = build_tiny_model("llama")
    chunks = calibration_chunks(6, 12, ragged=True)  # unequal lengths exercise padding
    reference = _gradients(net, chunks, batch_size=6)
    for batch_size, order in [(1, chunks), (4, chunks[::-1]), (2, chunks[2:] + chunks[:2])]:
        got = _gradients(net, order, batch_size=batch_size)
        for n in reference:
            # Summing in another order changes float32 results by a few ulps of the largest terms
            # (CPUs differ in how their vector kernels order sums), so the absolute tolerance is
            # relative to the tensor's scale rather than a fixed 1e-7.
            scale = float(reference[n].abs().max())
            torch.testing.assert_close(got[n], reference[n], rtol=1e-5, atol=1e-5 * scale)


def test_gradient_is_that_of_the_token_weighted_mean_nll():
    net = build_tiny_model("gpt_neox")
    chunks = calibration_chunks(3, 10, ragged=True)
    got = _gradients(net, chunks, batch_size=2)
    # Reference: the NLL of every predicted token, summed one chunk at a time, over the count.
    net.zero_grad()
    total = sum(
        torch.nn.functional.cross_entropy(net(input_ids=c[None]).logits[0, :-1], c[1:], reduction="sum")
        for c in chunks
    ) / sum(len(c) - 1 for c in chunks)
    total.backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_block_checkpointing_gives_the_same_gradient(family):
    chunks = calibration_chunks(3, 12, ragged=True)
    reference = _gradients(build_tiny_model(family), chunks, batch_size=2)
    net = build_tiny_model(family)
    assert checkpoint_blocks(net) == 2
    calls = []
    first_block_mlp = [m for n, m in net.named_modules() if n.endswith("0.mlp")][0]
    # A pre-hook: recomputation stops early once the last saved tensor is rebuilt, before
    # post-hooks of the block's last module would run.
    first_block_mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    got = _gradients(net, chunks, batch_size=2)
    assert len(calls) == 2 * 2  # 2 batches, each run forward once and again in backward
    for n in reference:
        torch.testing.assert_close(got[n], reference[n], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_back_to_inference_leaves_a_model_that_evaluates_as_a_fresh_one(family):
    """A gradient stage's model (gradients, checkpointed blocks, some parameters frozen), handed on to
    evaluate: every perplexity bit for bit a fresh replica's, no gradient, each block its own forward."""
    chunks, evaluation = calibration_chunks(3, 12, ragged=True), calibration_chunks(2, 12, seed=5)
    fresh = build_tiny_model(family)
    net = build_tiny_model(family)
    checkpoint_blocks(net)
    names = select_parameters(net, include_bias=False, include_norm=False)
    prepare_gradients(net, names)
    accumulate_gradients(net, chunks, batch_size=2, total_tokens=predicted_tokens(chunks))
    assert any(p.grad is not None for p in net.parameters()) and not all(p.requires_grad for p in net.parameters())
    assert back_to_inference(net) is net
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert not net.training
    calls = []
    block = [m for n, m in net.named_modules() if n.endswith("0.mlp")][0]
    block.register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.enable_grad():  # checkpointing would run a block twice in a backward; now nothing recomputes
        ids = torch.stack(evaluation)
        net(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 1
    net.zero_grad(set_to_none=True)
    assert perplexity(net, evaluation, 2).window_nll == perplexity(fresh, evaluation, 2).window_nll
