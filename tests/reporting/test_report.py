"""report.html: self-contained, built from the run's own numbers, and rendered by a real browser
(Debian's Chromium, driven through chromedriver) with every figure loaded."""

import base64
import html
import json
import os
import re
import shutil

import pandas as pd
import pytest
from conftest import SMALL

from cwa_dist.reporting.html_report import build, jaccard, ratio_table
from cwa_dist.run import main

METRICS = ["grad_x_weight", "wanda"]


@pytest.fixture(scope="module")
def run_dir(ray_local, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    code = main(["--model", str(tiny_model_dir["llama"]), *SMALL, "--metric", *METRICS, "--topk", "10",
                 "--perturbation-ratios", "0.5", "1.0", "--random-seeds", "2", "--super-weights", "2",
                 "--ablation-study", "3", "--output", str(out), "--experiment-id", "rep"])
    assert code == 0
    return out / "rep"


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_the_page_is_self_contained_and_every_figure_is_a_png(run_dir):
    page = (run_dir / "report.html").read_text()
    assert not re.search(r"<script|<link|@import|url\(|https?://", page)  # nothing fetched, nothing run
    images = _images(page)
    # the ratio curves, one map per ranking (two metrics and |W|), the overlap, the ablation scatter
    assert len(images) == 1 + 3 + 1 + 1
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # Rebuilding from the directory gives the same page: it is made of the run's files alone.
    assert build(run_dir) == page


def test_the_page_states_the_runs_numbers(run_dir):
    page = (run_dir / "report.html").read_text()
    summary = json.loads((run_dir / "experiment_summary.json").read_text())
    assert f"Baseline perplexity {summary['baseline_perplexity']:.4g}" in page
    rankings = pd.read_parquet(run_dir / "rankings.parquet")
    for metric in METRICS:
        first = rankings[(rankings["metric"] == metric) & (rankings["rank"] == 1)].iloc[0]
        assert f"Most critical weight by {metric}: {first['param']}[{first['row']}, {first['col']}]" in page
    for candidate in summary["super_weights"]:
        assert candidate["param"] in page
    rho = summary["ablation_study"]["metrics"]["wanda"]["spearman"]
    assert f"{rho:.3g}" in page
    # Each metric's same-tensor control, in the summary and on the page, from the results table.
    results = pd.read_parquet(run_dir / "perturbation_results.parquet")
    for entry in summary["comparison"]:
        at = results[(results["topk"] == entry["topk"]) & (results["mask_ratio"] == entry["mask_ratio"])]
        for metric in METRICS:
            drawn = at[at["metric"] == f"random_same_tensor[{metric}]"]["perturbed_ppl"]
            assert len(drawn) == 1 and entry["random_same_tensor"][metric]["mean"] == pytest.approx(drawn.mean())
    for metric in METRICS:
        assert f"same tensors as {metric}" in page
    # The findings, in the summary and word for word on the page; this run's calibration set is tiny.
    found = summary["findings"]
    assert found["small_calibration"] and [e["topk"] for e in found["per_k"]] == [10]
    for sentence in found["sentences"]:
        assert html.escape(sentence) in page


def test_ratio_table_and_jaccard_by_hand():
    results = pd.DataFrame([
        {"topk": 10, "mask_ratio": 1.0, "weights_masked": 10, "metric": "m", "is_control": False, "ppl_ratio": 4.0,
         "ppl_ratio_ci_low": 3.0, "ppl_ratio_ci_high": 5.0},
        {"topk": 10, "mask_ratio": 1.0, "weights_masked": 10, "metric": "random", "is_control": True, "ppl_ratio": 1.0,
         "ppl_ratio_ci_low": 1.0, "ppl_ratio_ci_high": 1.0},
        {"topk": 10, "mask_ratio": 1.0, "weights_masked": 10, "metric": "random", "is_control": True, "ppl_ratio": 1.5,
         "ppl_ratio_ci_low": 1.0, "ppl_ratio_ci_high": 2.0},
        {"topk": 10, "mask_ratio": 1.0, "weights_masked": 10, "metric": "magnitude", "is_control": True,
         "ppl_ratio": 2.0, "ppl_ratio_ci_low": 1.0, "ppl_ratio_ci_high": 3.0},
        {"topk": 10, "mask_ratio": 1.0, "weights_masked": 10, "metric": "random_same_tensor[m]", "is_control": True,
         "ppl_ratio": 3.0, "ppl_ratio_ci_low": 2.0, "ppl_ratio_ci_high": 4.0},
        {"topk": 10, "mask_ratio": 1.0, "weights_masked": 10, "metric": "random_same_tensor[m]", "is_control": True,
         "ppl_ratio": 2.0, "ppl_ratio_ci_low": 1.0, "ppl_ratio_ci_high": 3.0},
    ])
    row = ratio_table(results).iloc[0]
    assert (row["m"], row["random (mean, min–max)"], row["largest |W|"]) == ("×4 [3–5]", "×1.25 (1–1.5)", "×2")
    assert row["same tensors as m (mean, min–max)"] == "×2.5 (2–3)"
    rankings = pd.DataFrame({"metric": ["a"] * 3 + ["b"] * 3, "param": ["p"] * 6, "flat_index": [1, 2, 3, 2, 3, 4]})
    j = jaccard(rankings)
    assert j.loc["a", "b"] == j.loc["b", "a"] == 2 / 4 and j.loc["a", "a"] == 1.0


def _browser():
    """Debian's Chromium through its chromedriver (no driver download); CI must have it."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CWA_DIST_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium and chromedriver are required (CWA_DIST_REQUIRE_BROWSER=1): "
                        "apt-get install chromium chromium-driver")
        pytest.skip("no chromium/chromedriver on this machine (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_chromium_renders_the_page_with_every_figure_loaded(run_dir):
    browser = _browser()
    try:
        browser.get((run_dir / "report.html").as_uri())
        state = browser.execute_script(
            "return {ready: document.readyState, title: document.title,"
            " headings: [...document.querySelectorAll('h2')].map(h => h.textContent),"
            " images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth,"
            "   shown: i.getBoundingClientRect().width})),"
            " rows: document.querySelectorAll('table tr').length};")
    finally:
        browser.quit()
    assert state["ready"] == "complete" and "Critical-weight analysis" in state["title"]
    assert state["headings"] == ["Headline findings", "Perturbation curves", "Super-weight candidates", "Rankings",
                                 "Where the critical weights are", "Metric overlap", "Does sensitivity predict impact?",
                                 "Files of this run"]
    assert len(state["images"]) == len(_images((run_dir / "report.html").read_text())) == 6
    for image in state["images"]:  # decoded by the browser and laid out on the page
        assert image["complete"] and image["width"] > 100 and image["shown"] > 100, image
    assert state["rows"] > 30
