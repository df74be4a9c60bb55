"""Headline findings: each claim is computed from the table's numbers and checked against them."""

import math

import pandas as pd
import pytest

from cwa_dist.reporting.findings import SMALL_CALIBRATION_TOKENS, damage_per_weight, findings


def _row(metric, k, ratio, n, ppl, low, high, control=False, seed=None):
    return {"metric": metric, "topk": k, "mask_ratio": ratio, "weights_masked": n, "baseline_ppl": 10.0,
            "perturbed_ppl": ppl, "ppl_ratio": ppl / 10.0, "ppl_ci_low": low, "ppl_ci_high": high,
            "is_control": control, "seed": seed, "status": "ok"}


RESULTS = pd.DataFrame([
    _row("grad_x_weight", 10, 0.5, 5, 30.0, 25.0, 35.0),  # a smaller ratio: not the full set, ignored
    _row("grad_x_weight", 10, 1.0, 10, 40.0, 35.0, 45.0),
    _row("wanda", 10, 1.0, 10, 12.0, 11.5, 13.0),
    _row("random", 10, 1.0, 10, 10.5, 10.0, 11.0, True, 0),
    _row("random", 10, 1.0, 10, 10.2, 9.9, 10.6, True, 1),
    _row("magnitude", 10, 1.0, 10, 60.0, 50.0, 70.0, True),
    _row("random_same_tensor[grad_x_weight]", 10, 1.0, 10, 38.0, 33.0, 43.0, True, 0),
    _row("grad_x_weight", 100, 1.0, 100, 90.0, 80.0, 100.0),
    _row("random", 100, 1.0, 100, 11.0, 10.0, 12.0, True, 0),
])


def test_most_damage_per_weight_and_the_verdicts_follow_the_numbers():
    out = findings(RESULTS, calibration_tokens=50_000)
    k10, k100 = out["per_k"]
    assert (k10["topk"], k10["weights"], k100["weights"]) == (10, 10, 100)
    # |W| raised perplexity most at K = 10: ln(60/10) / 10 nats per weight.
    assert k10["most_damaging"] == "magnitude"
    assert k10["damage_per_weight_nats"]["magnitude"] == pytest.approx(math.log(6.0) / 10)
    assert k10["damage_per_weight_nats"]["random"] == pytest.approx((math.log(1.05) + math.log(1.02)) / 2 / 10)
    assert k10["verdicts"]["grad_x_weight"] == {"magnitude": "lost", "random": "beat",
                                               "random_same_tensor[grad_x_weight]": "overlap"}
    assert k10["verdicts"]["wanda"]["random"] == "beat"  # 11.5–13 lies above both draws' 9.9–11.0
    # Another metric's same-tensor draw is not a control of this one.
    assert set(k10["verdicts"]["wanda"]) == {"random", "magnitude"}
    touching = findings(RESULTS.assign(ppl_ci_low=RESULTS["ppl_ci_low"].where(RESULTS["metric"] != "wanda", 11.0)),
                        calibration_tokens=None)
    assert touching["per_k"][0]["verdicts"]["wanda"]["random"] == "overlap"  # intervals that touch overlap
    assert k100["most_damaging"] == "grad_x_weight" and k100["verdicts"]["grad_x_weight"] == {"random": "beat"}
    text = " ".join(out["sentences"])
    assert f"{math.log(6.0) / 10:.3g} nats" in text and "magnitude did the most damage" in text
    assert "cannot be told apart from random_same_tensor[grad_x_weight] (95% CI 33–43)" in text
    assert "beat random (95% CI 9.9–11, 2 draws)" in text
    assert not out["small_calibration"] and "calibration set is small" not in text


def test_a_small_calibration_set_is_named_even_without_perturbations():
    out = findings(None, calibration_tokens=1304)
    assert out["small_calibration"] and out["per_k"] == []
    assert out["sentences"] == [s for s in out["sentences"] if "1,304 predicted tokens" in s] and out["sentences"]
    assert not findings(None, calibration_tokens=SMALL_CALIBRATION_TOKENS)["small_calibration"]


def test_failed_and_destroyed_experiments_claim_nothing():
    broken = pd.concat([RESULTS, pd.DataFrame([{**_row("wanda", 100, 1.0, 100, float("nan"), float("nan"),
                                                        float("nan")), "ppl_ratio": float("nan")}])])
    out = findings(broken, calibration_tokens=None)
    assert "wanda" not in out["per_k"][1]["verdicts"]
    assert math.isnan(damage_per_weight({"ppl_ratio": 0.0, "weights_masked": 3}))


def test_stability_folds_replace_the_advice_with_their_measured_answer():
    fold = {"folds": 2, "fold_overlap_mean": 0.54, "fold_overlap_min": 0.54, "fold_overlap_max": 0.54,
            "fold_rho_mean": 0.07, "fold_rho_low": -0.12, "fold_rho_high": 0.24, "all_overlap_mean": 0.765,
            "unstable": True}
    steady = dict(fold, folds=3, fold_overlap_mean=0.9, fold_overlap_min=0.85, fold_overlap_max=0.95, unstable=False)
    out = findings(None, calibration_tokens=1304, stability={"grad_x_weight": {"100": fold}, "fisher": {"10": steady}})
    assert out["small_calibration"]
    assert not any("--stability-folds" in s for s in out["sentences"])  # it ran: no advice to run it
    assert out["sentences"] == [
        "The top 100 by grad_x_weight is unstable over 2 disjoint folds of the calibration texts: the folds share "
        "54% of it, with Spearman ρ 0.07 (95% CI -0.12–0.24) over the weights either puts in its top 100; each fold "
        "shares 76% with the whole set's.",
        "The top 10 by fisher is stable over 3 disjoint folds of the calibration texts: the folds share 90% of it "
        "(pairs 85%–95%), with Spearman ρ 0.07 (95% CI -0.12–0.24) over the weights either puts in its top 10; each "
        "fold shares 76% with the whole set's.",
    ]
    assert "--stability-folds" in " ".join(findings(None, calibration_tokens=1304)["sentences"])


def test_the_ablation_study_names_the_best_predictor_only_as_far_as_its_interval_goes():
    study = {"weights": 40, "measured": 40, "metrics": {
        "grad_x_weight": {"spearman": 0.61, "spearman_ci": [0.45, 0.74], "top_tenth_share": 0.52},
        "wanda": {"spearman": 0.12, "spearman_ci": [-0.10, 0.33], "top_tenth_share": 0.18},
    }}
    out = findings(None, calibration_tokens=None, ablation=study)
    assert out["ablation"] == {"best_predictor": "grad_x_weight", "separated": True}  # 0.45 > 0.33
    (text,) = out["sentences"]
    assert text.startswith("Zeroing each of 40 studied weights alone")
    assert ("grad_x_weight ρ 0.61 (95% CI 0.45–0.74; its top tenth carries 52% of the total |ΔNLL|); "
            "wanda ρ 0.12") in text
    assert "grad_x_weight ranks it best, its interval clear of the others'" in text
    study["metrics"]["wanda"]["spearman_ci"] = [-0.10, 0.50]  # now reaching into the best one's interval
    out = findings(None, calibration_tokens=None, ablation=study)
    assert out["ablation"]["separated"] is False and "the intervals overlap" in out["sentences"][0]
    study["metrics"] = {m: dict(v, spearman=float("nan")) for m, v in study["metrics"].items()}  # too few weights
    assert findings(None, calibration_tokens=None, ablation=study)["ablation"]["best_predictor"] is None


def _kept(kept, n, ratio, low, high, seed=None):
    return {"kept": kept, "seed": seed, "weights_kept": n, "perplexity": 100 * ratio, "ppl_ci_low": 90 * ratio,
            "ppl_ci_high": 110 * ratio, "ppl_ratio": 2 * ratio, "vs_nothing_kept": ratio,
            "vs_nothing_kept_ci_low": low, "vs_nothing_kept_ci_high": high}


def test_the_quantization_study_says_which_kept_set_measurably_protected_the_model():
    study = {"bits": 4, "block_size": 128, "rows": [
        _kept("none", 0, 1.0, 1.0, 1.0),
        _kept("grad_x_weight", 100, 0.9715, 0.955, 0.988),
        _kept("magnitude", 100, 1.0103, 1.002, 1.019),
        _kept("random", 100, 1.0, 0.999, 1.001, seed=0),
        _kept("random", 100, 1.0001, 0.9995, 1.0008, seed=1),
        _kept("super_weights", 3, 1.002, float("nan"), float("nan")),  # logged without its windows
    ]}
    out = findings(None, calibration_tokens=None, quantization=study)
    assert out["quantization"]["verdicts"] == {
        "grad_x_weight": ["protects"], "magnitude": ["harms"], "random": ["no measurable effect"] * 2,
        "super_weights": ["unknown"]}
    (text,) = out["sentences"]
    assert text.startswith("Quantized to 4 bits in blocks of 128, the model's perplexity is 100 with nothing kept "
                           "(95% CI 90–110); against that,")
    assert ("keeping grad_x_weight (100 weights) ×0.9715 (paired 95% CI 0.9550–0.9880): protects "
            "(perplexity 2.85% lower)") in text
    assert ("keeping magnitude (100 weights) ×1.0103 (paired 95% CI 1.0020–1.0190): harms "
            "(perplexity 1.03% higher)") in text
    assert ("keeping random (100 weights) ×1.0000–×1.0001 over 2 draws (paired 95% CI 0.9990–1.0010): "
            "no measurable effect") in text
    assert "keeping super_weights (3 weights) ×1.0020: unknown" in text
    # Two draws, one logged without its interval: no span is claimed, whichever comes first.
    for order in (slice(None), slice(None, None, -1)):
        draws = [_kept("random", 100, 1.0, 0.999, 1.001, seed=0), _kept("random", 100, 1.0, float("nan"),
                                                                        float("nan"), seed=1)][order]
        out = findings(None, calibration_tokens=None, quantization=dict(study, rows=[study["rows"][0], *draws]))
        assert "over 2 draws: mixed" in out["sentences"][0] and "paired 95% CI" not in out["sentences"][0]
