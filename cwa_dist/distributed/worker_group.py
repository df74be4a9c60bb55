"""A group of Ray actors that work in lockstep, one per bundle of one placement group: the
mechanics the gradient stage needs and nothing of its logic. Placement (refused at once when the
cluster can never hold it, waited for with progress where an autoscaler may grow it), one call per
member, and a fail-fast gather: members wait on each other inside collectives, so one that dies or
hangs would hold the others until the process group times out; the group is killed instead, and
the member named.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cwa_dist.errors import UsageError, last_line


class GradientWorkerError(RuntimeError):
    """A rank died or stopped answering; the group was shut down."""


def _check_capacity(bundle: dict, num_workers: int, autoscaling: bool) -> None:
    """Refuse at once what the cluster can never hold, instead of waiting for it forever.
    An autoscaling cluster may still grow, so there the placement timeout decides."""
    if autoscaling:
        return
    total = ray.cluster_resources()
    for kind, amount in bundle.items():
        if amount * num_workers > total.get(kind, 0):
            raise UsageError(
                f"{num_workers} gradient worker(s) need {amount * num_workers:g} {kind} in all, but the Ray "
                f"cluster has {total.get(kind, 0):g}; lower --num-workers or --{kind.lower()}s-per-worker"
            )

def placement_strategy(num_workers: int, gpus_per_worker: int, node_gpus: int | None) -> str:
    """STRICT_PACK (every rank on one node, their collectives over its own links) where the ranks'
    GPUs fit one GPU node; PACK, which fills nodes one after the other, where they need more."""
    if gpus_per_worker and node_gpus and num_workers * gpus_per_worker <= node_gpus:
        return "STRICT_PACK"
    return "PACK"

def _wait_placed(pg, what: str, timeout_s: float, on_wait: Callable[[str], None], every_s: float = 30.0) -> None:
    """Wait for the placement group, saying every `every_s` what it waits for (an autoscaler may be
    starting nodes); past `timeout_s`, remove it and refuse."""
    start = time.monotonic()
    while True:
        left = timeout_s - (time.monotonic() - start)
        ready, _ = ray.wait([pg.ready()], timeout=max(0.0, min(every_s, left)))
        if ready:
            return
        waited = time.monotonic() - start
        if waited >= timeout_s:
            remove_placement_group(pg)
            raise UsageError(
                f"the Ray cluster cannot place {what} within {timeout_s:.0f}s (it has {ray.cluster_resources()}); "
                "lower --num-workers or the resources per worker, grow the cluster, or wait longer with "
                "--placement-timeout-s")
        on_wait(f"⏳ waiting {waited:.0f}s of {timeout_s:.0f}s for the cluster to place {what} "
                f"(free now: {ray.available_resources()})")


class WorkerGroup:
    """Members created from `actor_cls(*actor_args)`, one per bundle, placed together; each must
    answer `where()` (its host:pid) and `teardown()`."""

    def __init__(self, actor_cls, actor_args: tuple, *, num_workers: int, bundle: dict, strategy: str,
                 autoscaling: bool, placement_timeout_s: float, call_timeout_s: float | None,
                 on_wait: Callable[[str], None], actor_cpus: int | None = None):
        """`actor_cpus`: the CPUs each member claims of its bundle (all of them unless given); the
        rest stays reserved in the bundle for actors placed there later."""
        self.call_timeout_s, self.bundle = call_timeout_s, bundle
        _check_capacity(bundle, num_workers, autoscaling)
        self.pg = placement_group([bundle] * num_workers, strategy=strategy)
        _wait_placed(self.pg, f"{num_workers} gradient worker(s) of {bundle}", placement_timeout_s, on_wait)
        remote = ray.remote(actor_cls)
        self.workers = [
            remote.options(
                num_cpus=bundle.get("CPU", 0) if actor_cpus is None else actor_cpus,
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(*actor_args)
            for i in range(num_workers)
        ]
        self.nodes = ["?"] * num_workers  # host:pid of each rank, once they answer
        # A process start (imports, a busy node) is part of placement, not of the stage: the stage's
        # deadline starts once every rank has answered.
        self.nodes = self._gather([w.where.remote() for w in self.workers], timeout_s=placement_timeout_s,
                                  flag="--placement-timeout-s")

    def _gather(self, refs: list, timeout_s: float | None = None, flag: str = "--stage-timeout-s") -> list:
        """Results of one call per rank. Ranks wait on each other inside collectives, so when one
        dies the others would hang until the process group times out: fail fast instead, kill the
        whole group, and name the rank that died. `timeout_s` defaults to the stage's call timeout."""
        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        pending = list(refs)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            if not ready:  # alive but stuck: a rank that never answers would hold the others forever
                stuck = [refs.index(r) for r in pending]
                self.shutdown(graceful=False)
                raise GradientWorkerError(
                    f"gradient worker rank(s) {', '.join(map(str, stuck))} on "
                    f"{', '.join(self.nodes[r] for r in stuck)} did not answer within {timeout_s:g}s "
                    f"({flag}; one stuck rank holds the others in their collectives); the group was shut "
                    "down. Rerun with --resume to restart the sensitivity stage"
                )
            (done,) = ready
            try:
                ray.get(done)
            except ray.exceptions.RayActorError as e:
                rank = refs.index(done) if len(refs) > 1 else 0
                self.shutdown(graceful=False)
                raise GradientWorkerError(
                    f"gradient worker rank {rank} on {self.nodes[rank]} died ({last_line(e, 200)}); the group was shut "
                    "down. Rerun with --resume to restart the sensitivity stage"
                ) from None
            except ray.exceptions.RayTaskError as e:
                self.shutdown(graceful=False)
                if isinstance(e.cause, UsageError):  # bad input seen by a worker: one line, as on the driver
                    raise UsageError(str(e.cause)) from None
                raise e.as_instanceof_cause() from None
        return ray.get(refs)

    def each(self, method: str, per_rank_args: list, **kwargs) -> list:
        """Call `method` on every rank with its own first argument, together."""
        return self._gather([getattr(w, method).remote(a, **kwargs) for w, a in zip(self.workers, per_rank_args)])

    def call(self, method: str, *args, **kwargs) -> list:
        return self._gather([getattr(w, method).remote(*args, **kwargs) for w in self.workers])

    def shutdown(self, graceful: bool = True) -> None:
        if graceful:
            try:
                ray.get([w.teardown.remote() for w in self.workers], timeout=60)
            except Exception:
                pass  # the actors are killed next either way
        for w in self.workers:
            ray.kill(w)
        if self.workers:
            remove_placement_group(self.pg)
        self.workers = []

    @property
    def world_size(self) -> int:
        return len(self.workers)
