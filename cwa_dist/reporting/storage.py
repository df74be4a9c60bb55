"""Where run directories live: a local directory, or a URI (s3://, gs://, file://, ...) on any
filesystem pyarrow knows, as Ray Train's storage_path does.

A run under a URI is written to a local staging copy and every file is uploaded the moment it is
written (the result log after each experiment), so a killed driver loses nothing it has recorded;
a resume first downloads the run. S3 endpoint and credentials come from the standard variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, ...), GCS from Google's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from cwa_dist.errors import UsageError, one_line


def is_uri(output: str) -> bool:
    return "://" in output


def durable_output(output: str, announce) -> str:
    """`output`, unless it is relative inside a Ray job that has a working directory: Ray runs the
    job in a copy of that directory and deletes the copy (already while the job runs, when the
    workers' runtime environments are released), so results there would be lost. There a relative
    output is taken relative to the home directory instead, and `announce` gets one warning line."""
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job or is_uri(output) or Path(output).expanduser().is_absolute():
        return output
    try:
        working_dir = (json.loads(job).get("runtime_env") or {}).get("working_dir")
    except ValueError:
        working_dir = None
    if not working_dir:
        return output
    durable = str(Path.home() / output)
    announce(f"⚠️  --output {output} is relative, and this Ray job's working directory is temporary (Ray "
             f"deletes it); writing to {durable} instead. Give an absolute path on shared storage or an s3:// URI")
    return durable


def staging_root() -> Path:
    return Path(os.environ.get("CWA_DIST_STAGING", Path.home() / ".cache" / "cwa_dist" / "staging"))


class Output:
    """The parent of run directories (--output): `local` is where files are written; for a URI it
    is a staging directory and each written file is uploaded to `uri`."""

    def __init__(self, output: str):
        self.output = output
        self.uri = output.rstrip("/") if is_uri(output) else None
        if self.uri is None:
            self.local = Path(output).expanduser()
            return
        from pyarrow import fs

        try:
            self._fs, self._root = fs.FileSystem.from_uri(self.uri)
        except Exception as e:  # unknown scheme, missing credentials library, bad bucket name
            raise UsageError(f"--output {output}: {one_line(e)}") from None
        self.local = staging_root() / hashlib.sha256(self.uri.encode()).hexdigest()[:16]

    def where(self, experiment_id: str) -> str:
        return f"{self.uri}/{experiment_id}" if self.uri else str(self.local / experiment_id)

    # -- remote side; every method is a no-op (or reads the local disk) for a local --output
    def pull(self, experiment_id: str) -> None:
        """Make the local copy of run `experiment_id` equal the stored one (a fresh staging copy)."""
        if self.uri is None:
            return
        from pyarrow import fs

        local = self.local / experiment_id
        shutil.rmtree(local, ignore_errors=True)
        base = f"{self._root}/{experiment_id}"
        for info in self._list(base):
            if info.type == fs.FileType.File:
                target = local / info.path[len(base) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                with self._fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)

    def uploader(self, experiment_id: str):
        """A callback that uploads one written file of run `experiment_id` (None for a local output)."""
        if self.uri is None:
            return None
        local, base = self.local / experiment_id, f"{self._root}/{experiment_id}"

        def upload(path: Path) -> None:
            remote = f"{base}/{Path(path).relative_to(local).as_posix()}"
            try:
                if self._fs.type_name == "local":  # object stores have no directories to make
                    self._fs.create_dir(remote.rsplit("/", 1)[0], recursive=True)
                with open(path, "rb") as src, self._fs.open_output_stream(remote) as dst:
                    shutil.copyfileobj(src, dst)
            except OSError as e:
                raise OSError(f"cannot upload {path.name} to {self.uri}/{experiment_id}: {e}") from e

        return upload

    def check_writable(self) -> None:
        """Fail now, with one line, when the URI cannot be written (no bucket, no credentials)."""
        if self.uri is None:
            return
        probe = f"{self._root}/.cwa_dist_write_test"
        try:
            if self._fs.type_name == "local":
                self._fs.create_dir(self._root, recursive=True)
            with self._fs.open_output_stream(probe) as f:
                f.write(b"")
            self._fs.delete_file(probe)
        except Exception as e:
            raise UsageError(f"cannot write to --output {self.uri}: {one_line(e)}") from None

    def manifests(self) -> list[tuple[float, str, dict]]:
        """(modification time, experiment id, manifest) of every run under this output."""
        out = []
        if self.uri is None:
            for path in self.local.glob("*/manifest.json"):
                manifest = _read_json(path.read_bytes)
                if manifest is not None:
                    out.append((path.stat().st_mtime, path.parent.name, manifest))
            return out
        from pyarrow import fs

        for info in self._list(self._root):
            if info.type == fs.FileType.File and info.path.endswith("/manifest.json"):
                run = info.path[len(self._root) + 1:].split("/")[0]
                if info.path == f"{self._root}/{run}/manifest.json":
                    manifest = _read_json(lambda p=info.path: self._fs.open_input_stream(p).readall())
                    if manifest is not None:
                        mtime = info.mtime.timestamp() if info.mtime else 0.0
                        out.append((mtime, run, manifest))
        return out

    def _list(self, base: str):
        from pyarrow import fs

        try:
            return self._fs.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
        except Exception as e:
            raise UsageError(f"cannot list {self.uri}: {one_line(e)}") from None


def _read_json(read) -> dict | None:
    try:
        return json.loads(read())
    except (OSError, ValueError):
        return None
