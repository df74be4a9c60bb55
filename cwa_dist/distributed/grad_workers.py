"""The gradient stage as a group of Ray workers forming one torch.distributed process group.

Each worker loads the model through a sharding backend (`backends/`), runs its share of the
calibration chunks in lockstep with the others, scores only the shards it owns and returns its
local top-K candidates and statistics. The driver merges them with `topk.merge`, which is exact
for any number of workers; one worker is the same code path. Placement, calls and the fail-fast
gather are the generic `WorkerGroup` (worker_group.py).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import ray
import torch

from cwa_dist.analysis.data import lockstep_batches, per_window_steps
from cwa_dist.analysis.devices import shared_visibility, to_cpu
from cwa_dist.analysis.evaluate import Perplexity, batches, predicted_tokens
from cwa_dist.analysis.metrics import FISHER, needed_inputs
from cwa_dist.analysis.sensitivity import (
    ShardScores,
    corrupt_weights_message,
    merge_scores,
    non_finite_tensors,
    values_at,
)
from cwa_dist.analysis.zero_shot import TaskRequest
from cwa_dist.distributed.backends import BACKENDS, ZeroSettings
from cwa_dist.distributed.eval_actors import Evaluator, KeptWorker
from cwa_dist.distributed.process_group import destroy_group, init_group, rendezvous_address
from cwa_dist.distributed.worker_group import WorkerGroup, placement_strategy
from cwa_dist.errors import UsageError
from cwa_dist.modeling.loading import ModelRef
from cwa_dist.reporting.memory import live_tensor_bytes, peak_device_bytes, peak_pinned_bytes, peak_rss_bytes


@dataclass
class WorkerReport:
    """What one worker returns after scoring."""

    rank: int
    node: str
    scores: ShardScores
    loss: float  # this rank's share of the calibration mean NLL
    backward_s: float  # forward and backward passes, scoring inside the final backward included
    scoring_s: float  # scoring and the local top-K, inside backward or after it
    scored_in_backward: int  # parameters scored inside the final backward (the rest after it)
    peak_rss_bytes: int
    local_param_numel: int  # parameter elements this rank holds at rest
    local_grad_numel: int  # gradient elements this rank holds
    peak_device_bytes: int  # peak GPU memory allocated by torch (0 on CPU)
    live_tensor_bytes: int  # bytes of the tensors this rank holds after scoring, measured
    peak_pinned_bytes: int = 0  # peak pinned host memory (offloaded buffers on a GPU rank; 0 on CPU)
    fold_scores: list[ShardScores] = field(default_factory=list)  # one per stability fold


PINNED_ROUNDING = "pinned_max_round_threshold_mb:64"


def exact_pinned_blocks() -> None:
    """Keep pinned host blocks over 64 MB at their size. Torch's pinned allocator rounds every
    block up to a power of two by default, which turns ZeRO-3's offloaded 34.5 GB gradient buffer
    of a 70B rank into 64 GiB. Set before CUDA starts in this process; an allocator configuration
    the user gave is kept and only extended."""
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        given = os.environ.get(name)
        if given:
            if "pinned_max_round_threshold_mb" not in given:
                os.environ[name] = f"{given},{PINNED_ROUNDING}"
            return
    os.environ["PYTORCH_ALLOC_CONF"] = PINNED_ROUNDING


class GradientWorker(Evaluator):
    """One rank. The driver calls its methods on all ranks together (collectives need that).
    A rank that holds the whole model (the `none` backend) can then `serve` as an evaluation actor."""

    def __init__(self, threads: int | None):
        exact_pinned_blocks()
        if threads:
            torch.set_num_threads(threads)
        self.node = f"{socket.gethostname()}:{os.getpid()}"

    def rendezvous(self) -> tuple[str, int]:
        return rendezvous_address()

    def where(self) -> str:
        """host:pid of this rank, for error messages and for tests that kill it."""
        return self.node

    def gpus(self) -> tuple[str, list[str]]:
        """(Ray node id, the ids of the GPUs Ray gave this rank)."""
        return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]

    def see_gpus(self, visible: str, local_index: int) -> str:
        """Show this rank every GPU of its node's ranks (before CUDA starts in this process) and
        compute on GPU `local_index` among them; returns what CUDA_VISIBLE_DEVICES now says."""
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
        self.local_index = local_index
        return os.environ["CUDA_VISIBLE_DEVICES"]

    def setup(self, model: ModelRef, *, rank: int, world_size: int, address: str, port: int, backend: str,
              device: str, settings: ZeroSettings) -> list[str]:
        """Join the process group and load this rank's part of the model; returns the names of
        the tensors this rank holds that are not finite (a corrupt checkpoint)."""
        self.rank, self.world_size = rank, world_size
        local_index = getattr(self, "local_index", 0)
        if device == "cuda":
            torch.cuda.set_device(local_index)  # its own GPU among those of its node's ranks
        init_group(rank=rank, world_size=world_size, address=address, port=port,
                   backend="nccl" if device == "cuda" else "gloo", local_rank=local_index)
        # Each rank reads its own partition from the checkpoint files on its node.
        self.backend = BACKENDS[backend]()
        self.backend.load(model, device=device, rank=rank, world_size=world_size, settings=settings,
                          local_index=local_index)
        self.loss = self.backward_s = 0.0
        return non_finite_tensors(self.backend.local_tensors())

    def nll(self, chunks: list[torch.Tensor], batch_size: int) -> tuple[float, int]:
        """Summed NLL and predicted tokens of these chunks (none: join the collectives only)."""
        if not chunks:
            self.backend.dummy(backward=False)
            return 0.0, 0
        total = sum(self.backend.nll_sum(ids, mask) for ids, mask in batches(chunks, batch_size))
        return total, predicted_tokens(chunks)

    def begin(self, scored: list[str], checkpointing: bool, inputs: frozenset[str] = frozenset(), *,
              metrics: list[str] | None = None, k: int = 0, keep_gradients: bool = True,
              fold_scales: list[float] | tuple = ()) -> None:
        """Start accumulating; `inputs` is what the metrics read besides gradient and weight. With
        `metrics`, the step marked final scores each parameter inside its backward (and frees its
        gradient unless `keep_gradients`); without, `score` scores everything afterwards.
        `fold_scales`: N / N_f of each stability fold, which is then scored on its own as well."""
        self.backend.prepare(scored, checkpointing, inputs, metrics=metrics, k=k, keep_gradients=keep_gradients,
                             fold_scales=fold_scales)
        self.loss = self.backward_s = 0.0

    def backward(self, chunks: list[torch.Tensor], *, total_tokens: int, window_scale: float | None = None,
                 final: bool = False, fold: int | None = None) -> None:
        """One forward/backward over these chunks as one batch, its NLL divided by total_tokens.
        In per-window mode (the Fisher) one rank has the window and `window_scale` is N / n_c.
        `final`: the calibration pass's last step, every gradient complete once it is done.
        `fold`: the stability fold all of this step's windows (on every rank) belong to."""
        start = time.perf_counter()
        self.backend.step_start(final, fold)
        if chunks:
            ((ids, mask),) = batches(chunks, len(chunks))
            self.loss += self.backend.forward_backward(ids, mask, total_tokens, window_scale)
        else:
            self.backend.dummy(backward=True)
        self.backend.step_end(window_scale)
        self.backward_s += time.perf_counter() - start

    def score(self, *, scored: list[str], metrics: list[str], k: int) -> WorkerReport:
        """Each metric's local top-K: what the final backward scored, plus whatever it did not."""
        early = self.backend.scorer
        in_backward = len(early.done) if early is not None else 0
        scorer = self.backend.finish_scoring(metrics, k)
        params, grads = self.backend.local_numel()
        return to_cpu(WorkerReport(
            rank=self.rank,
            node=self.node,
            scores=scorer.result(),
            loss=self.loss,
            backward_s=self.backward_s,
            scoring_s=scorer.seconds,
            scored_in_backward=in_backward,
            peak_rss_bytes=peak_rss_bytes(),
            local_param_numel=params,
            local_grad_numel=grads,
            peak_device_bytes=peak_device_bytes(),
            live_tensor_bytes=live_tensor_bytes("cuda" if torch.cuda.is_available() else "cpu"),
            peak_pinned_bytes=peak_pinned_bytes(),
            fold_scores=[s.result() for s in self.backend.fold_scorers],
        ))  # to_cpu: a driver without GPUs must be able to unpickle it

    def values_at(self, wanted: dict[str, torch.Tensor],
                  fold: int | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
        backend = self.backend
        norms = backend.fold_norms[fold] if fold is not None and backend.fold_norms else backend.feature_norms
        return to_cpu(values_at(backend.shards(list(wanted), fold), wanted, norms))

    def teardown(self) -> None:
        self.backend.teardown()
        destroy_group()

    def serve(self, model: ModelRef, chunks: list[torch.Tensor], batch_size: int, threads: int | None,
              replay_budget_bytes: int = 0, zero_shot: TaskRequest | None = None) -> None:
        """Become an evaluation actor on the replica this rank already holds, after `teardown`: the
        same model a fresh actor would load from the same files, without a second process or load."""
        if not hasattr(self.backend, "evaluation_model"):
            raise RuntimeError(f"the {self.backend.name} backend holds a shard of the model, not a replica to evaluate")
        net = self.backend.evaluation_model()
        if threads:  # an actor's thread count, which its perplexities are bit-identical at
            torch.set_num_threads(threads)
        self._evaluate(net, model.local_dir() if zero_shot is not None else None, chunks, batch_size, 0.0,
                       replay_budget_bytes, zero_shot, model.trust_remote_code, from_gradient_worker=True)


@dataclass
class SensitivityResult:
    """What the gradient stage returns to the driver."""

    baseline: Perplexity | None  # of the evaluation chunks, before any perturbation (None: not measured here)
    merged: ShardScores  # the exact global top-K of each metric, and merged statistics
    reports: list[WorkerReport]  # one per rank, in rank order
    folds: list[ShardScores] = field(default_factory=list)  # the same for each stability fold

    @property
    def calibration_loss(self) -> float:
        """The token-weighted mean NLL over the calibration chunks (each rank returns its share)."""
        return sum(r.loss for r in self.reports)


def merge_reports(reports: list[WorkerReport], k: int) -> ShardScores:
    """Exact global top-K and merged statistics from every rank's local results."""
    return merge_scores([r.scores for r in reports], k)


def merge_folds(reports: list[WorkerReport], k: int) -> list[ShardScores]:
    """The same for each stability fold."""
    return [merge_scores([r.fold_scores[f] for r in reports], k) for f in range(len(reports[0].fold_scores))]


class GradientGroup(WorkerGroup):
    """N gradient workers as Ray actors in one placement group, with one process group."""

    def __init__(self, model: ModelRef, *, num_workers: int, backend: str, device: str, cpus_per_worker: int,
                 gpus_per_worker: int, settings: ZeroSettings, autoscaling: bool = False,
                 placement_timeout_s: float = 600.0, call_timeout_s: float | None = None,
                 setup_timeout_s: float | None = None, on_wait: Callable[[str], None] = lambda _: None,
                 node_gpus: int | None = None, serve_after: bool = False):
        """`call_timeout_s` bounds each stage call (--stage-timeout-s); loading the model is bounded by
        `setup_timeout_s`, which defaults to it. `serve_after`: the one worker of the `none` backend on
        CPU will be handed over (`hand_over`) to serve as an evaluation actor; it claims one CPU of its
        bundle, so that the pool's next actors fit in the rest (it computes on all of them until then)."""
        if backend == "none" and num_workers != 1:
            raise UsageError("--shard-backend none runs a single worker; use --shard-backend zero3 for more")
        if serve_after and (backend != "none" or device != "cpu"):
            raise ValueError("only the none backend's worker on CPU holds a replica an evaluation actor can use")
        bundle = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        super().__init__(GradientWorker, (None if device == "cuda" else cpus_per_worker,), num_workers=num_workers,
                         bundle=bundle, strategy=placement_strategy(num_workers, gpus_per_worker, node_gpus),
                         autoscaling=autoscaling, placement_timeout_s=placement_timeout_s,
                         call_timeout_s=call_timeout_s, on_wait=on_wait, actor_cpus=1 if serve_after else None)
        if gpus_per_worker:
            self.visible_gpus = self.share_gpus()
        address, port = self._gather([self.workers[0].rendezvous.remote()])[0]
        bad = self._gather([
            w.setup.remote(model, rank=i, world_size=num_workers, address=address, port=port,
                           backend=backend, device=device, settings=settings)
            for i, w in enumerate(self.workers)
        ], timeout_s=setup_timeout_s)
        bad = sorted({name for names in bad for name in names})
        if bad:
            self.shutdown(graceful=False)
            raise UsageError(corrupt_weights_message(bad))

    def hand_over(self) -> KeptWorker:
        """End the stage (the process group left) but keep the worker and its bundle, for the
        evaluation pool; the group is empty afterwards."""
        self.call("teardown")
        (worker,) = self.workers
        kept = KeptWorker(worker, self.pg, bundle_cpus=int(self.bundle["CPU"]))
        self.workers = []
        return kept

    def share_gpus(self) -> list[str]:
        """Every rank sees the GPUs of all ranks on its node (see devices.shared_visibility);
        returns each rank's CUDA_VISIBLE_DEVICES."""
        assigned = self._gather([w.gpus.remote() for w in self.workers])
        return self._gather([w.see_gpus.remote(visible, index)
                             for w, (visible, index) in zip(self.workers, shared_visibility(assigned))])

    def sensitivity(self, *, evaluation: list[torch.Tensor], calibration: list[torch.Tensor], scored: list[str],
                    metrics: list[str], k: int, batch_size: int, checkpointing: bool, keep_gradients: bool = False,
                    folds: Sequence[Sequence[int]] = (),
                    on_baseline: Callable[[Perplexity], None] = lambda _: None,
                    on_step: Callable[[int], None] = lambda _: None) -> SensitivityResult:
        """The whole stage: baseline perplexity of `evaluation` (None when it is empty: the
        evaluation actors measure it), the gradient of the mean NLL over `calibration` (every rank
        a share, in lockstep), each rank's scoring of what it owns, and the exact merge.
        `on_step` gets the number of chunks each lockstep step processed.
        Gradients are freed as they are scored unless `keep_gradients` (for `values_at`).
        `folds` (disjoint lists of calibration window positions, covering them all) scores each
        fold's own gradient too; the merged top-K of each is in the result's `folds`."""
        baseline = None
        if evaluation:
            nll, tokens = 0.0, 0
            for step in lockstep_batches(evaluation, self.world_size, batch_size):
                for n, t in self.each("nll", step, batch_size=batch_size):
                    nll, tokens = nll + n, tokens + t
            baseline = Perplexity(nll, tokens)
            on_baseline(baseline)
        reports = self.score_calibration(calibration, scored=scored, metrics=metrics, k=k, batch_size=batch_size,
                                         checkpointing=checkpointing, keep_gradients=keep_gradients, folds=folds,
                                         on_step=on_step)
        return SensitivityResult(baseline=baseline, merged=merge_reports(reports, k), reports=reports,
                                 folds=merge_folds(reports, k))

    def score_calibration(self, calibration: list[torch.Tensor], *, scored: list[str], metrics: list[str], k: int,
                          batch_size: int, checkpointing: bool = False, keep_gradients: bool = False,
                          folds: Sequence[Sequence[int]] = (),
                          on_step: Callable[[int], None] = lambda _: None) -> list[WorkerReport]:
        """The gradient of the mean NLL over `calibration` (every rank a share, in lockstep) and each
        rank's scoring of what it owns, inside the final step's backward: one report per rank.
        With `folds`, the steps go fold after fold, so that no step mixes two folds' windows."""
        total_tokens = predicted_tokens(calibration)
        inputs = needed_inputs(metrics)
        parts = [[calibration[i] for i in fold] for fold in folds] or [calibration]
        fold_scales = [total_tokens / predicted_tokens(p) for p in parts] if folds else []
        # Each parameter is scored inside the final step's backward, as soon as its gradient is
        # complete, and its gradient freed unless `keep_gradients` (values_at reads them later).
        self.call("begin", scored, checkpointing, inputs, metrics=metrics, k=k, keep_gradients=keep_gradients,
                  fold_scales=fold_scales)
        steps = []  # (each rank's chunks, the step's options, how many chunks it processes)
        for f, part in enumerate(parts):
            fold = f if folds else None
            if FISHER in inputs:
                # The Fisher squares each window's own gradient, so a step is one window (on one rank;
                # the reduce-scatter adds the others' zeros), and the ranks no longer split the windows.
                steps += [(step, {"window_scale": scale, "fold": fold}, 1)
                          for step, scale in per_window_steps(part, self.world_size, total_tokens)]
            else:
                steps += [(step, {"fold": fold}, sum(len(s) for s in step))
                          for step in lockstep_batches(part, self.world_size, batch_size)]
        for i, (step, options, chunks) in enumerate(steps):
            self.each("backward", step, total_tokens=total_tokens, final=i == len(steps) - 1, **options)
            on_step(chunks)
        return self.call("score", scored=scored, metrics=metrics, k=k)

    def values_at(self, wanted: dict[str, torch.Tensor],
                  fold: int | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
        """Gradient, weight, Fisher and input norm of chosen elements, each from the rank that owns it,
        after `sensitivity` (of one stability fold, with `fold`)."""
        merged: dict[str, list] = {}
        for part in self.call("values_at", wanted, fold):
            for name, values in part.items():
                merged.setdefault(name, []).append(values)
        out = {}
        for name, parts in merged.items():
            columns = [torch.cat(p) for p in zip(*parts)]  # index, grad, weight, fisher, feature norm
            keep = torch.from_numpy(np.unique(columns[0].numpy(), return_index=True)[1])  # each element once
            out[name] = tuple(c[keep] for c in columns)
        return out
