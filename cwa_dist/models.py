"""Load a causal LM and its tokenizer from a Hub id, a local directory, or a .gguf file,
and pack loaded weights so other processes can rebuild the model without reading the file."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from cwa_dist.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """'auto' is float32 on CPU (fast and exact there) and bfloat16 on GPUs."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return DTYPES[name]


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


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def load_model(model: str, *, dtype: torch.dtype, trust_remote_code: bool, progress: bool = True):
    """(model, tokenizer, source) with the model in eval mode on the CPU.

    Every failure a user can cause or fix (a missing file, a corrupt file, an unreachable Hub,
    an unknown repository) becomes a UsageError with one line saying what to do.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    source = resolve_source(model)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.kind == "hub" and not hub_reachable():
        # The model may still be in the local Hub cache.
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        net = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs)
    except UsageError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for bad sources
        raise UsageError(_explain_load_failure(model, source, kwargs, e)) from e
    net.eval()
    return net, tokenizer, source


def _explain_load_failure(model: str, source: ModelSource, kwargs: dict, e: Exception) -> str:
    reason = _one_line(e)
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


@dataclass
class ModelBlob:
    """A loaded model as plain arrays, for Ray's object store: actors rebuild the model from the
    config and these arrays, without reading or dequantising the model file again.

    Arrays are numpy so that Ray maps them zero-copy; bfloat16 (which numpy lacks) travels as
    its raw 16-bit pattern. Tied parameters travel once, under their first name.
    """

    config: object  # transformers PretrainedConfig
    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str]  # state-dict key → key in `arrays` holding the same tensor
    trust_remote_code: bool

    @staticmethod
    def pack(net: torch.nn.Module, *, trust_remote_code: bool) -> "ModelBlob":
        arrays, dtypes, aliases, seen = {}, {}, {}, {}
        # Non-persistent buffers (e.g. rotary tables) too: a sharded build may create them wrongly.
        tensors = {**dict(net.named_buffers()), **net.state_dict()}
        for key, t in tensors.items():
            ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if ptr in seen:
                aliases[key] = seen[ptr]
                continue
            seen[ptr] = key
            t = t.detach().cpu().contiguous()
            dtypes[key] = str(t.dtype).removeprefix("torch.")
            arrays[key] = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        return ModelBlob(net.config, arrays, dtypes, aliases, trust_remote_code)

    def tensor(self, key: str) -> torch.Tensor:
        """A writable copy (the object store's arrays are read-only; perturbations write)."""
        t = torch.from_numpy(np.array(self.arrays[key], copy=True))
        return t.view(torch.bfloat16) if self.dtypes[key] == "bfloat16" else t

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {key: self.tensor(key) for key in self.arrays}
        for key, target in self.aliases.items():
            out[key] = out[target]
        return out

    def float_dtype(self) -> torch.dtype:
        """The dtype of the model's weights: the floating dtype holding the most elements (buffers
        such as rotary tables may be float32 in a bfloat16 model)."""
        size: dict[str, int] = {}
        for key, d in self.dtypes.items():
            if d in ("float32", "bfloat16", "float16", "float64"):
                size[d] = size.get(d, 0) + self.arrays[key].size
        return getattr(torch, max(size, key=size.get) if size else "float32")

    def flat_slice(self, key: str, start: int, length: int) -> torch.Tensor:
        """Elements [start, start+length) of one flattened tensor, without copying the rest."""
        key = self.aliases.get(key, key)
        t = torch.from_numpy(self.arrays[key].reshape(-1)[start : start + length].copy())
        return t.view(torch.bfloat16) if self.dtypes[key] == "bfloat16" else t

    def build(self, device: str = "cpu") -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        dtype = self.float_dtype()
        net = AutoModelForCausalLM.from_config(self.config, dtype=dtype, trust_remote_code=self.trust_remote_code)
        wanted = net.state_dict().keys()  # without the non-persistent buffers __init__ made
        net.load_state_dict({k: v for k, v in self.state_dict().items() if k in wanted}, strict=True)
        if hasattr(net, "tie_weights"):
            net.tie_weights()
        return net.to(device).eval()

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def place(net: torch.nn.Module, device: str, gpus: int) -> torch.nn.Module:
    """Move a model onto its device; over several GPUs, split it by whole blocks with
    accelerate's device_map so a model larger than one GPU still fits."""
    if device != "cuda":
        return net
    if gpus <= 1:
        return net.to("cuda")
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(net, no_split_module_classes=getattr(net, "_no_split_modules", None) or [])
    return dispatch_model(net, device_map=device_map)
