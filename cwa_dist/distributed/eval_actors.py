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

import ray
import torch

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


class EvalActor:
    def __init__(self, model: ModelRef, device: str, gpus: int, chunks: list[torch.Tensor], batch_size: int,
                 threads: int | None, replay_budget_bytes: int = 0, zero_shot: TaskRequest | None = None):
        if threads:
            torch.set_num_threads(threads)
        start = time.perf_counter()
        ckpt, config = model.open()
        self.model = load_replica(ckpt, config, dtype=model.torch_dtype, trust_remote_code=model.trust_remote_code,
                                  device=device, gpus=gpus)
        ckpt.close()
        self.load_s = time.perf_counter() - start
        self.zero_shot, self.baseline_tasks = zero_shot, None
        if zero_shot is not None:
            self.tokenizer = load_tokenizer(ckpt.path, trust_remote_code=model.trust_remote_code)
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
                "load_s": round(self.load_s, 3), "replay_blocks_kept": len(self.replay.kept),
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


class EvalPool:
    def __init__(self, model: ModelRef, chunks: list[torch.Tensor], *, num_actors: int, device: str,
                 gpus_per_actor: int, batch_size: int, replay_budget_bytes: int = 0,
                 zero_shot: TaskRequest | None = None):
        gpus = gpus_per_actor if device == "cuda" else 0
        remote = ray.remote(EvalActor).options(num_cpus=1, num_gpus=gpus)
        # On CPU each actor uses one core, so actors do not fight over threads.
        threads = None if device == "cuda" else 1
        chunks_ref = ray.put(chunks)  # once, shared by every actor (and every replacement)
        self._new_actor = lambda: remote.remote(model, device, gpus, chunks_ref, batch_size, threads,
                                                replay_budget_bytes, zero_shot)
        self.actors = [self._new_actor() for _ in range(num_actors)]

    def describe(self) -> list[tuple[str, Perplexity]]:
        return ray.get([a.describe.remote() for a in self.actors])

    def baseline_tasks(self) -> dict[str, TaskScores] | None:
        """The unperturbed model's zero-shot scores (every actor's are the same weights)."""
        return ray.get(self.actors[0].baseline_scores.remote())

    def super_weights(self, prompts: list[torch.Tensor], max_candidates: int) -> list[Candidate]:
        """Super-weight candidates, detected on one actor's replica (they all hold the same weights)."""
        return ray.get(self.actors[0].super_weights.remote(prompts, max_candidates))

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
        idle = list(self.actors)
        in_flight: dict = {}  # ref -> (actor, spec, tries, deadline)
        # A replacement loads the model and measures its baseline first (minutes for a large model):
        # it takes a spec, and its experiment's deadline starts, only once it has answered.
        starting: dict = {}  # ref of its first answer -> actor
        lost_while_loading = 0

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
                actor = starting.pop(ready[0])
                try:
                    ray.get(ready[0])
                except ray.exceptions.RayActorError as e:
                    lost_while_loading += 1
                    if lost_while_loading > max_retries + len(self.actors):
                        raise RuntimeError(
                            f"evaluation actors keep dying while they load the model ({last_line(e)})") from None
                    fresh = self._replace(actor)
                    starting[fresh.describe.remote()] = fresh
                    continue
                idle.append(actor)
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

    def _replace(self, dead) -> object:
        ray.kill(dead)  # make sure it is gone, whatever state it died in
        fresh = self._new_actor()
        self.actors[self.actors.index(dead)] = fresh
        return fresh

    def all_weights_intact(self) -> bool:
        return all(ray.get([a.all_weights_intact.remote() for a in self.actors]))

    def memory(self) -> list[dict]:
        return ray.get([a.memory.remote() for a in self.actors])

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
