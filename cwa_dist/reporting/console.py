"""The console: one Reporter every stage prints through, stage by stage, in the original tool's layout."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from tqdm import tqdm

RULE = "=" * 60
THIN = "-" * 40


class Reporter:
    def __init__(self, verbose: bool, stream=None):
        self.verbose = verbose
        self.stream = stream or sys.stdout
        self.clock = None  # a ProcessClock, when the run keeps a timeline

    def phase(self, name: str) -> None:
        """Start phase `name` of the timeline (ending the one before)."""
        if self.clock is not None:
            self.clock.mark(name)

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def detail(self, text: str) -> None:
        if self.verbose:
            self.line(text)

    def rule(self) -> None:
        self.line(RULE)

    def heading(self, title: str) -> None:
        self.line()
        self.line(title)
        self.line(THIN)

    @contextmanager
    def stage(self, title: str, timings: dict[str, float], key: str):
        """Print a stage heading; record how long the stage took under `key`."""
        self.heading(title)
        self.phase(key)
        start = time.perf_counter()
        try:
            yield
        finally:
            timings[key] = round(time.perf_counter() - start, 3)
            self.phase("driver between stages")
            self.detail(f"  stage time: {timings[key]:.1f}s")

    def progress(self, total: int, desc: str, unit: str):
        # Progress bars go to stderr so stdout stays a clean report.
        return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
