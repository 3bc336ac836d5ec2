"""Helpers shared by the Triton ops' PyTorch launchers and custom-op kernels: the launch device, the empty output
slot, and running a framework-neutral launch plan (:mod:`.plan`) on torch tensors."""

from __future__ import annotations

import contextlib

import torch
import triton

from pemoe.kernels.triton.plan import Buffer, Launch


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context to launch Triton kernels in for tensors on ``device``: Triton launches on the *current* CUDA
    device, so tensors on another GPU need theirs made current (nothing to do on the CPU, the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def refuse_grad(what: str, hint: str, **tensors: torch.Tensor | None) -> None:
    """Forward-only kernels: NotImplementedError naming the ``tensors`` that require grad while autograd records
    (``what`` is forward only, then ``hint``); nothing when grad mode is off or none requires grad."""
    if not torch.is_grad_enabled():
        return
    need = [name for name, t in tensors.items() if t is not None and t.requires_grad]
    if need:
        verb = "requires" if len(need) == 1 else "require"
        raise NotImplementedError(f"{what} is forward only, but {', '.join(need)} {verb} grad: {hint}")


def absent(like: torch.Tensor) -> torch.Tensor:
    """A custom op's output slot for a tensor that is not computed: an empty float32 tensor on ``like``'s device
    (custom ops have fixed output schemas, so "no tensor" is an empty one)."""
    return like.new_empty((0,), dtype=torch.float32)


# ------------------------------------------------------------------------------------------
# Running a framework-neutral launch plan (:mod:`.plan`) on torch tensors
# ------------------------------------------------------------------------------------------

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_placeholders: dict[torch.device, torch.Tensor] = {}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a plan dtype name."""
    return _TORCH_DTYPES[name]


def placeholder(device: torch.device) -> torch.Tensor:
    """The one-element float32 tensor passed for a pointer the kernel never touches (one per device, reused):
    the same pointer type the JAX launcher's placeholders have, so both compile the same specialisation."""
    t = _placeholders.get(device)
    if t is None:
        t = _placeholders[device] = torch.empty(1, dtype=torch.float32, device=device)
    return t


def allocate(buffers: dict[str, Buffer], device: torch.device) -> dict[str, torch.Tensor]:
    """A tensor per plan buffer (zero-filled where the plan says so)."""
    return {
        name: (torch.zeros if b.zeroed else torch.empty)(b.shape, dtype=torch_dtype(b.dtype), device=device)
        for name, b in buffers.items()
    }


def launch_pointers(launch: Launch, tensors: dict[str, torch.Tensor | None], device: torch.device) -> list:
    """The launch's pointer arguments in order: the named tensors, the placeholder for unused slots."""
    spare = placeholder(device)
    out = []
    for name in (*launch.inputs, *launch.outputs):
        t = None if name is None else tensors[name]
        out.append(spare if t is None else t)
    return out


def run_launch(launch: Launch, tensors: dict[str, torch.Tensor | None], device: torch.device,
               config: triton.Config | None = None) -> None:  # fmt: skip
    """Launches ``launch`` on ``tensors`` (op inputs and buffers by name): through its autotuner, or with
    ``config`` (a forced tile configuration), or — a plain ``triton.jit`` kernel — with its one configuration."""
    pointers = launch_pointers(launch, tensors, device)
    if config is None and launch.autotuned:
        launch.kernel[launch.grid](*pointers, **launch.scalars, **launch.constexprs)
        return
    config = config if config is not None else launch.configs[0]
    fn = launch.fn
    tiles = {k: v for k, v in config.kwargs.items() if k in fn.arg_names}
    grid = launch.grid({**launch.constexprs, **tiles})
    fn[grid](
        *pointers, **launch.scalars, **launch.constexprs, **tiles,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def launch_args(launch: Launch, tensors: dict[str, torch.Tensor | None], device: torch.device) -> dict:
    """The launch's runtime arguments by parameter name (pointers as tensors, then the scalars): what the
    ahead-of-time compile cases (:mod:`.aot`) take."""
    pointers = launch_pointers(launch, tensors, device)
    return dict(zip(launch.pointer_names(), pointers, strict=True)) | launch.scalars
