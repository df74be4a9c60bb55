"""How a process builds its copy of (part of) a model from the checkpoint files: config and
tokenizer, the empty model on the meta device, the checkpoint key of every parameter and buffer,
and a replica filled one tensor at a time. The weights travel by path (`ModelRef`), never through
Ray; each process reads what it needs from the files (`load_replica`, or a backend's partition).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from cwa_dist.errors import UsageError, one_line
from cwa_dist.modeling import convert
from cwa_dist.modeling.checkpoint import Checkpoint
from cwa_dist.modeling.fusion import route
from cwa_dist.modeling.sources import (
    ModelSource,
    explain_load_failure,
    hub_reachable,
    hub_snapshot,
    resolve_checkpoint,
    resolve_source,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        path = self.local_dir()
        return Checkpoint(path), load_config(path, trust_remote_code=self.trust_remote_code)

    def local_dir(self) -> Path:
        """The checkpoint directory on this node."""
        path = Path(self.checkpoint_dir)
        if self.revision is not None:  # this node's own Hub cache, at the driver's commit
            path = hub_snapshot(self.source, self.revision)
        elif not path.is_dir():  # another node than the driver's: resolve the source here
            if Path(self.source).is_absolute() and not Path(self.source).exists():
                raise UsageError(
                    f"--model {self.source}: the path does not exist on node {socket.gethostname()}, where a worker "
                    "runs; put the model on a filesystem every node shares, or use a Hugging Face Hub id"
                )
            path = resolve_checkpoint(resolve_source(self.source), announce=lambda _: None)
        return path


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
        gguf = Path(source.location) / source.gguf_file
        done = convert.cached("gguf", gguf, [gguf])
        if done is not None:  # converted by an earlier run: its config.json, not a parse of the whole .gguf
            return load_config(done, trust_remote_code=trust_remote_code)
        kwargs["gguf_file"] = source.gguf_file
    else:
        kwargs["local_files_only"] = not hub_reachable()
    name = str(Path(source.location) / source.gguf_file) if source.gguf_file else source.location
    try:
        config = AutoConfig.from_pretrained(source.location, **kwargs)
    except Exception as e:
        if not trust_remote_code and "trust_remote_code" in str(e):
            _refuse_remote_code(name, "classes transformers does not have")
        raise UsageError(explain_load_failure(name, source, kwargs, e)) from e
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


def checkpoint_keys(net: torch.nn.Module, ckpt: Checkpoint) -> dict[str, str]:
    """Parameter name → checkpoint key for every (untied) parameter, following transformers' own
    renamings and fusions (modeling.fusion; a fused parameter's key is its own name, registered
    on `ckpt`); refuses a checkpoint that lacks one or holds it in another size."""
    prefix = getattr(net, "base_model_prefix", "")
    renamed, fused = route(net, ckpt)
    keys, missing = {}, []
    for name, p in net.named_parameters():
        key = ckpt.key_for(name, prefix) or renamed.get(name)
        if key is None and name in fused:
            layout = fused[name]
            if layout.shape != tuple(p.shape):
                raise UsageError(f"{ckpt.path}: the tensors transformers fuses into {name} make shape "
                                 f"{layout.shape}, but the model's is {tuple(p.shape)}; the weights do not belong "
                                 "to this configuration")
            ckpt.add_fused(name, layout.shape, list(layout.segments))
            key = name
        if key is None:
            missing.append(name)
        elif ckpt.info(key).numel != p.numel():
            raise UsageError(f"{ckpt.path}: {key} has shape {ckpt.info(key).shape}, but the model's {name} is "
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
    renamed, _ = route(net, ckpt)
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
