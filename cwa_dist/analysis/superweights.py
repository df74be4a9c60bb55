"""Super-weight candidates from activation outliers (Yu et al. 2024, "The Super Weight in Large
Language Models"): pure torch, no Ray.

A super weight sits in an MLP's down-projection: one very large input activation (channel j of the
down-projection's input) times the weight W[i, j] makes a massive output activation in channel i.
Forward hooks on every down-projection record, over a few prompts, the largest |output| and, at the
token where it occurs, the input channel with the largest |input|. A layer whose largest |output|
stands far above the other layers' is a candidate: (layer, row i, column j).

In a mixture-of-experts layer every expert's down-projection is its own: an expert sees only the
tokens routed to it, so its activations are recomputed from those (analysis.experts) and each
expert is compared with the other down-projections as one of them; a candidate there also names
its expert, and its coordinates address one element of the fused experts tensor.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cwa_dist.analysis.evaluate import attention_mask, batches
from cwa_dist.analysis.experts import down_output, experts_modules, routed, routing_args

# The MLP output projection of each family: Llama/Mistral/OLMo/Qwen, GPT-2 (Conv1D), GPT-NeoX, OPT,
# and the shared experts of Qwen2-MoE and DeepSeek (the routed ones are fused: analysis.experts).
DOWN_PROJECTIONS = re.compile(
    r"(?:^|\.)(\d+)\.(?:mlp\.(?:shared_experts?\.)?down_proj|mlp\.c_proj|mlp\.dense_4h_to_h|fc2)$")
_LAYER = re.compile(r"(?:^|\.)(\d+)\.")


@dataclass(frozen=True, slots=True)
class Candidate:
    layer: int
    param: str  # the weight's parameter name
    row: int  # index into the weight tensor as stored (Conv1D stores (in, out), so row/col swap there)
    col: int
    flat_index: int
    output_channel: int
    input_channel: int
    max_output_activation: float
    max_input_activation: float
    weight: float
    expert: int | None = None  # the expert, in a fused experts tensor (row and col are then within it)


def down_projections(model: torch.nn.Module) -> list[tuple[int, str, torch.nn.Module]]:
    out = []
    for name, module in model.named_modules():
        m = DOWN_PROJECTIONS.search(name)
        if m and hasattr(module, "weight"):
            out.append((int(m.group(1)), name, module))
    return out


@torch.inference_mode()
def detect(model: torch.nn.Module, prompts: Sequence[torch.Tensor], *, batch_size: int = 4,
           max_candidates: int = 3, spike_factor: float = 10.0) -> list[Candidate]:
    """Candidates, largest output activation first: every layer whose largest |output| is at least
    `spike_factor` times the median of all layers' largest |output| (at most `max_candidates`), and
    always the layer with the largest one."""
    # (module name, expert or None) → (max |out|, out channel, in channel, |in| there)
    seen: dict[tuple[str, int | None], tuple[float, int, int, float]] = {}

    def note(where: tuple[str, int | None], x: torch.Tensor, y: torch.Tensor) -> None:
        """x, y: |input| and |output| of one down-projection, a row per (unpadded) token."""
        if y.numel() == 0:
            return
        token, channel = divmod(int(y.argmax()), y.shape[1])
        j = int(x[token].argmax())
        value = float(y[token, channel])
        if where not in seen or value > seen[where][0]:
            seen[where] = (value, channel, j, float(x[token, j]))

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().abs().flatten(0, -2).float()
            y = output.detach().abs().flatten(0, -2).float()
            if mask is not None:  # padded positions say nothing about the model
                keep = mask.flatten().bool().to(y.device)
                x, y = x[keep], y[keep]
            note((name, None), x, y)

        return record

    def experts_hook(name):
        def record(module, args, kwargs):
            got = routing_args(args, kwargs)
            if got is None:
                return
            hidden, index = got
            keep = mask.flatten().bool() if mask is not None and mask.numel() == hidden.numel() // hidden.shape[-1] \
                else None
            for r in routed(module, hidden, index, keep):
                note((name, r.expert), r.down_input.abs().float(), down_output(module, r).abs().float())

        return record

    layers = down_projections(model)
    fused = experts_modules(model)
    handles = [module.register_forward_hook(hook(name)) for _, name, module in layers]
    handles += [module.register_forward_pre_hook(experts_hook(name), with_kwargs=True) for name, module in fused]
    device = next(model.parameters()).device
    mask = None
    try:
        for ids, mask in batches(list(prompts), batch_size):
            model(input_ids=ids.to(device), attention_mask=attention_mask(mask).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        return []
    median = statistics.median(v[0] for v in seen.values())
    ranked = sorted(seen.items(), key=lambda kv: -kv[1][0])
    chosen = [kv for i, kv in enumerate(ranked) if i == 0 or kv[1][0] >= spike_factor * median][:max_candidates]
    modules = {name: module for _, name, module in layers} | dict(fused)
    out = []
    for (name, expert), (value, channel, j, x_value) in chosen:
        module = modules[name]
        m = _LAYER.search(name)
        layer = int(m.group(1)) if m else -1
        if expert is None:
            weight, param = module.weight.detach(), f"{name}.weight"
            transposed = hasattr(module, "nf")  # GPT-2's Conv1D (`nf`: its output width) stores (in, out)
        else:
            weight, param = module.down_proj.detach()[expert], f"{name}.down_proj"
            transposed = bool(getattr(module, "is_transposed", False))
        row, col = (j, channel) if transposed else (channel, j)
        flat = row * weight.shape[1] + col + (expert * weight.numel() if expert is not None else 0)
        out.append(Candidate(layer=layer, param=param, row=row, col=col, flat_index=flat,
                             output_channel=channel, input_channel=j, max_output_activation=value,
                             max_input_activation=x_value, weight=float(weight[row, col]), expert=expert))
    return out
