"""Reusable scratch buffers: pure torch."""

from __future__ import annotations

import torch


class Scratch:
    """Reusable buffers, grown to the largest request: scoring 100M weights into fresh tensors
    would spend more time faulting their pages in than computing."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, n: int, dtype: torch.dtype, device) -> torch.Tensor:
        key = (dtype, str(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n]
