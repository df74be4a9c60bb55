from collections import Counter

import pytest
import torch
from conftest import build_tiny_model

from cwa_dist.analysis.experiments import plan_experiments, same_tensor_method, same_tensor_metric, weights_for
from cwa_dist.analysis.perturb import (
    MODES,
    Targets,
    apply,
    fingerprint,
    random_targets,
    restore,
    restored_exactly,
    same_tensor_targets,
)
from cwa_dist.analysis.sensitivity import full_shards, score_shards, select_parameters
from cwa_dist.errors import UsageError


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


def _pairs(t: Targets) -> list[tuple[int, int]]:
    return list(zip(t.param.tolist(), t.flat_index.tolist()))


def test_same_tensor_targets_match_the_ranking_tensor_for_tensor_at_every_prefix():
    names, numels = ["a", "b", "c", "d"], [6, 500, 40, 9]
    # Sizes by name, listed in another order than the ranking's names (as a run's scored tensors are).
    numel_of = dict(reversed(list(zip(names, numels))))
    # A ranking that crowds one small tensor: 5 of a's 6 weights, then b, c, a again.
    ranked = Targets(names, torch.tensor([0, 0, 1, 0, 2, 1, 0, 2, 0, 1]), torch.tensor([0, 1, 7, 2, 3, 9, 4, 5, 5, 11]))
    drawn = same_tensor_targets(ranked, numel_of, seed=3)
    assert torch.equal(drawn.param, ranked.param)  # entry i lies in entry i's tensor
    for n in range(1, len(ranked) + 1):
        head = drawn.head(n)
        assert Counter(head.param.tolist()) == Counter(ranked.head(n).param.tolist())
    pairs = _pairs(drawn)
    assert len(set(pairs)) == len(pairs) and all(0 <= i < numels[p] for p, i in pairs)
    assert 3 not in drawn.param.tolist()  # a tensor the ranking never touches is never drawn from
    assert _pairs(same_tensor_targets(ranked, numel_of, seed=3)) == pairs
    assert _pairs(same_tensor_targets(ranked, numel_of, seed=4)) != pairs


def test_same_tensor_draws_are_uniform_within_each_tensor():
    # 3 of a 12-weight tensor, over 4,000 seeds: each index is drawn 1,000 times in expectation.
    ranked = Targets(["w"], torch.zeros(3, dtype=torch.int64), torch.tensor([0, 1, 2]))
    seen = Counter(i for s in range(4000) for i in same_tensor_targets(ranked, {"w": 12}, seed=s).flat_index.tolist())
    assert sorted(seen) == list(range(12))
    assert max(abs(c - 1000) for c in seen.values()) < 150  # ~4.9 standard deviations


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
    # The original tool's workload: no random draws, the |W| control off: the metric's experiments only.
    alone = plan_experiments(
        rankings={"grad_x_weight": scores.candidates["grad_x_weight"]},
        magnitude=scores.candidates["magnitude"],
        param_names=names, numels=[dict(net.named_parameters())[n].numel() for n in names],
        topk=[10, 20], ratios=[0.5, 1.0], random_seeds=0, seed=0, mode="zero", magnitude_control=False,
    )
    assert [s.key for s in alone] == [s.key for s in specs if s.method == "grad_x_weight"]
    # Same-tensor controls: one set per metric and seed, nested like the ranking, its tensors' counts.
    with_same = plan_experiments(
        rankings={"grad_x_weight": scores.candidates["grad_x_weight"]},
        magnitude=scores.candidates["magnitude"],
        param_names=names, numels=[dict(net.named_parameters())[n].numel() for n in names],
        topk=[10, 20], ratios=[0.5, 1.0], random_seeds=2, seed=0, mode="zero", same_tensor_seeds=2,
    )
    control = {s.key: s for s in with_same if s.method == same_tensor_method("grad_x_weight")}
    assert [s.key for s in with_same if s.key not in control] == [s.key for s in specs]
    assert len(control) == 4 * 2 and all(s.is_control for s in control.values())
    assert same_tensor_metric(same_tensor_method("grad_x_weight")) == "grad_x_weight"
    assert same_tensor_metric("random") is None
    for key, spec in control.items():
        ranked = by_key[key.replace("random_same_tensor[grad_x_weight]", "grad_x_weight").rsplit("|seed=", 1)[0]]
        assert Counter(spec.targets.param.tolist()) == Counter(ranked.targets.param.tolist())
    small = control["random_same_tensor[grad_x_weight]|k=10|r=0.5|seed=1"].targets
    large = control["random_same_tensor[grad_x_weight]|k=20|r=1|seed=1"].targets
    assert _pairs(small) == _pairs(large)[:5]


# -- every mode -------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _weights(dtype):
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(64, 33, generator=gen) * 0.05).to(dtype)
    w.view(-1)[7] = -0.0  # a negative zero among the targets
    return {"w": torch.nn.Parameter(w, requires_grad=False)}


TARGETS = Targets(["w"], torch.zeros(40, dtype=torch.int64), torch.arange(0, 2000, 50, dtype=torch.int64).add_(7))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["zero", "sign_flip", "scale", "gauss_noise", "bit_flip"])
def test_every_mode_changes_only_its_targets_and_restores_bit_for_bit(mode, dtype):
    from cwa_dist.analysis.perturb import ModeOptions

    params = _weights(dtype)
    before = params["w"].detach().clone()
    saved = apply(params, TARGETS, mode, ModeOptions(scale=0.25, noise=0.5, seed=11))
    bits_now = params["w"].detach().reshape(-1).view(INT_OF[dtype])
    bits_before = before.reshape(-1).view(INT_OF[dtype])
    changed = set((bits_now != bits_before).nonzero().squeeze(1).tolist())
    assert changed <= set(TARGETS.flat_index.tolist())
    assert len(changed) >= len(TARGETS) - 1  # every target moved (zero/scale leave a zero's bits, or -0.0 → +0.0)
    restore(params, saved)
    assert restored_exactly(params, saved)
    assert torch.equal(params["w"].detach().reshape(-1).view(INT_OF[dtype]), bits_before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bit", [None, 0, 3, "sign"])
def test_bit_flip_flips_exactly_the_intended_bit(dtype, bit):
    from cwa_dist.analysis.perturb import ModeOptions, flip_bit_index

    width = 8 * dtype.itemsize
    chosen = width - 1 if bit == "sign" else bit
    expected_bit = {torch.float32: 30, torch.bfloat16: 14, torch.float16: 14}[dtype] if chosen is None else chosen
    assert flip_bit_index(dtype, chosen) == expected_bit
    params = _weights(dtype)
    before = params["w"].detach().reshape(-1).view(INT_OF[dtype]).clone()
    apply(params, TARGETS, "bit_flip", ModeOptions(bit=chosen))
    after = params["w"].detach().reshape(-1).view(INT_OF[dtype])
    idx = TARGETS.flat_index
    # XOR of old and new stored bits is exactly one set bit, the intended one (compared as unsigned).
    diff = (before[idx].long() ^ after[idx].long()) & ((1 << width) - 1)
    assert torch.equal(diff, torch.full_like(diff, 1 << expected_bit))


def test_default_bit_flip_makes_small_weights_huge_and_sign_flip_negates():
    from cwa_dist.analysis.perturb import ModeOptions

    params = {"w": torch.nn.Parameter(torch.tensor([0.5, -0.25, 0.75]), requires_grad=False)}
    apply(params, Targets(["w"], torch.zeros(3, dtype=torch.int64), torch.arange(3)), "bit_flip", ModeOptions())
    assert torch.equal(params["w"].detach().double(), torch.tensor([0.5, -0.25, 0.75], dtype=torch.float64) * 2.0**128)
    params = {"w": torch.nn.Parameter(torch.tensor([0.5, -0.25]), requires_grad=False)}
    apply(params, Targets(["w"], torch.zeros(2, dtype=torch.int64), torch.arange(2)), "sign_flip")
    assert torch.equal(params["w"].detach(), torch.tensor([-0.5, 0.25]))


def test_gauss_noise_is_relative_to_each_weight_and_seeded():
    from cwa_dist.analysis.perturb import ModeOptions

    def noisy(seed):
        params = {"w": torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.0, 4.0]).repeat(500), requires_grad=False)}
        apply(params, Targets(["w"], torch.zeros(2000, dtype=torch.int64), torch.arange(2000)), "gauss_noise",
              ModeOptions(noise=0.1, seed=seed))
        return params["w"].detach()

    a, b, c = noisy(1), noisy(1), noisy(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    w = torch.tensor([1.0, -2.0, 0.0, 4.0]).repeat(500)
    rel = (a - w)[w != 0] / w[w != 0].abs()
    assert abs(rel.std().item() - 0.1) < 0.01 and abs(rel.mean().item()) < 0.01
    assert torch.equal(a[w == 0], w[w == 0])  # relative to |w|: a zero stays zero


def test_a_bit_the_dtype_lacks_is_refused():
    from cwa_dist.analysis.perturb import flip_bit_index

    with pytest.raises(UsageError, match="outside 0..15"):
        flip_bit_index(torch.bfloat16, 16)


def test_noise_seeds_differ_per_experiment_and_are_stable():
    from cwa_dist.analysis.experiments import noise_seed

    assert noise_seed("grad_x_weight|k=10|r=1", 0) == noise_seed("grad_x_weight|k=10|r=1", 0)
    assert noise_seed("grad_x_weight|k=10|r=1", 0) != noise_seed("random|k=10|r=1|seed=0", 0)
    assert noise_seed("grad_x_weight|k=10|r=1", 0) != noise_seed("grad_x_weight|k=10|r=1", 1)
