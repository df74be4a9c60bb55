import math

import pytest
import torch

from cwa_dist.analysis.metrics import MAGNITUDE, METRICS, get_metric
from cwa_dist.analysis.statistics import Moments, ScoreStatistics
from cwa_dist.errors import UsageError


def test_metric_values():
    g = torch.tensor([[-2.0, 0.5], [3.0, 0.0]])
    w = torch.tensor([[1.5, -4.0], [-1.0, 7.0]])
    assert torch.equal(get_metric("grad_x_weight").score(g, w), torch.tensor([[3.0, 2.0], [3.0, 0.0]]))
    assert torch.equal(get_metric("grad_squared").score(g, w), torch.tensor([[4.0, 0.25], [9.0, 0.0]]))
    assert torch.equal(MAGNITUDE.score(None, w), w.abs())


def test_fisher_obd_magnitude_wanda_values():
    w = torch.tensor([[1.5, -4.0], [-1.0, 7.0]])
    fisher = torch.tensor([[2.0, 0.5], [0.0, 1.0]])
    norms = torch.tensor([[3.0, 0.5], [3.0, 0.5]])  # ‖x_j‖ of each element's input feature (a column)
    assert torch.equal(get_metric("fisher").score(None, w, fisher=fisher), fisher)
    assert torch.equal(get_metric("obd").score(None, w, fisher=fisher), torch.tensor([[2.25, 4.0], [0.0, 24.5]]))
    assert torch.equal(get_metric("magnitude").score(None, w), w.abs())
    assert torch.equal(get_metric("wanda").score(None, w, feature_norm=norms), torch.tensor([[4.5, 2.0], [3.0, 3.5]]))
    with pytest.raises(ValueError, match="needs fisher"):
        get_metric("obd").score(w, w)


def test_magnitude_is_ranked_once_whether_asked_for_or_not():
    from cwa_dist.analysis.metrics import needed_inputs, ranked_metrics

    assert ranked_metrics(["grad_x_weight"]) == ["grad_x_weight", "magnitude"]
    assert ranked_metrics(["magnitude", "wanda"]) == ["magnitude", "wanda"]
    assert needed_inputs(["obd", "wanda", "magnitude"]) == {"fisher", "feature_norm"}


def test_half_precision_is_scored_in_float32():
    g = torch.tensor([1e-3], dtype=torch.bfloat16)
    assert get_metric("grad_squared").score(g, g).dtype == torch.float32


def test_unknown_metric_suggests_the_closest_name():
    with pytest.raises(UsageError, match=r"Did you mean 'grad_x_weight'\?.*"
                                         r"Available: fisher, grad_squared, grad_x_weight, magnitude, obd, wanda"):
        METRICS.get("grad_x_weigth")


def test_moments_match_torch_and_merge_like_one_pass():
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) ** 4
    x[:1000] = 0
    whole, a, b = Moments(), Moments(), Moments()
    whole.add_batch(x)
    a.add_batch(x[:31_337])
    b.add_batch(x[31_337:])
    a.merge(b)
    for m in (whole, a):
        out = m.finalize(with_histogram=True)
        assert out["count"] == x.numel() and out["zero_fraction"] == pytest.approx(0.01)
        assert out["mean"] == pytest.approx(float(x.double().mean()), rel=1e-5)
        assert out["std"] == pytest.approx(float(x.double().std(unbiased=False)), rel=1e-4)
        assert out["max"] == float(x.max())
        assert sum(out["histogram"]["counts"]) + out["histogram"]["zeros"] == x.numel()
        for q in (0.5, 0.9, 0.99):
            exact = float(torch.quantile(x, q))
            assert exact / 2 <= m.quantile(q) <= exact * 2  # one power-of-two bin
    assert a.histogram == whole.histogram


def test_score_statistics_per_parameter_and_overall():
    s = ScoreStatistics()
    s.add_batch("a", torch.tensor([1.0, 2.0]))
    s.add_batch("b", torch.tensor([4.0]))
    s.add_batch("a", torch.tensor([3.0]))  # a second shard of "a"
    out = s.finalize()
    assert out["per_parameter"]["a"]["count"] == 3 and out["per_parameter"]["a"]["mean"] == pytest.approx(2.0)
    assert out["overall"]["count"] == 4 and out["overall"]["max"] == 4.0
    assert math.isclose(out["overall"]["mean"], 2.5)
