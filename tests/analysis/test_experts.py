"""Mixture-of-experts layers in the pure-torch analysis: expert coordinates, Wanda's input norms
per expert, super-weight detection in an expert's down-projection (no Ray)."""

import pytest
import torch
from conftest import build_tiny_moe, calibration_chunks, moe_input_norms

from cwa_dist.analysis.evaluate import batches
from cwa_dist.analysis.experts import experts_modules, position
from cwa_dist.analysis.feature_norms import FeatureNorms
from cwa_dist.analysis.sensitivity import gradient_step, prepare_gradients, select_parameters
from cwa_dist.analysis.superweights import detect


def test_positions_name_the_expert_of_a_fused_tensor_only():
    assert position("model.layers.0.mlp.experts.gate_up_proj", (4, 40, 16), 2378) == (3, 28, 10)
    assert position("model.layers.0.mlp.experts.down_proj", (4, 16, 20), 0) == (0, 0, 0)
    assert position("model.layers.0.mlp.down_proj.weight", (16, 20), 45) == (None, 2, 5)
    assert position("model.norm.weight", (16,), 7) == (None, 7, None)
    # A 3-D tensor that is not a layer's experts keeps plain coordinates.
    assert position("model.conv.weight", (2, 3, 4), 23) == (None, 1, 2)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_wanda_norms_of_experts_count_the_tokens_routed_to_each(family):
    net = build_tiny_moe(family).double()
    net.set_experts_implementation("eager")  # the default, grouped_mm, has no float64 kernel
    chunks = calibration_chunks(4, 12, ragged=True)
    names = select_parameters(net, include_bias=False, include_norm=False)
    hand = moe_input_norms(net, chunks)
    prepare_gradients(net, names)
    norms = FeatureNorms(net, names)
    for ids, mask in batches(chunks, 4):  # padded: the padding must not count
        gradient_step(net, ids, mask, total_tokens=100)
    norms.remove()
    params = dict(net.named_parameters())
    fused = [n for n in names if params[n].ndim == 3]
    routers = [n for n in names if n.endswith("mlp.gate.weight")]
    assert fused and routers
    for name in names:
        want = hand[id(params[name])].reshape(-1)
        n = want.numel()
        torch.testing.assert_close(norms.expand(name, 0, n).double(), want, rtol=1e-5, atol=1e-6)
        start = n // 3 + 1  # a shard that starts mid-expert and mid-row, as ZeRO-3's do
        torch.testing.assert_close(norms.expand(name, start, n // 2).double(), want[start : start + n // 2],
                                   rtol=1e-5, atol=1e-6)
        picked = torch.tensor([0, start, n // 2, n - 1])
        assert torch.equal(norms.at(name, picked), norms.expand(name, 0, n)[picked])


def plant_in_expert(net, layer: int, expert: int, out_channel: int, in_channel: int) -> str:
    """An input channel of one expert's down-projection made large (its gate and up rows ×20) and
    the weight joining it to `out_channel` huge."""
    m = net.model.layers[layer].mlp.experts
    inter = m.down_proj.shape[2]
    with torch.no_grad():
        m.gate_up_proj[expert, in_channel] *= 20
        m.gate_up_proj[expert, inter + in_channel] *= 20
        m.down_proj[expert, out_channel, in_channel] = 40.0
    return f"model.layers.{layer}.mlp.experts.down_proj"


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_detection_finds_a_weight_planted_in_one_expert(family):
    net = build_tiny_moe(family)
    chunks = calibration_chunks(6, 16)
    # The expert the router sends most tokens to in layer 1, so the planted weight is reached.
    picked = []
    router = net.model.layers[1].mlp.gate
    h = router.register_forward_hook(lambda m, a, out: picked.append(out[-1].reshape(-1)))
    with torch.no_grad():
        for c in chunks:
            net(input_ids=c[None])
    h.remove()
    expert = int(torch.bincount(torch.cat(picked)).argmax())
    param = plant_in_expert(net, layer=1, expert=expert, out_channel=3, in_channel=7)
    found = detect(net, chunks, max_candidates=3)
    top = found[0]
    assert (top.layer, top.param, top.expert, top.row, top.col) == (1, param, expert, 3, 7), found
    weights = dict(net.named_parameters())[param].detach()
    assert top.weight == float(weights[expert, 3, 7]) == 40.0
    assert weights.reshape(-1)[top.flat_index] == 40.0
    assert top.max_output_activation > 5 * max((c.max_output_activation for c in found[1:]), default=0)
    assert all(not m._forward_pre_hooks for _, m in experts_modules(net))
