"""Super-weight detection on tiny models with a planted massive activation (pure torch, no Ray)."""

import pytest
import torch
from conftest import build_tiny_model, calibration_chunks

from cwa_dist.analysis.superweights import detect, down_projections


def plant(net, family: str, layer: int, out_channel: int, in_channel: int) -> tuple[str, int, int]:
    """Make input channel `in_channel` of layer `layer`'s down-projection large (its producing weights
    ×20) and the weight joining it to `out_channel` huge; return (parameter, row, col) as stored."""
    with torch.no_grad():
        if family == "llama":
            mlp = net.model.layers[layer].mlp
            mlp.up_proj.weight[in_channel] *= 20
            mlp.down_proj.weight[out_channel, in_channel] = 40.0
            return f"model.layers.{layer}.mlp.down_proj.weight", out_channel, in_channel
        mlp = net.transformer.h[layer].mlp  # GPT-2: Conv1D weights are stored (in, out)
        mlp.c_fc.weight[:, in_channel] *= 20
        mlp.c_fc.bias[in_channel] = 5.0
        mlp.c_proj.weight[in_channel, out_channel] = 40.0
        return f"transformer.h.{layer}.mlp.c_proj.weight", in_channel, out_channel


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_detection_finds_the_planted_weight(family):
    net = build_tiny_model(family)
    param, row, col = plant(net, family, layer=1, out_channel=3, in_channel=7)
    found = detect(net, calibration_chunks(6, 16), max_candidates=3)
    top = found[0]
    assert (top.layer, top.param, top.row, top.col) == (1, param, row, col), found
    assert (top.output_channel, top.input_channel) == (3, 7)
    weights = dict(net.named_parameters())
    assert top.weight == float(weights[param].detach()[row, col]) == 40.0
    assert top.flat_index == row * weights[param].shape[1] + col
    assert top.max_output_activation > 5 * max((c.max_output_activation for c in found[1:]), default=0)


def test_an_unplanted_model_still_reports_its_largest_layer_and_hooks_are_removed():
    net = build_tiny_model("llama")
    found = detect(net, calibration_chunks(4, 16))
    assert len(found) >= 1 and found[0].max_output_activation > 0
    assert all(not m._forward_hooks for _, _, m in down_projections(net))


@pytest.mark.parametrize("family,expected", [("llama", "mlp.down_proj"), ("gpt2", "mlp.c_proj"),
                                             ("gpt_neox", "mlp.dense_4h_to_h"), ("opt", "fc2")])
def test_every_family_has_its_down_projections_found(family, expected):
    names = [name for _, name, _ in down_projections(build_tiny_model(family))]
    assert len(names) == 2 and all(n.endswith(expected) for n in names)
