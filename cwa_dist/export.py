"""The critical weights in a form other tools read: `critical_weights.safetensors` beside
`critical_weights.json`, written by every run.

The safetensors file holds, per metric and scored parameter, the int64 flat indices of that
parameter's entries in the metric's top-K (in rank order), under the key `<metric>/<parameter>`,
and the super-weight candidates' (row, col) under `super_weights/<parameter>`, (expert, row, col) in
a mixture-of-experts layer's fused experts tensor. The JSON says what
they were computed from. A quantizer or pruner keeps those weights with `load_masks`:

    from cwa_dist.export import load_masks
    masks = load_masks("run/critical_weights.safetensors", model)       # the first metric
    for name, p in model.named_parameters():
        if name in masks:
            sparse = p.detach() * masks[name]     # kept at full precision
            dense = p.detach() * ~masks[name]     # quantized; the kept ones quantize as zero

No Ray and no distributed code here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

SCHEMA = {
    "<metric>/<parameter>": "int64 flat indices (into the flattened parameter) of the parameter's entries in the "
                            "metric's top-K, in rank order",
    "super_weights/<parameter>": "int64 [n, 2]: (row, col) of each super-weight candidate in that parameter; "
                                 "[n, 3], (expert, row, col), in a fused mixture-of-experts tensor",
}
SAFETENSORS, SIDECAR = "critical_weights.safetensors", "critical_weights.json"


def critical_tensors(rankings: pd.DataFrame, super_weights: pd.DataFrame | None) -> dict[str, torch.Tensor]:
    """The tensors of critical_weights.safetensors, from rankings.parquet and super_weights."""
    out = {}
    for (metric, param), df in rankings.sort_values("rank").groupby(["metric", "param"], sort=True):
        out[f"{metric}/{param}"] = torch.tensor(df["flat_index"].to_numpy(), dtype=torch.int64)
    if super_weights is not None:
        for param, df in super_weights.groupby("param", sort=True):
            fused = "expert" in df and df["expert"].notna().all()
            columns = ["expert", "row", "col"] if fused else ["row", "col"]
            coords = torch.tensor(df[columns].to_numpy(dtype="int64"), dtype=torch.int64)
            out[f"super_weights/{param}"] = coords.contiguous()  # safetensors refuses a strided view
    return out


def sidecar(config: dict, rankings: pd.DataFrame, super_weights: pd.DataFrame | None) -> dict:
    """critical_weights.json: what the indices were computed from."""
    checkpoint = config.get("checkpoint") or {}
    return {
        "model": config["model"],
        "revision": checkpoint.get("revision"),
        "content_sha256": checkpoint.get("content_sha256"),
        "metrics": list(dict.fromkeys(rankings["metric"])),
        "k": int(rankings["rank"].max()) if len(rankings) else 0,
        "dtype": config.get("resolved_dtype"),
        "super_weights": [] if super_weights is None else [
            {"param": r.param, "expert": _optional_int(getattr(r, "expert", None)), "row": int(r.row),
             "col": int(r.col), "flat_index": int(r.flat_index)}
            for r in super_weights.itertuples(index=False)],
        "schema": SCHEMA,
    }


def _optional_int(value) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def load_masks(path: str | Path, model: torch.nn.Module, metric: str | None = None) -> dict[str, torch.Tensor]:
    """Boolean masks, shaped like each parameter of `model` that holds a critical weight: True at
    the top-K weights of `metric` (default: the run's first metric), False elsewhere."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path.parent / SIDECAR).read_text())
    metric = metric or meta["metrics"][0]
    if metric not in meta["metrics"]:
        raise ValueError(f"{path} ranks by {', '.join(meta['metrics'])}, not {metric!r}")
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    ranked = {name.split("/", 1)[1]: idx for name, idx in tensors.items() if name.startswith(f"{metric}/")}
    masks = {}
    for name, idx in ranked.items():
        if name not in params:
            raise ValueError(f"{path} names {name}, which the model has no parameter of")
        mask = torch.zeros(params[name].numel(), dtype=torch.bool)
        mask[idx] = True
        masks[name] = mask.view(params[name].shape)
    return masks

