"""Confidence intervals: per-window NLL and the paired bootstrap over evaluation windows (pure torch)."""

import math

import pytest
import torch
from conftest import build_tiny_model, calibration_chunks

from cwa_dist.analysis.evaluate import batch_nll_sum, bootstrap_intervals, perplexity, window_tokens


def test_per_window_nll_adds_up_and_equals_each_window_alone():
    net = build_tiny_model("llama")
    chunks = calibration_chunks(7, 16, ragged=True)
    ppl = perplexity(net, chunks, batch_size=3)
    assert len(ppl.window_nll) == 7
    assert math.isclose(sum(ppl.window_nll), ppl.nll_sum, rel_tol=1e-12)
    with torch.inference_mode():
        for c, got in zip(chunks, ppl.window_nll):  # each window on its own, unpadded
            alone = float(batch_nll_sum(net, c[None], torch.ones_like(c)[None]))
            assert math.isclose(got, alone, rel_tol=1e-5), (got, alone)


def _nll(n, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(20, 120, (n,), generator=gen)
    nll = tokens * (3.0 + torch.rand(n, generator=gen, dtype=torch.float64))
    return tokens.tolist(), nll.tolist()


def test_identical_models_have_a_ratio_interval_of_exactly_one():
    tokens, nll = _nll(40, 0)
    ci = bootstrap_intervals(tokens, nll, nll, samples=500, seed=0)
    assert ci["ppl_ratio_ci_low"] == ci["ppl_ratio_ci_high"] == 1.0


def test_a_uniformly_worse_model_has_a_ratio_interval_of_one_point():
    tokens, nll = _nll(40, 1)
    worse = [v + 0.3 * t for v, t in zip(nll, tokens)]  # +0.3 nats on every token
    ci = bootstrap_intervals(tokens, nll, worse, samples=500, seed=0)
    assert ci["ppl_ratio_ci_low"] == pytest.approx(math.exp(0.3), rel=1e-12)
    assert ci["ppl_ratio_ci_high"] == pytest.approx(math.exp(0.3), rel=1e-12)


def test_the_interval_holds_the_estimate_and_narrows_with_more_windows():
    tokens, nll = _nll(50, 2)
    point = math.exp(sum(nll) / sum(tokens))
    ci = bootstrap_intervals(tokens, nll, nll, samples=2000, seed=0)
    assert ci["ppl_ci_low"] < point < ci["ppl_ci_high"]
    ci4 = bootstrap_intervals(tokens * 4, nll * 4, nll * 4, samples=2000, seed=0)
    ratio = (ci4["ppl_ci_high"] - ci4["ppl_ci_low"]) / (ci["ppl_ci_high"] - ci["ppl_ci_low"])
    assert 0.35 < ratio < 0.65  # four times the windows: about half the width (1/sqrt(4))


def test_the_interval_is_seeded():
    tokens, nll = _nll(30, 3)
    pert = [v * 1.1 for v in nll]
    a = bootstrap_intervals(tokens, nll, pert, samples=300, seed=5)
    assert a == bootstrap_intervals(tokens, nll, pert, samples=300, seed=5)
    assert a != bootstrap_intervals(tokens, nll, pert, samples=300, seed=6)


def test_window_tokens_count_predicted_tokens():
    assert window_tokens([torch.arange(5), torch.arange(2)]) == [4, 1]
