"""The inputs of the Fisher and Wanda metrics, computed in one process against plain PyTorch:
per-window gradients through the post-accumulate hooks, and input-feature norms by forward hooks
(padding skipped, a checkpointed block counted once, GPT-2's Conv1D and tied LM heads)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_model, calibration_chunks

from cwa_dist.analysis.data import per_window_steps
from cwa_dist.analysis.evaluate import batches, predicted_tokens
from cwa_dist.analysis.feature_norms import FeatureNorms
from cwa_dist.analysis.metrics import get_metric
from cwa_dist.analysis.sensitivity import (
    GradientHooks,
    GradientSums,
    checkpoint_blocks,
    full_shards,
    gradient_step,
    prepare_gradients,
    select_parameters,
)


def per_window_fisher(net, chunks, names):
    """Through the code the replica backend runs: one window per backward, hooks square each."""
    prepare_gradients(net, names)
    sums = GradientSums(per_window=True)
    hooks = GradientHooks(net, names, sums)
    total = predicted_tokens(chunks)
    for (step, scale), _window in zip(per_window_steps(chunks, 1, total), chunks):
        hooks.scale = scale
        sums.start_window()
        ((ids, mask),) = batches(step[0], 1)
        gradient_step(net, ids, mask, total_tokens=total)
    hooks.remove()
    return {s.name: s for s in full_shards(net, names, sums)}


def test_fisher_is_the_mean_per_window_square_and_grad_squared_the_square_of_the_mean():
    net = build_tiny_model("llama")
    chunks = calibration_chunks(3, 12, ragged=True)
    names = select_parameters(net, include_bias=False, include_norm=False)
    shards = per_window_fisher(net, chunks, names)
    params = dict(net.named_parameters())
    for name in names[:4]:
        own = []
        for c in chunks:  # each window's own gradient of its mean NLL, by hand
            net.zero_grad()
            F.cross_entropy(net(input_ids=c[None]).logits[0, :-1], c[1:]).backward()
            own.append(params[name].grad.reshape(-1).clone())
        want_fisher = torch.stack(own).square().mean(0)
        weights = torch.tensor([len(c) - 1 for c in chunks], dtype=torch.float32)
        want_grad = (torch.stack(own) * weights[:, None]).sum(0) / weights.sum()
        s = shards[name]
        # Float32 rounding apart (the loss reductions differ), elementwise; an element whose gradient
        # cancels to near zero is compared at the scale of the parameter's largest.
        torch.testing.assert_close(s.fisher, want_fisher, rtol=1e-4, atol=1e-5 * float(want_fisher.max()))
        torch.testing.assert_close(s.grad, want_grad, rtol=1e-4, atol=1e-5 * float(want_grad.abs().max()))
        fisher = get_metric("fisher").score(s.grad, s.weight, fisher=s.fisher)
        squared = get_metric("grad_squared").score(s.grad, s.weight)
        assert not torch.allclose(fisher, squared, rtol=1e-2)  # windows differ: so do the two


def test_fisher_equals_grad_squared_with_one_window():
    net = build_tiny_model("gpt2")
    chunks = calibration_chunks(1, 16)
    names = select_parameters(net, include_bias=True, include_norm=True)
    for s in per_window_fisher(net, chunks, names).values():
        torch.testing.assert_close(get_metric("fisher").score(s.grad, s.weight, fisher=s.fisher),
                                   get_metric("grad_squared").score(s.grad, s.weight), rtol=1e-5, atol=0)


def _linear_inputs(net, chunks):
    """Σ x_j² per input feature of every Linear/Conv1D, by hand, over every real token."""
    from transformers.pytorch_utils import Conv1D

    got = {}

    def record(module, args, _):
        got[module] = got.get(module, 0) + args[0].reshape(-1, args[0].shape[-1]).double().square().sum(0)

    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    with torch.no_grad():
        for c in chunks:
            net(input_ids=c[None])
    for h in hooks:
        h.remove()
    return got


@pytest.mark.parametrize("family", ["llama", "llama_tied", "gpt2"])
def test_feature_norms_match_a_hand_count(family):
    from transformers.pytorch_utils import Conv1D

    net = build_tiny_model(family)
    chunks = calibration_chunks(3, 10, ragged=True)
    names = select_parameters(net, include_bias=True, include_norm=True)
    hand = _linear_inputs(net, chunks)
    checkpoint_blocks(net)  # a recomputed block must not be counted twice
    prepare_gradients(net, names)
    norms = FeatureNorms(net, names)
    # Padded batches: the padding must not count.
    for ids, mask in batches(chunks, 3):
        gradient_step(net, ids, mask, total_tokens=100)
    norms.remove()
    tokens = sum(len(c) for c in chunks)
    assert norms.tokens == tokens
    params = dict(net.named_parameters())
    by_weight = {}
    for m in net.modules():
        if isinstance(m, torch.nn.Linear):
            by_weight[id(m.weight)] = hand[m].sqrt()[None, :].expand_as(m.weight)
        elif isinstance(m, Conv1D):
            by_weight[id(m.weight)] = hand[m].sqrt()[:, None].expand_as(m.weight)
    embed = net.get_input_embeddings().weight
    if id(embed) not in by_weight:  # untied: the one-hot token counts
        counts = torch.bincount(torch.cat(chunks), minlength=embed.shape[0]).double()
        by_weight[id(embed)] = counts.sqrt()[:, None].expand_as(embed)
    if family == "llama_tied":
        assert id(embed) in by_weight and net.get_output_embeddings().weight is embed
    for name in names:
        p = params[name]
        want = by_weight.get(id(p), torch.full(p.shape, tokens ** 0.5, dtype=torch.float64)).reshape(-1)
        # Whole parameter, and a shard that starts mid-row, as ZeRO-3 partitions do.
        torch.testing.assert_close(norms.expand(name, 0, p.numel()).double(), want, rtol=1e-5, atol=1e-6)
        start = p.numel() // 3 + 1
        torch.testing.assert_close(norms.expand(name, start, p.numel() // 2).double(),
                                   want[start : start + p.numel() // 2], rtol=1e-5, atol=1e-6)
        # Chosen elements alone (what the ablation study reads back): the same values, bit for bit.
        picked = torch.tensor([0, start, p.numel() - 1])
        assert torch.equal(norms.at(name, picked), norms.expand(name, 0, p.numel())[picked])


def test_paused_passes_and_vector_round_trip():
    net = build_tiny_model("llama")
    names = select_parameters(net, include_bias=False, include_norm=False)
    norms = FeatureNorms(net, names)
    with norms.paused(), torch.no_grad():
        net(input_ids=torch.zeros(1, 2, dtype=torch.long))
    assert norms.tokens == 0 and all(float(v.sum()) == 0 for v in norms.squares.values())
    with torch.no_grad():
        net(input_ids=calibration_chunks(1, 8)[0][None])
    vector = norms.as_vector()
    other = FeatureNorms(net, names)
    other.load_vector(vector * 2)  # what a sum over two ranks that saw the same tokens gives
    assert other.tokens == 2 * norms.tokens
    for name in norms.squares:
        torch.testing.assert_close(other.squares[name], 2 * norms.squares[name])
