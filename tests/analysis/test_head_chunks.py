"""The LM head and loss computed chunk by chunk from the hidden states give the model's own
logits' NLL and gradients, for every family; wrappers keep the whole-logits path."""

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, build_tiny_model, calibration_chunks

from cwa_dist.analysis import evaluate
from cwa_dist.analysis.evaluate import batch_nll_rows, batches, head_split


def reference_rows(net, ids, mask):
    """The model's own forward: whole logits, then the loss."""
    logits = net(input_ids=ids, attention_mask=(mask != 0).long(), use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return nll.view(ids[:, 1:].shape).masked_fill(mask[:, 1:] != 1, 0.0).sum(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_head_equals_the_models_own_logits(family, monkeypatch):
    monkeypatch.setattr(evaluate, "HEAD_CHUNK_TOKENS", 8)  # several chunks per 40-token row
    net = build_tiny_model(family)
    assert head_split(net) is not None
    ((ids, mask),) = batches(calibration_chunks(3, 40, ragged=True), 3)
    got = batch_nll_rows(net, ids, mask)
    want = reference_rows(net, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got.sum().backward()
    mine = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    want.sum().backward()
    for n, p in net.named_parameters():
        # The head's gradient is summed chunk by chunk: float rounding, at the scale of its largest entry.
        torch.testing.assert_close(mine[n], p.grad, rtol=1e-5, atol=1e-6 * float(p.grad.abs().max()))


def test_wrappers_and_unknown_types_keep_the_whole_logits():
    net = build_tiny_model("llama")

    class Wrapper(torch.nn.Module):  # as DeepSpeed's engine: not the model itself
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert head_split(Wrapper(net)) is None
    net.config.model_type = "gemma2"  # soft-caps its logits: not a plain head
    assert head_split(net) is None
