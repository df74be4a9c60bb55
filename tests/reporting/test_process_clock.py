"""The run's timeline: wall time per phase, CPU time per phase and kind of process, measured by
reading the processes themselves (a real child process burns CPU; the clock must see it)."""

import subprocess
import sys
import time

import pytest

from cwa_dist.reporting.process_clock import DRIVER, ProcessClock, process_kind, timeline_lines

BURN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


def _burn_here(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_kinds_follow_the_process_titles_ray_sets():
    assert process_kind("ray::GradientWorker.sensitivity") == "gradient worker"
    assert process_kind("ray::EvalActor.run") == "evaluation actor"
    assert process_kind("ray::IDLE") == "Ray worker (starting or idle)"
    assert process_kind("/x/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/s") == "Ray raylet"
    assert process_kind("/x/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/l") == "Ray GCS"
    assert process_kind("ray::DashboardAgent") == "Ray dashboard agent"
    assert process_kind("ray::RuntimeEnvAgent") == "Ray runtime-env agent"
    assert process_kind("python -m something_else") == "other"


def test_cpu_is_charged_to_the_phase_and_the_process_that_spent_it():
    clock = ProcessClock(period_s=0.05)
    clock.mark("child burns")
    child = subprocess.Popen([sys.executable, "-c", BURN.format(s=1.0)])
    child.wait()  # it exits: the clock keeps what it read up to its last sample
    clock.mark("driver burns")
    _burn_here(0.8)
    clock.mark("sleep")
    time.sleep(0.5)
    phases = {p["phase"]: p for p in clock.stop()}
    # A process that exits loses at most its last sampling period (0.05 s) of CPU, plus start-up.
    assert phases["child burns"]["cpu_s"]["other"] == pytest.approx(1.0, abs=0.25)
    assert phases["driver burns"]["cpu_s"][DRIVER] == pytest.approx(0.8, abs=0.15)
    assert "other" not in phases["driver burns"]["cpu_s"]
    assert phases["sleep"]["wall_s"] == pytest.approx(0.5, abs=0.15)
    assert sum(phases["sleep"]["cpu_s"].values()) < 0.2
    assert list(phases)[0] == "python start and imports" or "read input" in phases
    assert clock.stop() == list(phases.values())  # stopping twice changes nothing
    lines = timeline_lines(list(phases.values()))
    assert lines[0].startswith("phase") and any(line.startswith("child burns") for line in lines)
