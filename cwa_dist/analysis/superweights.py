"""Super-weight candidates from activation outliers (Yu et al. 2024, "The Super Weight in Large
Language Models"): pure torch, no Ray.

A super weight sits in an MLP's down-projection: one very large input activation (channel j of the
down-projection's input) times the weight W[i, j] makes a massive output activation in channel i.
Forward hooks on every down-projection record, over a few prompts, the largest |output| and, at the
token where it occurs, the input channel with the largest |input|. A layer whose largest |output|
stands far above the other layers' is a candidate: (layer, row i, column j).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cwa_dist.analysis.evaluate import attention_mask, batches

# The MLP output projection of each family: Llama/Mistral/OLMo/Qwen, GPT-2 (Conv1D), GPT-NeoX, OPT.
DOWN_PROJECTIONS = re.compile(r"(?:^|\.)(\d+)\.(?:mlp\.down_proj|mlp\.c_proj|mlp\.dense_4h_to_h|fc2)$")


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
    seen: dict[str, tuple[float, int, int, float]] = {}  # name → (max |out|, out channel, in channel, |in| there)

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().abs().flatten(0, -2).float()
            y = output.detach().abs().flatten(0, -2).float()
            if mask is not None:  # padded positions say nothing about the model
                keep = mask.flatten().bool().to(y.device)
                x, y = x[keep], y[keep]
            if y.numel() == 0:
                return
            token, channel = divmod(int(y.argmax()), y.shape[1])
            j = int(x[token].argmax())
            value = float(y[token, channel])
            if name not in seen or value > seen[name][0]:
                seen[name] = (value, channel, j, float(x[token, j]))

        return record

    layers = down_projections(model)
    handles = [module.register_forward_hook(hook(name)) for _, name, module in layers]
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
    modules = {name: (layer, module) for layer, name, module in layers}
    out = []
    for name, (value, channel, j, x_value) in chosen:
        layer, module = modules[name]
        weight = module.weight
        # nn.Linear stores (out, in); GPT-2's Conv1D (it has `nf`, its output width) stores (in, out).
        row, col = (j, channel) if hasattr(module, "nf") else (channel, j)
        out.append(Candidate(layer=layer, param=f"{name}.weight", row=row, col=col,
                             flat_index=row * weight.shape[1] + col,
                             output_channel=channel, input_channel=j, max_output_activation=value,
                             max_input_activation=x_value, weight=float(weight.detach()[row, col])))
    return out
