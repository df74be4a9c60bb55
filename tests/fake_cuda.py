"""A stand-in for a GPU on a machine without one: tensors on another device than the CPU that
refuse to be mixed with CPU tensors, as CUDA kernels do.

This machine has no GPU, and a CPU run cannot show that device handling is right: every tensor is
on the CPU, so a GPU tensor merged into a CPU table never happens. The stand-in device is torch's
PrivateUse1 backend, named `fakecuda` and registered from Python with a dummy device guard (a CPU
build of torch has no CUDA device guard, so a tensor saying `cuda` cannot even be sliced). The code
under test takes devices from tensors and never names `cuda` itself, so it cannot tell. Inside
`fake_cuda()`:
- a tensor made on `CUDA` (torch.empty(..., device=CUDA), t.to(CUDA)) is a `FakeCuda`: its data is
  a CPU tensor, its `device` is fakecuda:0;
- an operation on FakeCuda tensors gives FakeCuda results;
- an operation mixing a FakeCuda tensor with a CPU tensor of one or more dimensions raises, as
  CUDA does ("Expected all tensors to be on the same device"); CPU scalars (0-dim) mix, as on CUDA;
- .cpu() / .to("cpu") give a plain CPU tensor; .numpy() and pickling of a FakeCuda refuse, as a
  CUDA tensor's .numpy() does and as unpickling one on a CPU-only driver would.
The real GPU path is run by benchmarks/gpu_check.py whenever a GPU is lent.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map


def _register_device() -> torch.device:
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    if torch._C._get_privateuse1_backend_name() != "fakecuda":
        _setup_privateuseone_for_python_backend("fakecuda")
    return torch.device("fakecuda", 0)


CUDA = _register_device()
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class MixedDeviceError(RuntimeError):
    pass


class FakeCuda(torch.Tensor):
    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                  device=CUDA, requires_grad=inner.requires_grad,
                                                  storage_offset=inner.storage_offset())
        out.inner = inner
        return out

    # Conversions to Python read the data, as a CUDA tensor's do (after a copy to the host).
    def __float__(self):
        return float(self.inner)

    def __int__(self):
        return int(self.inner)

    def __bool__(self):
        return bool(self.inner)

    def __index__(self):
        return self.inner.__index__()

    def item(self):
        return self.inner.item()

    def tolist(self):
        return self.inner.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert a GPU tensor to numpy. Use Tensor.cpu() first")

    def __reduce_ex__(self, protocol):
        raise TypeError("a (fake) CUDA tensor would reach a process boundary: it must be moved to the CPU first")

    def __repr__(self):
        return f"FakeCuda({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        cpu = [t for t in tensors if not isinstance(t, FakeCuda) and t.dim() > 0]
        if cpu and func not in _COPIES:
            raise MixedDeviceError(f"Expected all tensors to be on the same device, but found at least two "
                                   f"devices, {CUDA} and cpu! ({func})")
        target = kwargs.get("device")
        to_cpu = target is not None and torch.device(target).type == "cpu"
        if target is not None:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is torch.ops.aten.copy_.default:
            return args[0]
        if to_cpu:
            return out
        return tree_map(_wrap, out)


def _unwrap(x):
    return x.inner if isinstance(x, FakeCuda) else x


def _wrap(x):
    return FakeCuda(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeCuda) else x


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == CUDA.type


class _FakeCudaMode(TorchDispatchMode):
    """Makes tensors asked for on the stand-in device into FakeCuda tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        has_fake = any(isinstance(t, FakeCuda) for t in tree_leaves((args, kwargs)))
        if _is_cuda(kwargs.get("device")) and not has_fake:  # a factory, or a CPU tensor sent to the GPU
            return tree_map(_wrap, func(*args, **{**kwargs, "device": torch.device("cpu")}))
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda():
    """Within: tensors made on `CUDA` are FakeCuda (see the module docstring)."""
    with _FakeCudaMode():
        yield


def on_fake_cuda(t: torch.Tensor) -> FakeCuda:
    """A copy of CPU tensor `t` on the fake CUDA device (outside `fake_cuda()` too)."""
    return FakeCuda(t.clone())
