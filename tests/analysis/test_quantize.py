"""The block quantizer (analysis/quantize.py) against a plain, one-block-at-a-time quantizer."""

import dataclasses
import math

import pytest
import torch
from conftest import random_specs

from cwa_dist.analysis.quantize import check_bits, quantize_matrix, quantize_rows
from cwa_dist.errors import UsageError


def plain_quantizer(w, bits, block, keep=None):
    """Row by row, block by block, in Python: the rule as the README states it."""
    qmax = 2 ** (bits - 1) - 1
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    out = torch.empty(w.shape, dtype=dtype)
    for i in range(w.shape[0]):
        for start in range(0, w.shape[1], block):
            values = w[i, start:start + block].to(dtype).clone()
            kept = keep[i, start:start + block] if keep is not None else torch.zeros(len(values), dtype=torch.bool)
            dense = torch.where(kept, torch.zeros_like(values), values)
            scale = dense.abs().max() / qmax
            for j in range(len(values)):
                if kept[j]:
                    out[i, start + j] = values[j]
                elif scale == 0:
                    out[i, start + j] = 0.0
                else:
                    out[i, start + j] = torch.round(dense[j] / scale).clamp(-qmax, qmax) * scale
    return out.to(w.dtype)


@pytest.mark.parametrize("bits,block,cols", [(4, 8, 20), (3, 5, 5), (8, 128, 37), (2, 4, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_quantize_rows_equals_the_plain_quantizer_bit_for_bit(bits, block, cols, dtype):
    g = torch.Generator().manual_seed(bits * 100 + cols)
    w = (torch.randn(6, cols, generator=g) * 3).to(dtype)
    w[2, :] = 0.0  # an all-zero row: its blocks stay zero
    keep = torch.rand(6, cols, generator=g) < 0.15
    for k in (None, keep):
        got = quantize_rows(w, bits, block, k)
        want = plain_quantizer(w, bits, block, k)
        assert got.dtype == w.dtype and torch.equal(got, want)
    assert torch.equal(w, w.clone())  # unchanged (a fresh copy compares equal to itself: w was not written)


def test_grid_scale_and_kept_weights():
    w = torch.tensor([[1.0, -0.55, 0.24, 7.0, 0.1, 0.2]])
    # 4 bits: 7 levels each side. Block [1, -0.55, 0.24] has scale 1/7; block [7, 0.1, 0.2] scale 1.
    got = quantize_rows(w, 4, 3)
    torch.testing.assert_close(got, torch.tensor([[1.0, -4 / 7, 2 / 7, 7.0, 0.0, 0.0]]))
    # Keeping the 7.0: its block's scale becomes 0.2 / 7, so 0.1 and 0.2 survive; the 7.0 is exact.
    keep = torch.tensor([[False, False, False, True, False, False]])
    kept = quantize_rows(w, 4, 3, keep)
    assert kept[0, 3] == 7.0
    torch.testing.assert_close(kept[0, 4:], torch.tensor([0.1, 0.2]), atol=0.2 / 7 / 2, rtol=0)
    # The block's largest weight is represented exactly with or without keeping it.
    assert got[0, 3] == 7.0 and got[0, 0] == 1.0


def test_matrix_keeps_flat_indices_and_quantizes_a_transposed_weight_along_its_first_dimension():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 6, generator=g)
    flat = torch.tensor([0, 13, 47])
    keep = torch.zeros(48, dtype=torch.bool)
    keep[flat] = True
    assert torch.equal(quantize_matrix(w, 4, 4, flat), plain_quantizer(w, 4, 4, keep.view(8, 6)))
    # Stored (in, out): blocks run down the columns.
    want = plain_quantizer(w.t().contiguous(), 4, 4, keep.view(8, 6).t().contiguous()).t()
    assert torch.equal(quantize_matrix(w, 4, 4, flat, transposed=True), want)


def test_a_fused_experts_tensor_is_quantized_expert_by_expert_along_each_input_row():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 5, 7, generator=g)  # (experts, out, in)
    flat = torch.tensor([0, 36, 104])  # one kept weight in each expert
    keep = torch.zeros(105, dtype=torch.bool)
    keep[flat] = True
    keep = keep.view(3, 5, 7)
    want = torch.stack([plain_quantizer(w[e], 4, 3, keep[e]) for e in range(3)])
    assert torch.equal(quantize_matrix(w, 4, 3, flat), want)
    # Experts stored (in, out): each expert's blocks run down its columns.
    want = torch.stack([plain_quantizer(w[e].t().contiguous(), 4, 3, keep[e].t().contiguous()).t() for e in range(3)])
    assert torch.equal(quantize_matrix(w, 4, 3, flat, transposed=True), want)


def test_bit_widths_outside_two_to_eight_are_refused():
    for bits in (1, 9, 0):
        with pytest.raises(UsageError, match="from 2 to 8"):
            check_bits(bits)
    check_bits(4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # GPT-2's Conv1D weights are stored (in, out)
def test_an_evaluation_actor_quantizes_as_the_plain_quantizer_does_and_restores(ray_local, family):
    import copy

    from conftest import build_tiny_model, calibration_chunks, saved_model

    from cwa_dist.analysis.evaluate import perplexity
    from cwa_dist.analysis.perturb import random_targets
    from cwa_dist.analysis.quantize import study_specs
    from cwa_dist.analysis.sensitivity import select_parameters
    from cwa_dist.distributed.eval_actors import EvalPool

    net = build_tiny_model(family)
    matrices = [n for n in select_parameters(net, include_bias=False, include_norm=False)
                if dict(net.named_parameters())[n].ndim == 2]
    params = dict(net.named_parameters())
    kept = random_targets(matrices, [params[n].numel() for n in matrices], 30, seed=4)
    control = dataclasses.replace(random_specs(net, 1)[0], targets=kept)
    specs = study_specs([control], None, k=30, bits=3, block=8, matrices=matrices)
    chunks = calibration_chunks(5, 24)
    pool = EvalPool(saved_model(net), chunks, num_actors=1, device="cpu", gpus_per_actor=0, batch_size=2)
    results = []
    try:
        pool.run(specs, on_result=results.append, on_failure=lambda s, e: pytest.fail(e), max_retries=0)
        assert pool.all_weights_intact()
    finally:
        pool.shutdown()
    got = {r.key: r for r in results}
    stored_in_out = {n for n, m in net.named_modules() if type(m).__name__ == "Conv1D" for n in [f"{n}.weight"]}
    assert (family == "gpt2") == bool(stored_in_out & set(matrices))
    for spec in specs:
        reference = copy.deepcopy(net)
        ref_params = dict(reference.named_parameters())
        by_param = spec.targets.by_param()
        with torch.no_grad():
            for n in matrices:
                w = ref_params[n].data
                keep = torch.zeros(w.numel(), dtype=torch.bool)
                keep[by_param.get(n, torch.empty(0, dtype=torch.int64))] = True
                keep = keep.view(w.shape)
                if n in stored_in_out:
                    w.copy_(plain_quantizer(w.t().contiguous(), 3, 8, keep.t().contiguous()).t())
                else:
                    w.copy_(plain_quantizer(w, 3, 8, keep))
        want = perplexity(reference, chunks, 2)
        r = got[spec.key]
        assert r.restored_exact and r.weights_masked == len(spec.targets)
        assert r.perturbed.value == pytest.approx(want.value, rel=1e-6)
        assert r.perturbed.value != pytest.approx(r.baseline.value, rel=1e-4)  # 3 bits change the model


def test_the_paired_interval_against_nothing_kept_is_exact_for_a_uniform_shift():
    """When every window's NLL moves by the same δ nats per token, every resample of the windows
    gives the ratio e^δ, so the paired interval is that point; unpaired, it would be wide."""
    from cwa_dist.stages.quantization import versus_nothing_kept

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(20, 60, (30,), generator=g).tolist()
    nll = (torch.rand(30, generator=g, dtype=torch.float64) * 4 + 1) * torch.tensor(tokens, dtype=torch.float64)
    delta = -0.03  # the kept set lowers every token's NLL a little
    none = {"status": "ok", "perturbed_ppl": math.exp(nll.sum() / sum(tokens)), "window_nll": nll.tolist()}
    shifted = nll + delta * torch.tensor(tokens, dtype=torch.float64)
    kept = {"status": "ok", "perturbed_ppl": math.exp(shifted.sum() / sum(tokens)), "window_nll": shifted.tolist()}
    got = versus_nothing_kept(none, kept, tokens, samples=200, seed=1)
    assert got["vs_nothing_kept"] == pytest.approx(math.exp(delta), rel=1e-12)
    assert got["vs_nothing_kept_ci_low"] == pytest.approx(math.exp(delta), rel=1e-12)
    assert got["vs_nothing_kept_ci_high"] == pytest.approx(math.exp(delta), rel=1e-12)
    same = versus_nothing_kept(none, none, tokens, samples=200, seed=1)
    assert (same["vs_nothing_kept_ci_low"], same["vs_nothing_kept_ci_high"]) == (1.0, 1.0)
    # A row logged without its windows (an earlier version's log) keeps its point ratio only.
    old = {k: v for k, v in kept.items() if k != "window_nll"}
    partial = versus_nothing_kept(none, old, tokens, samples=200, seed=1)
    assert partial["vs_nothing_kept"] == pytest.approx(math.exp(delta))
    assert math.isnan(partial["vs_nothing_kept_ci_low"])
    assert math.isnan(versus_nothing_kept({"status": "failed"}, kept, tokens, samples=10, seed=1)["vs_nothing_kept"])
