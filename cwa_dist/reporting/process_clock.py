"""Where a run's time goes: wall time per phase, and CPU time per phase and per kind of process.

A background thread reads the CPU time (user + system) of this process and every process below
it every `period_s`; each increase is charged to the phase running at that moment and to the
kind of process it came from (the driver, Ray's own daemons, gradient workers, evaluation
actors). With the embedded Ray every Ray process descends from the driver, so all of them are
seen; a run that joins a cluster sees its driver only. A process that exits between two reads
loses at most its last `period_s` of CPU. Measured, never derived: no Ray, no torch here.
"""

from __future__ import annotations

import os
import threading
import time

import psutil

# How a process is named in its command line (Ray sets its workers' titles to "ray::<Class>...").
KINDS = (
    ("ray::GradientWorker", "gradient worker"),
    ("ray::EvalActor", "evaluation actor"),
    ("ray::IDLE", "Ray worker (starting or idle)"),  # a worker process before it becomes an actor
    ("gcs_server", "Ray GCS"),
    ("raylet", "Ray raylet"),
    ("ray::DashboardAgent", "Ray dashboard agent"),
    ("ray::RuntimeEnvAgent", "Ray runtime-env agent"),
    ("log_monitor.py", "Ray log monitor"),
    ("dashboard/dashboard.py", "Ray dashboard"),
    ("monitor.py", "Ray autoscaler monitor"),
)
DRIVER = "driver"
_first_in_process = True  # a sweep runs several runs in one process: only the first paid for the imports


def process_kind(cmdline: str) -> str:
    for marker, kind in KINDS:
        if marker in cmdline:
            return kind
    return "other"


class ProcessClock:
    """Phases, in the order they ran: [{"phase", "wall_s", "cpu_s": {kind: seconds}}]."""

    def __init__(self, period_s: float = 0.5):
        self.period_s = period_s
        self.me = psutil.Process(os.getpid())
        self._lock = threading.Lock()
        self._seen: dict[tuple[int, float], float] = {}  # (pid, start time) → CPU seconds last read
        started = self.me.create_time()
        own = self.me.cpu_times()
        self._seen[(self.me.pid, started)] = own.user + own.system
        self.phases: list[dict] = []
        global _first_in_process
        if _first_in_process:
            # Imports and argument parsing ran before the clock existed: the process's own clock says how long.
            self.phases.append({"phase": "python start and imports", "wall_s": round(time.time() - started, 3),
                                "cpu_s": {DRIVER: round(own.user + own.system, 3)}})
            _first_in_process = False
        self._phase, self._since = "read input", time.perf_counter()
        self._cpu: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-clock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._read()

    def _read(self) -> None:
        """Charge every process's CPU since the last read to the current phase."""
        with self._lock:
            for proc in [self.me, *self._children()]:
                try:
                    with proc.oneshot():
                        key = (proc.pid, proc.create_time())
                        times = proc.cpu_times()
                        kind = DRIVER if proc.pid == self.me.pid else process_kind(" ".join(proc.cmdline()))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                now = times.user + times.system
                delta = now - self._seen.get(key, 0.0)
                self._seen[key] = now
                if delta > 0:
                    self._cpu[kind] = self._cpu.get(kind, 0.0) + delta

    def _children(self) -> list[psutil.Process]:
        try:
            return self.me.children(recursive=True)
        except psutil.Error:
            return []

    def mark(self, phase: str) -> None:
        """End the current phase and start `phase`."""
        self._read()
        with self._lock:
            now = time.perf_counter()
            self.phases.append({"phase": self._phase, "wall_s": round(now - self._since, 3),
                                "cpu_s": {k: round(v, 3) for k, v in sorted(self._cpu.items(), key=lambda kv: -kv[1])}})
            self._phase, self._since, self._cpu = phase, now, {}

    def stop(self) -> list[dict]:
        """End the last phase and the sampling (once); the phases, in order."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            self.mark("")
            self.phases = [p for p in self.phases if p["phase"]]
        return self.phases


def timeline_lines(phases: list[dict]) -> list[str]:
    """The timeline as console lines: wall and CPU seconds of each phase, the busiest processes."""
    lines = [f"{'phase':<28}{'wall s':>8}{'CPU s':>8}  CPU by process"]
    for p in phases:
        cpu = p["cpu_s"]
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(cpu.items())[:4] if v >= 0.05)
        lines.append(f"{p['phase']:<28}{p['wall_s']:>8.1f}{sum(cpu.values()):>8.1f}  {top}")
    return lines
