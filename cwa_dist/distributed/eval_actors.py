"""Perturbation experiments on a pool of Ray actors.

Each actor builds one model replica from the checkpoint files on its node (empty, then filled one
tensor at a time; no weights travel through Ray), measures the baseline once, then runs specs one
at a time: save the touched values, apply, measure perplexity (and, when asked, zero-shot task
accuracy), restore, and check the restore bit for bit. Idle actors take the next spec from the
driver's queue.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import ray
import torch
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cwa_dist.analysis.devices import to_cpu
from cwa_dist.analysis.evaluate import Perplexity, perplexity
from cwa_dist.analysis.experiments import ABLATION, ExperimentResult
from cwa_dist.analysis.perturb import PerturbationSpec, apply, fingerprint, restore, restored_exactly
from cwa_dist.analysis.quantize import QuantizationSpec, quantize_in_place, stored_in_out
from cwa_dist.analysis.replay import BlockReplay
from cwa_dist.analysis.superweights import Candidate, detect
from cwa_dist.analysis.zero_shot import TaskRequest, TaskScores, evaluate_tasks, task_manager
from cwa_dist.errors import last_line
from cwa_dist.modeling.loading import ModelRef, load_replica, load_tokenizer
from cwa_dist.reporting.memory import peak_device_bytes, peak_rss_bytes


class Evaluator:
    """The experiments on a model held in this process: its baseline (the replay's first pass),
    then one spec at a time. An evaluation actor loads its own replica; a gradient worker that
    holds a whole one hands it here (`GradientWorker.serve`) and serves as an actor too."""

    def _evaluate(self, model: torch.nn.Module, tokenizer_dir, chunks: list[torch.Tensor], batch_size: int,
                  load_s: float, replay_budget_bytes: int, zero_shot: TaskRequest | None, trust_remote_code: bool,
                  from_gradient_worker: bool = False):
        self.model, self.load_s, self.from_gradient_worker = model, load_s, from_gradient_worker
        self.zero_shot, self.baseline_tasks = zero_shot, None
        if zero_shot is not None:
            self.tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
            self.tasks = task_manager(zero_shot.include)  # indexed once per actor
            self.baseline_tasks = self._tasks()
        self.params = dict(self.model.named_parameters())
        self.stored_in_out = stored_in_out(self.model)  # quantized along their first dimension
        self.chunks, self.batch_size = chunks, batch_size
        self.fingerprints = {n: fingerprint(p) for n, p in self.params.items()}
        # The baseline pass keeps block outputs, so each experiment recomputes from its first changed block.
        self.replay = BlockReplay(self.model, replay_budget_bytes)
        self.baseline = self.replay.capture(lambda: perplexity(self.model, chunks, batch_size), chunks, batch_size)
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def describe(self) -> tuple[str, Perplexity]:
        return to_cpu((self.name, self.baseline))

    def baseline_scores(self) -> dict[str, TaskScores] | None:
        return self.baseline_tasks

    def _tasks(self) -> dict[str, TaskScores]:
        req = self.zero_shot
        return evaluate_tasks(self.model, self.tokenizer, req.tasks, limit=req.limit, include=req.include,
                              batch_size=req.batch_size, manager=self.tasks)

    def super_weights(self, prompts: list[torch.Tensor], max_candidates: int) -> list[Candidate]:
        return to_cpu(detect(self.model, prompts, batch_size=self.batch_size, max_candidates=max_candidates))

    def memory(self) -> dict:
        """This actor's measured peaks and load time, for the manifest."""
        return {"actor": self.name, "peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device_bytes(),
                "load_s": round(self.load_s, 3), "from_gradient_worker": self.from_gradient_worker,
                "replay_blocks_kept": len(self.replay.kept),
                "replay_bytes": self.replay.kept_bytes}

    def run(self, spec: PerturbationSpec, with_tasks: bool = True) -> ExperimentResult:
        start = time.perf_counter()
        if isinstance(spec, QuantizationSpec):
            saved = quantize_in_place(self.params, spec, self.stored_in_out)
        else:
            saved = apply(self.params, spec.targets, spec.mode, spec.options)
        tasks = None
        try:
            with self.replay.from_block(self.replay.first_block(saved.values)):
                perturbed = perplexity(self.model, self.chunks, self.batch_size)
            if self.zero_shot is not None and with_tasks:
                tasks = self._tasks()  # a full forward per example: replay keeps only the perplexity windows
        finally:
            restore(self.params, saved)
        # Checked where the weights live and only where they changed: apply and restore write at
        # the saved indices and nowhere else (hashing each touched tensor on the host instead cost
        # minutes per experiment at 70B); the whole model is fingerprinted once, at the end.
        exact = restored_exactly(self.params, saved)
        return to_cpu(ExperimentResult(
            key=spec.key,
            perturbed=perturbed,
            baseline=self.baseline,
            weights_masked=len(spec.targets),  # the kept weights, for a quantization
            wall_s=time.perf_counter() - start,
            restored_exact=exact,
            actor=self.name,
            tasks=tasks,
            baseline_tasks=self.baseline_tasks if tasks is not None else None,
        ))

    def all_weights_intact(self) -> bool:
        """Every parameter still has the bytes it was built with."""
        return all(fingerprint(p) == self.fingerprints[n] for n, p in self.params.items())


class EvalActor(Evaluator):
    """An evaluation actor: its own replica, built from the checkpoint files on its node."""

    def __init__(self, model: ModelRef, device: str, gpus: int, chunks: list[torch.Tensor], batch_size: int,
                 threads: int | None, replay_budget_bytes: int = 0, zero_shot: TaskRequest | None = None):
        if threads:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        ckpt, config = model.open()
        net = load_replica(ckpt, config, dtype=model.torch_dtype, trust_remote_code=model.trust_remote_code,
                           device=device, gpus=gpus)
        ckpt.close()
        self._evaluate(net, ckpt.path, chunks, batch_size, time.perf_counter() - start, replay_budget_bytes,
                       zero_shot, model.trust_remote_code)


@dataclass
class KeptWorker:
    """A gradient worker kept after its stage to serve as the first evaluation actor, with the
    placement-group bundle it ran in: it claims one CPU of the bundle, and the pool places other
    actors in the rest."""

    actor: object  # its Ray actor handle (a GradientWorker)
    pg: PlacementGroup
    bundle_cpus: int

    def strategy(self) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0)

    def release(self) -> None:
        """Unused after all: the worker and its bundle go."""
        ray.kill(self.actor)
        remove_placement_group(self.pg)


class EvalPool:
    def __init__(self, model: ModelRef, chunks: list[torch.Tensor], *, num_actors: int, device: str,
                 gpus_per_actor: int, batch_size: int, replay_budget_bytes: int = 0,
                 zero_shot: TaskRequest | None = None, kept: KeptWorker | None = None):
        """`kept`: a gradient worker holding a whole replica, which becomes the first actor (no
        second process start or load); the next actors go in what its bundle has left, the rest
        (and a replacement, where the one it replaces was) outside it."""
        gpus = gpus_per_actor if device == "cuda" else 0
        remote = ray.remote(EvalActor)
        # On CPU each actor uses one core, so actors do not fight over threads.
        threads = None if device == "cuda" else 1
        chunks_ref = ray.put(chunks)  # once, shared by every actor (and every replacement)

        def new_actor(in_bundle: bool):
            placed = {"scheduling_strategy": kept.strategy()} if in_bundle else {}
            return remote.options(num_cpus=1, num_gpus=gpus, **placed).remote(
                model, device, gpus, chunks_ref, batch_size, threads, replay_budget_bytes, zero_shot)

        self._new_actor, self._pg = new_actor, kept.pg if kept else None
        self._serving = []  # the kept worker's `serve`, whose error describe() reports
        if kept is not None:
            self._serving = [kept.actor.serve.remote(model, chunks_ref, batch_size, threads, replay_budget_bytes,
                                                     zero_shot)]
        # Where each actor runs: True in the kept worker's bundle (which the worker itself is in).
        self._in_bundle = [kept is not None and i < kept.bundle_cpus for i in range(num_actors)]
        self.actors = [kept.actor] if kept is not None else []
        self.actors += [new_actor(b) for b in self._in_bundle[len(self.actors):]]
        # An actor is starting (loading, measuring its baseline) until its first answer; then idle.
        self._starting = {a.describe.remote(): a for a in self.actors}  # ref of its first answer -> actor
        self._idle: list = []
        self._lost_while_loading = 0
        self.baselines: dict[str, Perplexity] = {}  # every actor's baseline, by actor name, as it answers

    def describe(self) -> list[tuple[str, Perplexity]]:
        """Every actor's name and baseline, once all have loaded."""
        ray.get(self._serving)
        return ray.get([a.describe.remote() for a in self.actors])

    def first_ready(self) -> tuple[str, Perplexity]:
        """The name and baseline of the first actor to have loaded and measured it. The others join
        `run` as they get there: the experiments need not wait for the slowest start."""
        ray.get(self._serving)
        while not self._idle:
            ready, _ = ray.wait(list(self._starting), num_returns=1)
            self._answered(ready[0], len(self.actors))
        name = next(n for n in self.baselines)
        return name, self.baselines[name]

    def _answered(self, ref, max_lost: int) -> None:
        """A starting actor's first answer: it is idle now, its baseline kept. One that died while
        loading is replaced (more than `max_lost` such deaths: refused)."""
        actor = self._starting.pop(ref)
        try:
            name, baseline = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._lost_while_loading += 1
            if self._lost_while_loading > max_lost:
                raise RuntimeError(
                    f"evaluation actors keep dying while they load the model ({last_line(e)})") from None
            fresh = self._replace(actor)
            self._starting[fresh.describe.remote()] = fresh
            return
        self.baselines[name] = baseline
        self._idle.append(actor)

    def _ready_actor(self):
        """An actor that has loaded (the first to, if none has yet)."""
        if not self._idle:
            self.first_ready()
        return self._idle[0]

    def baseline_tasks(self) -> dict[str, TaskScores] | None:
        """The unperturbed model's zero-shot scores (every actor's are the same weights)."""
        return ray.get(self._ready_actor().baseline_scores.remote())

    def super_weights(self, prompts: list[torch.Tensor], max_candidates: int) -> list[Candidate]:
        """Super-weight candidates, detected on one actor's replica (they all hold the same weights)."""
        return ray.get(self._ready_actor().super_weights.remote(prompts, max_candidates))

    def run(self, specs: list[PerturbationSpec], *, on_result: Callable[[ExperimentResult], None],
            on_failure: Callable[[PerturbationSpec, str], None], max_retries: int,
            timeout_s: float | None = None) -> None:
        """Run every spec once, handing each result to `on_result` as it arrives.

        When an actor dies (its process killed, its node lost), or has not answered within
        `timeout_s` (alive but stuck: it is killed), a new actor takes its place and the spec goes
        back in the queue, up to `max_retries` times; then, or when the experiment itself raises,
        `on_failure` records it. Every spec ends in exactly one of the two callbacks.
        """
        queue = deque((spec, 0) for spec in specs)
        idle, starting = self._idle, self._starting  # actors that loaded; actors still loading
        in_flight: dict = {}  # ref -> (actor, spec, tries, deadline)
        # A starting actor (a replacement too) loads the model and measures its baseline first
        # (minutes for a large model): it takes a spec, and its experiment's deadline starts, only
        # once it has answered.

        def retry(actor, spec, tries, what: str, detail: str) -> None:
            fresh = self._replace(actor)
            starting[fresh.describe.remote()] = fresh
            if tries < max_retries:
                queue.append((spec, tries + 1))
            else:
                on_failure(spec, f"evaluation actor {what} {tries + 1} time(s): {detail}")

        while queue or in_flight:
            while idle and queue:
                actor = idle.pop()
                spec, tries = queue.popleft()
                deadline = None if timeout_s is None else time.monotonic() + timeout_s
                # The ablation study's many single weights are measured by perplexity alone.
                in_flight[actor.run.remote(spec, spec.method != ABLATION)] = (actor, spec, tries, deadline)
            deadlines = [d for *_, d in in_flight.values() if d is not None]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready, _ = ray.wait([*in_flight, *starting], num_returns=1, timeout=wait_s)
            if ready and ready[0] in starting:
                self._answered(ready[0], max_retries + len(self.actors))
                continue
            if not ready:
                now = time.monotonic()
                for ref, (actor, spec, tries, deadline) in list(in_flight.items()):
                    if deadline is not None and deadline <= now:
                        del in_flight[ref]
                        retry(actor, spec, tries, "timed out",
                              f"no answer within {timeout_s:g}s (--experiment-timeout-s)")
                continue
            done = ready[0]
            actor, spec, tries, _ = in_flight.pop(done)
            try:
                result = ray.get(done)
            except ray.exceptions.RayActorError as e:
                retry(actor, spec, tries, "died", last_line(e))
                continue
            except ray.exceptions.RayTaskError as e:
                idle.append(actor)
                on_failure(spec, last_line(e.cause or e))
                continue
            idle.append(actor)
            on_result(result)
        self._stop_starting()

    def _stop_starting(self) -> None:
        """Stop the actors still loading once every experiment is done (what follows would only
        wait for them), as long as one that loaded remains."""
        for ref, actor in list(self._starting.items()):
            if not self._idle:
                return
            del self._starting[ref]
            ray.kill(actor)
            i = self.actors.index(actor)
            del self.actors[i], self._in_bundle[i]

    def _replace(self, dead) -> object:
        ray.kill(dead)  # make sure it is gone, whatever state it died in
        i = self.actors.index(dead)
        self.actors[i] = fresh = self._new_actor(self._in_bundle[i])
        return fresh

    def all_weights_intact(self) -> bool:
        return all(ray.get([a.all_weights_intact.remote() for a in self.actors]))

    def memory(self) -> list[dict]:
        return ray.get([a.memory.remote() for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self._pg is not None:  # the kept worker's bundle
            remove_placement_group(self._pg)
            self._pg = None
