import pytest
import torch

from conftest import build_tiny_model
from cwa_dist.errors import UsageError
from cwa_dist.perturb import MODES, Targets, apply, fingerprint, random_targets, restore, restored_exactly
from cwa_dist.plan import plan_experiments, weights_for
from cwa_dist.sensitivity import score_shards, full_shards, select_parameters


def test_apply_zeroes_exactly_the_targets_and_restore_is_bitwise():
    net = build_tiny_model("gpt2")
    params = dict(net.named_parameters())
    before = {n: fingerprint(p) for n, p in params.items()}
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    names = ["transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight"]
    targets = Targets(names, torch.tensor([0, 1, 1, 0]), torch.tensor([5, 0, 17, 9]))
    saved = apply(params, targets, "zero")
    wte = params["transformer.wte.weight"].detach().reshape(-1)
    assert wte[5] == 0 and wte[9] == 0
    changed = (wte != snapshot["transformer.wte.weight"].reshape(-1)).nonzero().squeeze(1).tolist()
    assert set(changed) <= {5, 9}
    restore(params, saved)
    assert restored_exactly(params, saved)
    assert {n: fingerprint(p) for n, p in params.items()} == before


def test_restore_detects_a_changed_bit():
    net = build_tiny_model("llama")
    params = dict(net.named_parameters())
    saved = apply(params, Targets(["lm_head.weight"], torch.tensor([0]), torch.tensor([3])), "zero")
    restore(params, saved)
    with torch.no_grad():
        params["lm_head.weight"].view(-1)[3] = torch.nextafter(params["lm_head.weight"].view(-1)[3], torch.tensor(9.0))
    assert not restored_exactly(params, saved)


def test_negative_zero_counts_as_a_difference():
    p = {"w": torch.nn.Parameter(torch.tensor([-0.0, 1.0]))}
    saved = apply(p, Targets(["w"], torch.tensor([0]), torch.tensor([0])), "zero")  # writes +0.0
    assert not restored_exactly(p, saved)
    restore(p, saved)
    assert restored_exactly(p, saved)


def test_random_targets_are_distinct_in_range_nested_and_seeded():
    names, numels = ["a", "b", "c"], [10, 1000, 3]
    t = random_targets(names, numels, 500, seed=7)
    pairs = list(zip(t.param.tolist(), t.flat_index.tolist()))
    assert len(set(pairs)) == 500
    assert all(0 <= i < numels[p] for p, i in pairs)
    assert pairs[:50] == list(zip(*(x.tolist() for x in (random_targets(names, numels, 50, seed=7).param,
                                                          random_targets(names, numels, 50, seed=7).flat_index))))
    assert pairs != list(zip(random_targets(names, numels, 500, seed=8).param.tolist(),
                             random_targets(names, numels, 500, seed=8).flat_index.tolist()))
    # all three parameters are drawn from, in proportion to their size
    assert set(t.param.tolist()) == {0, 1, 2} or t.param.tolist().count(1) > 400


def test_unknown_mode_is_a_usage_error():
    with pytest.raises(UsageError, match="Did you mean 'zero'"):
        MODES.get("zer0")


def test_plan_sizes_controls_and_prefixes():
    assert weights_for(10, 0.3) == 3 and weights_for(7, 0.5) == 4 and weights_for(3, 0.01) == 1
    net = build_tiny_model("llama")
    names = select_parameters(net, include_bias=False, include_norm=False)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    scores = score_shards(full_shards(net, names), ["grad_x_weight"], 20)
    specs = plan_experiments(
        rankings={"grad_x_weight": scores.candidates["grad_x_weight"]},
        magnitude=scores.candidates["magnitude"],
        param_names=names, numels=[dict(net.named_parameters())[n].numel() for n in names],
        topk=[10, 20], ratios=[0.5, 1.0], random_seeds=2, seed=0, mode="zero",
    )
    assert len(specs) == 4 * (1 + 2 + 1) and len({s.key for s in specs}) == len(specs)
    by_key = {s.key: s for s in specs}
    top20 = by_key["grad_x_weight|k=20|r=1"].targets
    top5 = by_key["grad_x_weight|k=10|r=0.5"].targets
    assert len(top5) == 5 and torch.equal(top5.flat_index, top20.flat_index[:5])
    assert len(by_key["random|k=10|r=0.5|seed=1"].targets) == 5
    assert by_key["magnitude|k=20|r=0.5"].is_control
