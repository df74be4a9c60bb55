"""Statistics of the single-weight ablation study, against independent computations (pure)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cwa_dist.analysis.ablation import ranks, spearman, spearman_interval, top_share


def test_ranks_average_ties():
    assert ranks(torch.tensor([10.0, 30.0, 20.0, 30.0])).tolist() == [1.0, 3.5, 2.0, 3.5]


@pytest.mark.parametrize("seed", range(5))
def test_spearman_equals_an_independent_computation(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    y[:5] = y[5]  # some ties
    # Spearman's ρ as defined: Pearson's r of average ranks (pandas ranks, numpy correlates).
    reference = np.corrcoef(pd.Series(x).rank(method="average"), pd.Series(y).rank(method="average"))[0, 1]
    assert spearman(x, y) == pytest.approx(reference, abs=1e-12)


def test_monotone_relation_has_rho_one_and_a_point_interval():
    x = np.arange(30.0)
    y = np.exp(x / 5)  # monotone, far from linear
    assert spearman(x, y) == pytest.approx(1.0)
    assert spearman_interval(x, y, samples=200, seed=0) == pytest.approx((1.0, 1.0))
    assert spearman(x, -y) == pytest.approx(-1.0)


def test_interval_holds_the_estimate_and_is_seeded():
    rng = np.random.default_rng(7)
    x = rng.normal(size=60)
    y = 0.5 * x + rng.normal(size=60)
    low, high = spearman_interval(x, y, samples=500, seed=1)
    assert low < spearman(x, y) < high
    assert (low, high) == spearman_interval(x, y, samples=500, seed=1)
    assert (low, high) != spearman_interval(x, y, samples=500, seed=2)


def test_top_share():
    score = [5, 4, 3, 2, 1, 0, 0, 0, 0, 0]
    impact = [10, 0, 0, 0, 0, 0, 0, 0, 0, -10]  # |impact| counts
    assert top_share(score, impact, fraction=0.1) == pytest.approx(0.5)
    assert math.isnan(top_share(score, [0] * 10))


def test_ablation_keys_match_their_specs():
    from cwa_dist.analysis.experiments import ablation_key, ablation_spec

    name = "model.layers.0.mlp.up_proj.weight"
    assert ablation_spec(name, 17).key == ablation_key(name, 17)


def test_values_at_reads_the_owned_elements_of_split_shards():
    from cwa_dist.analysis.sensitivity import ParamShard, values_at

    g = torch.arange(10.0) / 10
    w = torch.arange(10.0) + 100
    # One parameter split across two owners at offset 6, as ZeRO-3/FSDP2 partitions look.
    first = [ParamShard("p", 0, w[:6], g[:6])]
    second = [ParamShard("p", 6, w[6:], g[6:]), ParamShard("q", 0, w, None)]
    wanted = {"p": torch.tensor([1, 7, 9]), "q": torch.tensor([0])}
    a, b = values_at(first, wanted), values_at(second, wanted)
    assert a["p"][0].tolist() == [1] and b["p"][0].tolist() == [7, 9]
    assert b["p"][1].tolist() == pytest.approx([0.7, 0.9]) and b["p"][2].tolist() == [107.0, 109.0]
    assert "q" not in b  # no gradient, nothing to report
