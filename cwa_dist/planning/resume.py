"""A run's identity and its continuation, in one place: its experiment id, what it was computed
on, which settings may change between tries, whether an earlier try may be continued, and the log
of finished experiments. No Ray here."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cwa_dist.config import RunConfig, operational_settings
from cwa_dist.errors import UsageError

if TYPE_CHECKING:
    from cwa_dist.reporting.storage import Output

# Settings that change how a run is carried out, not what it computes: a resume may change them.
OPERATIONAL = operational_settings()


# What a run was computed on, beyond its settings: recorded in config.json once the device is known,
# and checked before a resume (a run begun on CPU in float32 must not continue on GPUs in bfloat16).
IDENTITY = ("resolved_dtype", "data_sha256", "data_revision", "weights")
# What config.json records beside the settings, for the reader: not compared on resume.
RECORDED = ("plan", "checkpoint", "corpus")


def run_identity(texts: list[str], dtype, weights: str, data_revision: str | None = None) -> dict:
    """The resolved dtype, a hash of the texts the run reads (and the Hub dataset's commit they were
    read at), and what identifies its weights (a Hub commit, or the checkpoint's content hash)."""
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode())
        digest.update(b"\0")
    return {"resolved_dtype": str(dtype).removeprefix("torch."), "data_sha256": digest.hexdigest(),
            "data_revision": data_revision, "weights": weights}


def differing_identity(stored: dict, identity: dict) -> list[str]:
    out = []
    for key in IDENTITY:
        if key in stored and stored[key] != identity[key]:  # a run recorded before a key existed passes it
            what = {"data_sha256": "the texts", "data_revision": "the dataset's revision",
                    "weights": "the weights (Hub commit or checkpoint content)"}.get(key, key)
            out.append(f"{what} differ (stored {str(stored.get(key))[:16]!r}, now {str(identity[key])[:16]!r})")
    return out


def differing_settings(stored: dict, current: dict) -> list[str]:
    """Names of result-affecting settings whose values differ, with both values."""
    out = []
    for key in sorted(set(stored) | set(current)):
        if key in OPERATIONAL or key in IDENTITY or key in RECORDED:
            continue
        a, b = _normal(stored.get(key)), _normal(current.get(key))
        if a != b:
            out.append(f"{key} (stored {a!r}, now {b!r})")
    return out


def _normal(v):
    # JSON turns tuples into lists; compare them alike.
    return list(v) if isinstance(v, (list, tuple)) else v


def latest_unfinished(manifests: list[tuple[float, str, dict]]) -> str | None:
    """The experiment id of the newest run whose manifest is not complete, from (mtime, id, manifest)."""
    unfinished = [(mtime, run) for mtime, run, m in manifests if m.get("status") != "complete"]
    return max(unfinished)[1] if unfinished else None


class ResultLog:
    """Finished experiments, one JSON line each, appended and synced as they arrive, so a killed
    driver loses at most the experiment in flight. A torn last line is ignored on reading."""

    def __init__(self, path: Path, on_write=None):
        self.path = path
        self.on_write = on_write  # uploads the log after each line, for a run stored under a URI

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # the line being written when the driver died
        return rows

    def repair(self) -> list[dict]:
        """Drop a torn last line (so later appends start on a fresh line); return the rows."""
        rows = self.read()
        if self.path.exists():
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in rows))
            os.replace(tmp, self.path)
            if self.on_write:
                self.on_write(self.path)
        return rows

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.on_write:
            self.on_write(self.path)


def experiment_id(cfg: RunConfig, output: Output) -> str:
    if cfg.run.experiment_id:
        return cfg.run.experiment_id
    if cfg.run.resume:
        latest = latest_unfinished(output.manifests())
        if latest is None:
            raise UsageError(f"--resume: no unfinished run under {cfg.run.output}; give --experiment-id or start a "
                             "new run")
        return latest
    return dt.datetime.now().strftime("critical_analysis_%Y%m%d_%H%M%S")


def config_record(cfg: RunConfig, experiment_id: str, device: str) -> dict:
    return {**cfg.to_dict(), "experiment_id": experiment_id, "device": device}


def previous_run(cfg: RunConfig, path: Path, where: str, experiment_id: str) -> dict | None:
    """The manifest of the run to continue, after checking that continuing it is safe."""
    manifest, config = path / "manifest.json", path / "config.json"
    if not manifest.exists() or not config.exists():
        if cfg.run.resume:
            raise UsageError(f"--resume: {where} holds no run to continue; start it without --resume")
        return None  # RunDirectory.create refuses a non-empty directory that is not a run
    stored = json.loads(config.read_text())
    diffs = differing_settings(stored, config_record(cfg, experiment_id, stored.get("device")))
    if diffs:
        raise UsageError(
            f"cannot resume {where}: these settings differ from the stored run and would make its results "
            f"wrong: {'; '.join(diffs)}. Use the stored settings, or a new --experiment-id"
        )
    return json.loads(manifest.read_text())


def check_identity(path: Path, where: str, identity: dict) -> None:
    diffs = differing_identity(json.loads((path / "config.json").read_text()), identity)
    if diffs:
        raise UsageError(f"cannot resume {where}: {'; '.join(diffs)}; the stored "
                         "results were computed otherwise. Use the stored data and dtype, or a new --experiment-id")
