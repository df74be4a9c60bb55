"""critical_weights.safetensors and load_masks, from hand-made rankings (no run, no Ray)."""

import json

import pandas as pd
import pytest
import torch
from conftest import build_tiny_model

from cwa_dist.export import SAFETENSORS, SIDECAR, critical_tensors, load_masks, sidecar


def _write(tmp_path, rankings, supers=None):
    from safetensors.torch import save_file

    save_file(critical_tensors(rankings, supers), str(tmp_path / SAFETENSORS))
    config = {"model": "m", "resolved_dtype": "float32", "checkpoint": {"revision": None, "content_sha256": "ab"}}
    (tmp_path / SIDECAR).write_text(json.dumps(sidecar(config, rankings, supers)))
    return tmp_path / SAFETENSORS


def test_masks_are_true_exactly_at_each_metrics_ranked_weights(tmp_path):
    net = build_tiny_model("llama")
    names = [n for n, p in net.named_parameters() if p.dim() == 2][:2]
    rankings = pd.DataFrame({"metric": ["a", "a", "a", "b"], "rank": [1, 2, 3, 1],
                             "param": [names[0], names[1], names[0], names[1]], "flat_index": [7, 0, 3, 5]})
    supers = pd.DataFrame({"param": [names[1]], "row": [1], "col": [2], "flat_index": [0]})
    path = _write(tmp_path, rankings, supers)
    a = load_masks(path, net)  # the first metric
    assert set(a) == set(names) and int(a[names[0]].sum()) == 2 and int(a[names[1]].sum()) == 1
    assert a[names[0]].view(-1)[[3, 7]].all() and a[names[1]].view(-1)[0]
    b = load_masks(path, net, "b")
    assert set(b) == {names[1]} and torch.nonzero(b[names[1]].view(-1)).view(-1).tolist() == [5]
    meta = json.loads((tmp_path / SIDECAR).read_text())
    assert meta["k"] == 3 and meta["super_weights"] == [{"param": names[1], "expert": None, "row": 1, "col": 2,
                                                           "flat_index": 0}]
    with pytest.raises(ValueError, match="not 'c'"):
        load_masks(path, net, "c")


def test_a_super_weight_in_a_fused_experts_tensor_is_exported_with_its_expert(tmp_path):
    from safetensors.torch import load_file

    rankings = pd.DataFrame({"metric": ["a"], "rank": [1], "param": ["x"], "flat_index": [0]})
    supers = pd.DataFrame({"param": ["m.experts.down_proj"] * 2, "expert": pd.array([3, 1], dtype="Int64"),
                           "row": [9, 0], "col": [17, 4], "flat_index": [1157, 324]})
    path = _write(tmp_path, rankings, supers)
    assert load_file(str(path))["super_weights/m.experts.down_proj"].tolist() == [[3, 9, 17], [1, 0, 4]]
    meta = json.loads((tmp_path / SIDECAR).read_text())
    assert [(s["expert"], s["row"], s["col"]) for s in meta["super_weights"]] == [(3, 9, 17), (1, 0, 4)]


def test_a_model_without_the_ranked_parameter_is_refused(tmp_path):
    rankings = pd.DataFrame({"metric": ["a"], "rank": [1], "param": ["not.a.param"], "flat_index": [0]})
    with pytest.raises(ValueError, match="no parameter of"):
        load_masks(_write(tmp_path, rankings), build_tiny_model("llama"))
