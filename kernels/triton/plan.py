"""Framework-neutral launch plans: what one Triton kernel launch needs, described without tensors.

Each op module (:mod:`.mov_linear`, :mod:`.mov_ffn`, :mod:`.molora_linear`) builds its launches from shapes,
dtype names, strides and routing flags alone, as :class:`Launch` values; two launchers consume the very same
values: the PyTorch one (``<op>_torch.py``, through :func:`.autograd.run_launch`) and the JAX one
(``pemoe.jax.triton``, through ``jax_triton.triton_call``). A launch names its pointer arguments instead of
holding them: each input pointer is an op input ("x", "weight", …) or a buffer an earlier launch of the plan
wrote, each output pointer a :class:`Buffer` of the plan; ``None`` is a pointer the kernel never touches
(its feature flag is off), which a launcher fills with any array (PyTorch: an existing tensor; JAX: a
one-element placeholder). Every kernel's parameters start with exactly its input pointers, then its output
pointers, then the runtime scalars (sizes, strides, ``scale``), then the constexprs — the order jax-triton
passes arrays in.

This module imports neither torch nor JAX.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import triton
from triton.runtime.autotuner import Autotuner

#: Bytes per element of the dtypes the kernels take, by name.
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
#: Activation dtypes every op supports (x and the frozen weights; adapters are float32).
ACTIVATION_DTYPES = ("float16", "bfloat16", "float32")


def dtype_name(dtype: Any) -> str:
    """ "float16", "bfloat16", "float32", … for a torch dtype, a NumPy / JAX dtype (or scalar type) or a name."""
    if isinstance(dtype, str):
        return dtype
    text = str(dtype)
    if text.startswith("torch."):
        return text.removeprefix("torch.")
    return np.dtype(dtype).name


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides (in elements) of an array of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class Buffer:
    """An array a launch writes: shape, dtype name, and whether it is zero-filled before the launch (partial
    buffers of which a launch writes only some slots). Buffers are row-major."""

    shape: tuple[int, ...]
    dtype: str
    zeroed: bool = False

    @property
    def strides(self) -> tuple[int, ...]:
        return contiguous_strides(self.shape)


@dataclass(frozen=True, eq=False)
class Launch:
    """One kernel launch. ``role``: what it does in its op ("up", "expand", …; the key of forced tile
    configurations); ``name``: the launch's name (jax-triton's custom-call name); ``kernel``: the autotuned
    kernel (``triton.autotune`` object) or a plain ``triton.jit`` function; ``inputs`` / ``outputs``: the
    kernel's pointer parameters in order, as op-input / buffer names (None: never touched); ``scalars``: the
    runtime sizes, strides and scale by parameter name; ``constexprs``: the feature flags (no tile sizes);
    ``grid``: tile configuration kwargs -> grid; ``configs``: the legal tile configurations for this launch,
    the default first (what autotune pruning leaves, or the one forced configuration)."""

    role: str
    name: str
    kernel: Any
    inputs: tuple[str | None, ...]
    outputs: tuple[str | None, ...]
    scalars: dict[str, int | float]
    constexprs: dict[str, Any]
    grid: Callable[[dict], tuple[int, ...]]
    configs: tuple[triton.Config, ...]

    @property
    def fn(self) -> Any:
        """The ``triton.jit`` function (under the autotuner, if any)."""
        return self.kernel.fn if self.autotuned else self.kernel

    @property
    def autotuned(self) -> bool:
        return isinstance(self.kernel, Autotuner)

    def pointer_names(self) -> tuple[str, ...]:
        """The kernel's pointer parameter names, inputs then outputs."""
        return tuple(self.fn.arg_names[: len(self.inputs) + len(self.outputs)])


@dataclass(frozen=True, eq=False)
class Plan:
    """The launches of one op call in order, and the buffers they write (by name)."""

    buffers: dict[str, Buffer]
    launches: tuple[Launch, ...]


def strides_of(strides: dict[str, tuple[int, ...]] | None, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """An op input's strides: as given (PyTorch tensors may be strided), else row-major (JAX arrays)."""
    if strides is not None and strides.get(name) is not None:
        return tuple(strides[name])
    return contiguous_strides(shape)


def load_torch_part(module: str) -> ModuleType | None:
    """The PyTorch launcher and autograd of kernel module ``module`` (``<module>_torch``), imported when torch is
    installed; None without torch (the JAX launcher needs only the kernels and their launch plan)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    return importlib.import_module(f"{module}_torch")


def torch_attribute(part: ModuleType | None, module: str, name: str) -> Any:
    """A kernel module's ``__getattr__``: the names of its PyTorch part (entry points, custom ops, launchers)."""
    if part is not None and not name.startswith("__"):
        try:
            return getattr(part, name)
        except AttributeError:
            pass
    why = " (its PyTorch launcher needs torch, which is not installed)" if part is None else ""
    raise AttributeError(f"module {module!r} has no attribute {name!r}{why}")
