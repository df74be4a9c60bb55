"""Where a model's weights come from: a local directory, a .gguf file or a pickle-only directory
(converted once into a cache, `convert.py`), or a Hub id pinned to one commit. Every source becomes
a local safetensors directory (`resolve_checkpoint`); the driver resolves the run's `Origin` once,
reading config, tokenizer and tensor headers only, never a weight.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from cwa_dist.errors import UsageError, one_line
from cwa_dist.modeling import convert
from cwa_dist.modeling.checkpoint import Checkpoint
from cwa_dist.modeling.file_hash import content_digest, hash_cache


@dataclass(frozen=True, slots=True)
class ModelSource:
    kind: str  # "gguf" | "local" | "hub"
    location: str  # file, directory or Hub id
    gguf_file: str | None = None


def resolve_source(model: str) -> ModelSource:
    path = Path(model).expanduser()
    if model.lower().endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"GGUF file {model} does not exist; check the path given to --model")
        return ModelSource("gguf", str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"directory {model} holds no config.json, so it is not a saved model; "
                "point --model at a save_pretrained directory, a .gguf file or a Hub id"
            )
        return ModelSource("local", str(path))
    if path.exists():
        raise UsageError(f"{model} is a file but not a .gguf; point --model at a directory, a .gguf file or a Hub id")
    if model.startswith(("/", "./", "../", "~")):  # a path, never a Hub id (owner/name)
        raise UsageError(f"model directory {model} does not exist; check the path given to --model")
    return ModelSource("hub", model)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick DNS look-up of the Hub's host, so an offline machine gets an answer at once
    instead of after the Hub client's retries. With a proxy configured we cannot tell; say yes."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


HUB_METADATA_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


HUB_PATTERNS = ["*.safetensors", *HUB_METADATA_PATTERNS]


def resolve_checkpoint(source: ModelSource, *, announce: Callable[[str], None]) -> Path:
    """A local safetensors directory holding the model, converting or downloading it first if needed."""
    if source.kind == "gguf":
        gguf = Path(source.location) / source.gguf_file
        return convert.converted("gguf", gguf, [gguf], announce=announce)
    if source.kind == "local":
        path = Path(source.location)
        if any(path.glob("*.safetensors")):
            return path  # preferred over any pickle files beside them, which are never read
        pickles = sorted(path.glob("pytorch_model*.bin"))
        if not pickles:
            raise UsageError(f"{path} holds no model weights (*.safetensors or pytorch_model*.bin)")
        return convert.converted("pickle", path, pickles + [path / "config.json"], announce=announce)
    return hub_snapshot(source.location)


def hub_snapshot(repo: str, revision: str | None = None, patterns: list[str] = HUB_PATTERNS) -> Path:
    """The files of `repo` at `revision` that match `patterns`, in this node's Hugging Face cache
    (downloaded once per node: the Hub client locks each file while it downloads)."""
    from huggingface_hub import snapshot_download

    offline = not hub_reachable()
    try:
        path = Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns,
                                      local_files_only=offline))
    except Exception as e:  # RepositoryNotFoundError, GatedRepoError, LocalEntryNotFoundError, HTTP errors...
        raise UsageError(explain_load_failure(repo, ModelSource("hub", repo), {"local_files_only": offline}, e)) from e
    if patterns is not HUB_PATTERNS:
        return path
    if not any(path.glob("*.safetensors")):
        raise UsageError(
            f"{repo!r} has no safetensors weights on the Hub; cwa_dist does not download pickle checkpoints "
            "(unpickling can run code). Save it with save_pretrained and pass the directory to --model"
        )
    return path


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a run's weights come from, resolved once on the driver and recorded: the directory
    the driver reads config and tokenizer from, the checkpoint's headers, and what identifies the
    weights (a Hub commit, or a local checkpoint's content hash)."""

    kind: str  # hub | local | gguf
    directory: Path
    checkpoint: Checkpoint  # headers only: the driver never holds a weight
    revision: str | None  # the Hub commit
    headers_sha256: str  # headers_digest: every tensor's name, file, dtype and shape
    content_sha256: str | None = None  # a local checkpoint's files, names and bytes (file_hash.content_digest)

    def record(self) -> dict:
        return {"kind": self.kind, "directory": str(self.directory), "revision": self.revision,
                "headers_sha256": self.headers_sha256, "content_sha256": self.content_sha256,
                "files": len(self.checkpoint.files), "bytes": self.checkpoint.nbytes()}

    @property
    def identity(self) -> str:
        """What a resumed run must find again: the commit (a Hub commit names its bytes), else the
        local files' content hash."""
        return self.revision or self.content_sha256 or self.headers_sha256


def resolve_origin(source: ModelSource, *, revision: str | None, announce: Callable[[str], None]) -> Origin:
    """The driver's view of the weights. A Hub id: its commit at `revision` (the branch head by
    default), its configs and tokenizer downloaded, its tensors' headers read with range requests
    (or from this node's cache, where the weights already are); no weight is downloaded here. A
    local directory or .gguf: the safetensors directory (converted once), its headers read, and
    its files hashed (streamed, never held; remembered while the files are unchanged)."""
    if source.kind != "hub":
        if revision is not None:
            raise UsageError(f"--revision {revision} names a Hub commit or branch, but --model {source.location} "
                             "is local")
        path = resolve_checkpoint(source, announce=announce)
        ckpt = Checkpoint(path)
        content = content_digest(path, ckpt.files, hash_cache(), announce)
        return Origin(source.kind, path, ckpt, None, headers_digest(ckpt), content)
    path = hub_snapshot(source.location, revision, patterns=HUB_METADATA_PATTERNS)
    commit = path.name  # snapshot_download answers with .../snapshots/<commit>
    ckpt = _hub_headers(source.location, commit, path)
    return Origin("hub", path, ckpt, commit, headers_digest(ckpt))


def _hub_headers(repo: str, commit: str, path: Path) -> Checkpoint:
    index = path / "model.safetensors.index.json"

    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in path.glob("*.safetensors")] or [None]  # one unsharded file, if any
    if all(f is not None and (path / f).is_file() for f in files):
        return Checkpoint(path)  # this node has the weights already: their headers are local
    if not hub_reachable():
        raise UsageError(f"cannot read the tensor headers of {repo!r} at {commit[:12]}: the Hugging Face Hub is "
                         "unreachable (offline?) and its weights are not in the local cache; connect to the network, "
                         "or pass a local directory to --model")
    from huggingface_hub import get_safetensors_metadata

    try:
        meta = get_safetensors_metadata(repo, revision=commit)
    except Exception as e:
        raise UsageError(
            f"{repo!r} has no safetensors weights on the Hub ({one_line(e)}); cwa_dist does not download pickle "
            "checkpoints (unpickling can run code). Save it with save_pretrained and pass the directory to --model"
        ) from e
    headers = {file: {name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
                      for name, t in m.tensors.items()} for file, m in meta.files_metadata.items()}
    return Checkpoint(path, headers=headers)


def headers_digest(ckpt: Checkpoint) -> str:
    """sha256 of every tensor's name, file, dtype and shape: changes when the checkpoint's layout
    does, cheap (no weight is read), the same whether the headers came from local files or the Hub."""
    digest = hashlib.sha256()
    for name, t in sorted(ckpt.tensors.items()):
        digest.update(json.dumps([name, t.file, list(t.shape), str(t.dtype)]).encode())
    return digest.hexdigest()


def explain_load_failure(model: str, source: ModelSource, kwargs: dict, e: Exception) -> str:
    reason = one_line(e)
    if source.kind == "gguf":
        return f"cannot read GGUF file {model} (corrupt, truncated or unsupported?): {reason}"
    if source.kind == "local":
        return f"cannot load the model saved in {model}: {reason}"
    if kwargs.get("local_files_only"):
        return (
            f"cannot load {model!r}: the Hugging Face Hub is unreachable (offline?) and the model is not in the "
            "local cache; connect to the network, or pass a local directory or .gguf file to --model"
        )
    if "Repo id must be" in reason or "not a valid model identifier" in reason or "404" in reason:
        return (
            f"model {model!r} is neither a local path nor a model on the Hugging Face Hub (gated or private "
            "models need HF_TOKEN); check the name or the path"
        )
    return f"cannot load {model!r} from the Hugging Face Hub: {reason}"
