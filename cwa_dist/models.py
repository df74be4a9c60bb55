"""Where a model's weights come from, and how a process builds its copy of (part of) it.

Every source becomes a local safetensors directory (`resolve_checkpoint`): a local directory as
it is, a Hub id through each node's own Hugging Face cache (safetensors only), a .gguf file or a
pickle-only directory converted once into a cache (`convert.py`). The driver reads only config,
tokenizer and tensor headers; the weights travel by path (`ModelRef`), never through Ray, and
each process reads what it needs from the files (`load_replica`, or a backend's partition).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from cwa_dist import convert
from cwa_dist.checkpoint import Checkpoint
from cwa_dist.errors import UsageError, one_line
from cwa_dist.file_hash import content_digest, hash_cache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
"""What the driver downloads of a Hub repository: configs (the safetensors index among them) and
tokenizer files; the tensors' headers it reads with range requests."""
HUB_PATTERNS = ["*.safetensors", *HUB_METADATA_PATTERNS]
"""What a node whose processes read weights downloads: the safetensors files too."""


@dataclass(frozen=True, slots=True)
class ModelRef:
    """What the driver hands to gradient workers and evaluation actors: where the weights are,
    not the weights. `checkpoint_dir` is the safetensors directory on the driver's node; a
    process on another node resolves `source` itself (its own Hub cache or conversion cache)."""

    source: str  # a Hub id, or the absolute path of the local directory or .gguf file
    checkpoint_dir: str
    dtype: str  # "float32" | "bfloat16"
    trust_remote_code: bool = False
    revision: str | None = None  # a Hub source's commit, resolved once on the driver: every node reads it

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def open(self) -> tuple[Checkpoint, object]:
        """(checkpoint, transformers config) on this node."""
        path = Path(self.checkpoint_dir)
        if self.revision is not None:  # this node's own Hub cache, at the driver's commit
            path = _hub_snapshot(self.source, self.revision)
        elif not path.is_dir():  # another node than the driver's: resolve the source here
            if Path(self.source).is_absolute() and not Path(self.source).exists():
                raise UsageError(
                    f"--model {self.source}: the path does not exist on node {socket.gethostname()}, where a worker "
                    "runs; put the model on a filesystem every node shares, or use a Hugging Face Hub id"
                )
            path = resolve_checkpoint(resolve_source(self.source), announce=lambda _: None)
        return Checkpoint(path), load_config(path, trust_remote_code=self.trust_remote_code)


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
    return _hub_snapshot(source.location)


def _hub_snapshot(repo: str, revision: str | None = None, patterns: list[str] = HUB_PATTERNS) -> Path:
    """The files of `repo` at `revision` that match `patterns`, in this node's Hugging Face cache
    (downloaded once per node: the Hub client locks each file while it downloads)."""
    from huggingface_hub import snapshot_download

    offline = not hub_reachable()
    try:
        path = Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns,
                                      local_files_only=offline))
    except Exception as e:  # RepositoryNotFoundError, GatedRepoError, LocalEntryNotFoundError, HTTP errors...
        raise UsageError(_explain_load_failure(repo, ModelSource("hub", repo), {"local_files_only": offline}, e)) from e
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
    path = _hub_snapshot(source.location, revision, patterns=HUB_METADATA_PATTERNS)
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


def load_tokenizer(path: Path, *, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UsageError(f"cannot load the tokenizer saved with the model in {path}: {one_line(e)}") from e


def load_config(path: Path, *, trust_remote_code: bool):
    from transformers import AutoConfig

    path = Path(path)
    if not trust_remote_code and (path / "config.json").is_file():
        try:
            raw = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            raw = {}  # transformers says what is wrong with it, below
        _refuse_remote_code(str(path), raw.get("auto_map") if isinstance(raw, dict) else None)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UsageError(f"cannot read the model configuration in {path}: {one_line(e)}") from e
    if not trust_remote_code:
        _refuse_remote_code(str(path), getattr(config, "auto_map", None))
    return config


def _refuse_remote_code(model: str, auto_map) -> None:
    """A config with an `auto_map` names classes shipped as Python code beside the weights. Without
    --trust-remote-code, transformers would refuse some of them with a long message, and silently
    build its own class for others (a known model_type): both are one clear refusal here."""
    if not auto_map:
        return
    if isinstance(auto_map, dict):
        classes = auto_map.get("AutoModelForCausalLM") or next(iter(auto_map.values()))
    else:
        classes = auto_map
    raise UsageError(
        f"model {model} runs its own code ({classes}, from its config's auto_map); cwa_dist does not run a "
        "model's code unless asked: read that code, then pass --trust-remote-code"
    )


def read_config(source: ModelSource, *, trust_remote_code: bool):
    """The model's config alone, without converting or downloading any weight (--dry-run)."""
    from transformers import AutoConfig

    if source.kind == "local":
        return load_config(Path(source.location), trust_remote_code=trust_remote_code)
    kwargs = {"trust_remote_code": trust_remote_code}
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    else:
        kwargs["local_files_only"] = not hub_reachable()
    name = str(Path(source.location) / source.gguf_file) if source.gguf_file else source.location
    try:
        config = AutoConfig.from_pretrained(source.location, **kwargs)
    except Exception as e:
        if not trust_remote_code and "trust_remote_code" in str(e):
            _refuse_remote_code(name, "classes transformers does not have")
        raise UsageError(_explain_load_failure(name, source, kwargs, e)) from e
    if not trust_remote_code:
        _refuse_remote_code(name, getattr(config, "auto_map", None))
    return config


def stored_dtype(source: ModelSource, config) -> torch.dtype | None:
    """The dtype the checkpoint stores its weights in: a local directory's safetensors headers (the
    floating dtype holding the most bytes), float32 for a .gguf (converted by dequantising), else
    the config's `dtype` (what the Hub's config.json says); None where nothing says."""
    if source.kind == "gguf":
        return torch.float32
    if source.kind == "local" and any(Path(source.location).glob("*.safetensors")):
        ckpt = Checkpoint(source.location)
        by_dtype: dict[torch.dtype, int] = {}
        for t in ckpt.tensors.values():
            if t.dtype.is_floating_point:
                by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
        return max(by_dtype, key=by_dtype.get) if by_dtype else None
    text = getattr(config, "text_config", None) or config
    value = getattr(text, "dtype", None) or getattr(config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def empty_model(config, *, dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module:
    """The model with every parameter on the meta device (no memory, no initialisation) and its
    buffers real, as the model's own __init__ computes them (rotary tables and the like)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        net = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    net.tie_weights()  # tied matrices are one parameter, named once (the checkpoint stores them once)
    return net.eval()


def _renamed_keys(net: torch.nn.Module, ckpt: Checkpoint) -> dict[str, str]:
    """Model name → checkpoint key for the keys transformers renames when it loads a checkpoint
    (GPT-NeoX's 'embed_out.' is the model's 'lm_head.'), from its own registry of renamings.
    Conversions that merge or split tensors are not followed (those parameters are then
    reported missing)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        renames = [(src, dst) for w in get_model_conversion_mapping(net) if type(w) is WeightRenaming
                   for src, dst in zip(w.source_patterns, w.target_patterns)]
    except Exception:  # a transformers without this registry: names are used as they are
        return {}
    out = {}
    for key in ckpt.tensors:
        name = key
        for src, dst in renames:
            name = re.sub(src, dst, name)
        if name != key:
            out[name] = key
    return out


def checkpoint_keys(net: torch.nn.Module, ckpt: Checkpoint) -> dict[str, str]:
    """Parameter name → checkpoint key for every (untied) parameter; refuses a checkpoint that
    lacks one or holds it in another size."""
    prefix = getattr(net, "base_model_prefix", "")
    renamed = _renamed_keys(net, ckpt)
    keys, missing = {}, []
    for name, p in net.named_parameters():
        key = ckpt.key_for(name, prefix) or renamed.get(name)
        if key is None:
            missing.append(name)
        elif ckpt.tensors[key].numel != p.numel():
            raise UsageError(f"{ckpt.path}: {key} has shape {ckpt.tensors[key].shape}, but the model's {name} is "
                             f"{tuple(p.shape)}; the weights do not belong to this configuration")
        else:
            keys[name] = key
    if missing:
        raise UsageError(f"{ckpt.path} holds no tensor for {len(missing)} parameter(s) of {type(net).__name__} "
                         f"(first: {missing[0]}); re-save the model with save_pretrained")
    return keys


def buffer_keys(net: torch.nn.Module, ckpt: Checkpoint) -> dict[str, str]:
    """Buffers the checkpoint holds (persistent ones); the rest keep the values __init__ computed."""
    prefix = getattr(net, "base_model_prefix", "")
    renamed = _renamed_keys(net, ckpt)
    return {n: k for n, _ in net.named_buffers() if (k := ckpt.key_for(n, prefix) or renamed.get(n)) is not None}


def load_replica(ckpt: Checkpoint, config, *, dtype: torch.dtype, trust_remote_code: bool, device: str = "cpu",
                 gpus: int = 0, first_gpu: int = 0) -> torch.nn.Module:
    """The whole model, built empty and filled one tensor at a time from the checkpoint (no random
    initialisation, no second copy). On one GPU, GPU `first_gpu` of those the process sees; on
    several, split by whole blocks with accelerate's device_map; a model that does not fit them is
    refused instead of spilling to the CPU."""
    from accelerate.utils import set_module_tensor_to_device

    net = empty_model(config, dtype=dtype, trust_remote_code=trust_remote_code)
    device_map = _gpu_map(net, gpus) if device == "cuda" and gpus > 1 else None

    def target(name: str):
        if device != "cuda":
            return "cpu"
        if device_map is None:
            return first_gpu
        return next(d for prefix, d in sorted(device_map.items(), key=lambda kv: -len(kv[0]))
                    if prefix == "" or name == prefix or name.startswith(prefix + "."))

    for name, key in checkpoint_keys(net, ckpt).items():
        set_module_tensor_to_device(net, name, target(name), value=ckpt.read(key, dtype))
    stored = buffer_keys(net, ckpt)
    for name, buf in list(net.named_buffers()):
        value = ckpt.read(stored[name], buf.dtype) if name in stored else buf
        set_module_tensor_to_device(net, name, target(name), value=value)
    net.tie_weights()
    empty = [n for n, p in net.named_parameters(remove_duplicate=False) if p.is_meta]
    if empty:
        raise RuntimeError(f"{len(empty)} parameter(s) were not loaded (first: {empty[0]})")
    if device_map is not None:
        from accelerate import dispatch_model

        net = dispatch_model(net, device_map=device_map)
    return net.eval()


def load_pretrained(model: str, *, dtype: torch.dtype, trust_remote_code: bool = False, build: bool = True):
    """(whole model or None, tokenizer, checkpoint directory) in this process: for benchmarks and
    one-process references. The pipeline never does this on the driver."""
    path = resolve_checkpoint(resolve_source(model), announce=lambda _: None)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    net = None
    if build:
        ckpt = Checkpoint(path)
        net = load_replica(ckpt, load_config(path, trust_remote_code=trust_remote_code), dtype=dtype,
                           trust_remote_code=trust_remote_code)
        ckpt.close()
    return net, tokenizer, path


def _gpu_map(net: torch.nn.Module, gpus: int) -> dict:
    from accelerate import infer_auto_device_map

    free = {i: int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in range(gpus)}
    device_map = infer_auto_device_map(net, max_memory=free,
                                       no_split_module_classes=getattr(net, "_no_split_modules", None) or [])
    off = sorted({str(d) for d in device_map.values() if not isinstance(d, int)})
    if off:
        need = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**30
        raise UsageError(
            f"the model ({need:.1f} GiB of weights) does not fit the {gpus} GPU(s) of an evaluation actor "
            f"({sum(free.values()) / 2**30:.1f} GiB free); raise --gpus-per-eval-actor"
        )
    return device_map


def _explain_load_failure(model: str, source: ModelSource, kwargs: dict, e: Exception) -> str:
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


