"""The embedded Ray a run starts for itself: its workers run at the driver's priority, which
Ray's default (niceness 15) does not give them (README: *The embedded Ray*)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray  # each case starts a Ray of its own, in a fresh process

PROBE = """
import os, ray
from cwa_dist.distributed.runtime import start_ray, stop_ray
assert start_ray(None, verbose=False)
@ray.remote(num_cpus=1)
def niceness():
    return os.nice(0)
print("niceness", ray.get(niceness.remote()), os.nice(0))
stop_ray()
"""


def worker_and_driver_niceness(defaults: bool) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["CWA_DIST_RAY_DEFAULTS"] = "1" if defaults else "0"
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("niceness"))
    worker, driver = map(int, line.split()[1:])
    return worker, driver


def test_the_embedded_rays_workers_run_at_the_drivers_niceness_and_ray_defaults_do_not():
    worker, driver = worker_and_driver_niceness(defaults=False)
    assert worker == driver
    worker, driver = worker_and_driver_niceness(defaults=True)
    assert worker > driver  # Ray's own default, which the lean start overrides
