"""A fake CUDA device for machines without a GPU, so that device-placement bugs fail in tests as on a GPU.

Inside `with fake_cuda() as cuda:` a tensor on cuda:0 is a FakeCudaTensor: it says it lives on cuda:0 but holds
an ordinary CPU tensor and runs every operation on it for real. Whole functions run end to end with real values
(.item(), loops until convergence, autograd, torch.func.vmap, CUDA's autocast), and:
- an operation that mixes a CUDA tensor with a CPU tensor of one or more dimensions raises CUDA's "Expected all
  tensors to be on the same device" (a 0-dim CPU tensor passes, as CUDA kernels take it as a scalar, and so do
  CPU index tensors of a CUDA tensor, as on CUDA; copies between devices pass, of course);
- drawing a CUDA tensor from a CPU torch.Generator raises, as on CUDA;
- factories (torch.zeros(..., device="cuda"), torch.tensor(data, device="cuda")), .to("cuda"), .cuda() and
  nn.Module.to("cuda") make fake CUDA tensors and parameters; .cpu() and .to("cpu") make real CPU tensors;
  .numpy() of a CUDA tensor raises, .tolist() and .item() copy, as on CUDA;
- torch.autocast("cuda") is really on (without a GPU it would switch itself off), so CUDA's autocast policy
  applies: which operations run in bf16 and which in float32 (not the same lists as the CPU's).

What it cannot catch: anything of real CUDA kernels (their numerics, TF32, non-determinism, memory, speed; the
fused attention kernels are never chosen, attention takes the math path), NCCL collectives and process groups
(a test passes a stand-in gather), streams and non_blocking copies, torch.cuda.* calls (synchronize, memory
stats, torch.Generator(device="cuda") need a driver), storage access on a fake tensor (data_ptr, saving: call
.cpu() first), torch.compile, and more than one device. Its device rule is CUDA's elementwise rule applied to
every operation: the few CUDA operations that refuse even a 0-dim CPU tensor pass here. Autograd runs on the CPU
tensors inside (the autograd engine would look for a GPU stream) through the calls _PythonLevel.AUTOGRAD lists;
hooks and custom torch.autograd.Function on fake tensors are not supported.

Process-wide side effect, without a GPU: the first use makes torch's CUDA device guards no-ops and marks CUDA as
initialised for the rest of the process, which has no CUDA to guard or initialise anyway. Test code only:
nothing outside tests/ may import this module.
"""
from contextlib import ExitStack, contextmanager
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten

# copies between devices: what moves data, so nothing to check
_CROSS_DEVICE = {aten._to_copy.default, aten.copy_.default}
# CUDA takes CPU index tensors for a CUDA tensor (and moves them)
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default,
             aten._unsafe_index.Tensor, aten._unsafe_index_put.default}


class FakeCudaTensor(torch.Tensor):
    """Says cuda:0 and holds `elem`, a CPU tensor that carries the autograd graph too (the wrapper never
    requires grad: the autograd engine would look for a GPU stream)."""
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        wrapper = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                      storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                      layout=elem.layout, device=CUDA)
        wrapper.elem = elem
        return wrapper

    def __repr__(self):
        return f"FakeCudaTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _unwrap(x):
    return x.elem if isinstance(x, FakeCudaTensor) else x


def _check_devices(func, args, kwargs) -> None:
    if func in _CROSS_DEVICE:
        return
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if func in _INDEXING and isinstance(args[0], FakeCudaTensor):
        indices = {id(t) for t in tree_flatten(args[1])[0] if isinstance(t, torch.Tensor) and t.device == CPU}
        tensors = [t for t in tensors if id(t) not in indices]
    devices = {t.device for t in tensors if not (t.device == CPU and t.dim() == 0)}
    if len(devices) > 1:
        first, second = sorted(map(str, devices), reverse=True)[:2]  # cuda:0 before cpu, as CUDA words it
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{first} and {second}! (fake CUDA, in {func})")


def _run(func, args, kwargs):
    """func for real on the CPU tensors inside; its results are fake CUDA tensors where CUDA would put them."""
    flat = tree_flatten((args, kwargs))[0]
    device = kwargs.get("device")
    fake = any(isinstance(t, FakeCudaTensor) for t in flat)
    on_cuda = torch.device(device).type == "cuda" if device is not None else fake
    if not (fake or on_cuda):
        return func(*args, **kwargs)
    _check_devices(func, args, kwargs)
    if on_cuda:
        for g in flat:
            if isinstance(g, torch.Generator) and g.device.type != "cuda":
                raise RuntimeError(f"Expected a 'cuda' device type for generator but found '{g.device.type}' "
                                   f"(fake CUDA, in {func})")
        if device is not None:
            kwargs = {**kwargs, "device": CPU}
    wrappers = {id(t.elem): t for t in flat if isinstance(t, FakeCudaTensor)}
    # The dispatcher has switched autograd off below it; the tensors inside carry the graph, so back on.
    excluded = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradFunctionality) \
        .remove(torch._C.DispatchKey.ADInplaceOrView)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded):
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) in wrappers:  # an in-place operation returns its argument
            return wrappers[id(x)]
        return FakeCudaTensor(x) if on_cuda else x
    return tree_map(wrap, out)


class _Factories(TorchDispatchMode):
    """What the tensor subclass cannot see: factories with device="cuda", and CPU tensors moved to cuda."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _indexed(device):
    """cuda -> cuda:0: without an index, torch asks the (absent) driver for the current device."""
    return CUDA if isinstance(device, (str, torch.device)) and torch.device(device) == torch.device("cuda") \
        else device


def _index_lists_on_cpu(index):
    """x[:, [0, 2]]: a list index becomes a tensor on x's device inside C++; a CPU tensor is the same index."""
    as_tensor = lambda i: torch.tensor(i) if isinstance(i, list) else i  # noqa: E731
    return tuple(map(as_tensor, index)) if isinstance(index, tuple) else as_tensor(index)


class _PythonLevel(TorchFunctionMode):
    """What never reaches the dispatcher's Python hooks: torch.tensor(data, device="cuda") and list indices, which
    C++ copies to the device itself; .to("cuda") and .cuda() without an index, which ask for the current device;
    .tolist() and .numpy(), which read memory; and autograd, which runs on the CPU tensors inside."""
    AUTOGRAD = {torch.Tensor.requires_grad_, torch.Tensor.requires_grad.__get__, torch.Tensor.requires_grad.__set__,
                torch.Tensor.grad.__get__, torch.Tensor.grad.__set__, torch.Tensor.grad_fn.__get__,
                torch.Tensor.is_leaf.__get__, torch.Tensor.backward, torch.Tensor.retain_grad, torch.autograd.grad,
                torch.autograd.backward}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _indexed(kwargs["device"])
        fake = bool(args) and isinstance(args[0], FakeCudaTensor)
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and not isinstance(args[0], torch.Tensor) \
                and kwargs.get("device") == CUDA:
            return func(*args, **{**kwargs, "device": CPU}).to(CUDA)
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _indexed(args[1]), *args[2:])
        if func is torch.Tensor.cuda:
            return args[0].to(CUDA)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and fake:
            args = (args[0], _index_lists_on_cpu(args[1]), *args[2:])
        if func is torch.Tensor.tolist and fake:
            return args[0].elem.tolist()
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and fake:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first. (fake CUDA)")
        if func in self.AUTOGRAD:
            return _on_the_tensors_inside(func, args, kwargs)
        if kwargs.get("requires_grad"):  # a factory: requires_grad goes on the tensor inside
            out = func(*args, **{**kwargs, "requires_grad": False})
            _unwrap(out).requires_grad_(True)
            return out
        return func(*args, **kwargs)


def _on_the_tensors_inside(func, args, kwargs):
    """func on the CPU tensors inside the fake ones; tensors it returns are fake again (the same wrapper where it
    returns a tensor it was given, as requires_grad_ does)."""
    wrappers = {id(t.elem): t for t in tree_flatten((args, kwargs))[0] if isinstance(t, FakeCudaTensor)}
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))

    def wrap(x):
        if not (isinstance(x, torch.Tensor) and wrappers):
            return x
        return wrappers[id(x)] if id(x) in wrappers else FakeCudaTensor(x)
    return tree_map(wrap, out)


@contextmanager
def fake_cuda():
    """Run the block with a fake cuda:0 (the module docstring says what it checks); yields that device."""
    with ExitStack() as stack:
        if not torch.cuda.is_available():
            # torch's lazy CUDA initialisation, its CUDA device guards (in indexing, say) and autocast look for
            # a driver; the guards stay no-ops for the rest of the process, which has no GPU to guard anyway
            torch._C._ensureCUDADeviceGuardSet()
            stack.enter_context(mock.patch.object(torch.cuda, "_lazy_init", lambda: None))
            stack.enter_context(mock.patch("torch.cuda.amp.common.amp_definitely_not_available", lambda: False))
            stack.enter_context(mock.patch.object(torch.cuda, "is_bf16_supported", lambda *a, **k: True))
        # nn.Module.to("cuda") makes new parameters (the fake ones) instead of setting .data of the old ones
        previous = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        stack.callback(torch.__future__.set_overwrite_module_params_on_conversion, previous)
        stack.enter_context(_PythonLevel())
        stack.enter_context(_Factories())
        yield CUDA
