"""The stability folds' math (analysis/stability.py) against hand-built cases and scipy."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from cwa_dist.analysis import stability
from cwa_dist.errors import UsageError


def test_text_folds_are_disjoint_cover_every_text_balanced_and_seeded():
    for n, b in [(7, 2), (10, 3), (5, 5)]:
        folds = stability.text_folds(n, b, seed=3)
        assert len(folds) == b and sorted(i for f in folds for i in f) == list(range(n))
        assert max(map(len, folds)) - min(map(len, folds)) <= 1
        assert folds == stability.text_folds(n, b, seed=3)
    assert stability.text_folds(10, 2, seed=0) != stability.text_folds(10, 2, seed=1)


def test_text_folds_refuse_what_cannot_be_compared():
    with pytest.raises(UsageError, match="at least 2 folds"):
        stability.text_folds(5, 1, seed=0)
    with pytest.raises(UsageError, match="needs at least 4 calibration texts, but the calibration set has 3"):
        stability.text_folds(3, 4, seed=0)


def test_window_folds_keep_each_text_whole():
    sizes = [2, 1, 3, 1]  # windows of each text: text 0 → windows 0,1; text 1 → 2; text 2 → 3,4,5; text 3 → 6
    texts = stability.text_folds(len(sizes), 2, seed=5)
    windows = stability.window_folds(sizes, texts)
    owner = [0, 0, 1, 2, 2, 2, 3]
    for t_ids, w_ids in zip(texts, windows):
        assert sorted({owner[w] for w in w_ids}) == t_ids
        assert len(w_ids) == sum(sizes[t] for t in t_ids)


def _case():
    rng = np.random.default_rng(0)
    weights = [("p", i) for i in range(12)]
    scores = {r: {w: float(v) for w, v in zip(weights, rng.random(12))} for r in ("all", "fold_1", "fold_2")}
    tops = {r: sorted(weights, key=lambda w: -s[w]) for r, s in scores.items()}
    return weights, scores, tops


def test_compare_counts_overlap_and_takes_rho_over_the_union():
    _, scores, tops = _case()
    table = stability.compare(tops, scores, ks=[3, 6], seed=1)
    assert [(r.k, r.a, r.b) for r in table.itertuples()] == [
        (k, a, b) for k in (3, 6) for a, b in [("fold_1", "all"), ("fold_2", "all"), ("fold_1", "fold_2")]]
    for r in table.itertuples():
        a, b = set(tops[r.a][: r.k]), set(tops[r.b][: r.k])
        assert r.shared == len(a & b) and r.overlap == len(a & b) / r.k and r.union == len(a | b)
        union = sorted(a | b)
        want = spearmanr([scores[r.a][w] for w in union], [scores[r.b][w] for w in union]).statistic
        assert r.spearman_rho == pytest.approx(want, abs=1e-12)
        assert r.rho_low <= r.spearman_rho <= r.rho_high


def test_identical_rankings_agree_fully():
    weights, scores, _ = _case()
    same = {r: scores["all"] for r in ("all", "fold_1", "fold_2")}
    top = sorted(weights, key=lambda w: -scores["all"][w])
    table = stability.compare({r: top for r in same}, same, ks=[4], seed=0)
    assert (table["overlap"] == 1).all() and np.allclose(table["spearman_rho"], 1.0)
    assert np.allclose(table["rho_low"], 1.0)


def test_inclusion_frequency_is_the_share_of_folds_holding_each_weight():
    folds = [[("a", 1), ("a", 2)], [("a", 2), ("b", 0)], [("a", 2), ("a", 1)], [("c", 9)]]
    got = stability.inclusion_frequency([("a", 1), ("a", 2), ("b", 0), ("z", 0)], folds)
    np.testing.assert_array_equal(got, [2 / 4, 3 / 4, 1 / 4, 0.0])


def test_summary_means_over_pairs_of_folds_and_flags_instability():
    rows = [
        # K = 10: folds share 40% and 50% (mean 45%): unstable.
        ("m", 10, "fold_1", "all", 0.7, 0.5, 0.1, 0.8), ("m", 10, "fold_2", "all", 0.8, 0.6, 0.2, 0.9),
        ("m", 10, "fold_3", "all", 0.9, 0.7, 0.3, 0.9),
        ("m", 10, "fold_1", "fold_2", 0.4, 0.2, -0.1, 0.5), ("m", 10, "fold_1", "fold_3", 0.5, 0.3, 0.0, 0.6),
        ("m", 10, "fold_2", "fold_3", 0.45, 0.4, 0.1, 0.7),
    ]
    table = pd.DataFrame(rows, columns=["metric", "k", "a", "b", "overlap", "spearman_rho", "rho_low", "rho_high"])
    s = stability.summarize(table)["m"]["10"]
    assert s["folds"] == 3 and s["unstable"]
    assert s["fold_overlap_mean"] == pytest.approx(0.45)
    assert (s["fold_overlap_min"], s["fold_overlap_max"]) == (0.4, 0.5)
    assert s["fold_rho_mean"] == pytest.approx(0.3) and (s["fold_rho_low"], s["fold_rho_high"]) == (-0.1, 0.7)
    assert s["all_overlap_mean"] == pytest.approx(0.8)
    table.loc[table["b"] != "all", "overlap"] = 0.8  # sharing 80% on average is stable
    assert not stability.summarize(table)["m"]["10"]["unstable"]
