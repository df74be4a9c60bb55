"""The gradient stage as a group of Ray workers.

Each worker holds a model replica (today) or its ZeRO-3 partition (with sharding), runs
backward over the calibration chunks it is given, scores the shards it owns and returns only
its local top-K candidates and statistics. The driver merges them with `topk.merge`, which is
exact for any number of workers; one worker is the same code path.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import ray
import torch

from cwa_dist.evaluate import perplexity
from cwa_dist.models import ModelBlob
from cwa_dist.sensitivity import (
    ShardScores,
    accumulate_gradients,
    check_gradients_finite,
    checkpoint_blocks,
    full_shards,
    prepare_gradients,
    score_shards,
)
from cwa_dist.statistics import ScoreStatistics
from cwa_dist.topk import merge


@dataclass
class WorkerReport:
    """What one worker returns after scoring."""

    scores: ShardScores
    loss: float  # this worker's share of the calibration mean NLL
    backward_s: float
    scoring_s: float
    peak_rss_bytes: int


class GradientWorker:
    """One rank of the gradient group. Methods are called by the driver in lockstep."""

    def __init__(self, blob: ModelBlob, device: str, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.model = blob.build(device)
        self.loss = 0.0
        self.backward_s = 0.0

    def baseline(self, chunks: list[torch.Tensor], batch_size: int) -> tuple[float, int]:
        p = perplexity(self.model, chunks, batch_size)
        return p.nll_sum, p.tokens

    def begin(self, scored: list[str], checkpointing: bool = False) -> None:
        if checkpointing:
            checkpoint_blocks(self.model)
        prepare_gradients(self.model, scored)
        self.loss, self.backward_s = 0.0, 0.0

    def backward(self, chunks: list[torch.Tensor], *, batch_size: int, total_tokens: int) -> int:
        """Accumulate the gradients of these chunks; returns how many chunks it took."""
        start = time.perf_counter()
        self.loss += accumulate_gradients(self.model, chunks, batch_size=batch_size, total_tokens=total_tokens)
        self.backward_s += time.perf_counter() - start
        return len(chunks)

    def score(self, *, scored: list[str], metrics: list[str], k: int) -> WorkerReport:
        start = time.perf_counter()
        check_gradients_finite(self.model)
        result = score_shards(full_shards(self.model, scored), metrics, k)
        return WorkerReport(
            scores=result,
            loss=self.loss,
            backward_s=self.backward_s,
            scoring_s=time.perf_counter() - start,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )


def merge_reports(reports: list[WorkerReport], k: int) -> ShardScores:
    """Exact global top-K and merged statistics from every worker's local results."""
    merged = ShardScores()
    for m in reports[0].scores.candidates:
        merged.candidates[m] = merge([r.scores.candidates[m] for r in reports], k)
    for m in reports[0].scores.statistics:
        stats = ScoreStatistics()
        for r in reports:
            stats.merge(r.scores.statistics[m])
        merged.statistics[m] = stats
    return merged


class GradientGroup:
    """N gradient workers as Ray actors (N = 1 until sharding lands)."""

    def __init__(self, blob_ref, *, num_workers: int, device: str, cpus_per_worker: int):
        remote = ray.remote(GradientWorker).options(
            num_cpus=cpus_per_worker, num_gpus=1 if device == "cuda" else 0, max_concurrency=1
        )
        self.workers = [remote.remote(blob_ref, device, cpus_per_worker) for _ in range(num_workers)]

    def call(self, method: str, *args, **kwargs) -> list:
        return ray.get([getattr(w, method).remote(*args, **kwargs) for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
