"""PyTorch launcher and autograd of the MoLoRA linear (:mod:`.molora_linear`: the kernels, the math and the
framework-neutral launch plan this launcher runs). Loaded by :mod:`.molora_linear` when torch is installed; its
names (``molora_linear``, ``molora_adapter``, ``molora_forward``, ``molora_backward``, the custom ops) are read
as attributes of that module."""

from __future__ import annotations

import torch

from pemoe.kernels.triton.autograd import absent, allocate, launch_device, run_launch
from pemoe.kernels.triton.interpreter import INTERPRET
from pemoe.kernels.triton.molora_linear import (
    GIVEN_PROBS,
    MAX_ADAPTER_COLUMNS,
    SCHEDULES,
    TOKEN_ROUTER,
    MoLoRAProblem,
    _block_experts,
    _routing_mode,
    backward_plan,
    forced_config,
    forward_plan,
    plan_problem,
    resolve_schedule,
)
from pemoe.kernels.triton.plan import Plan

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------------
# Launcher: validate, plan, allocate, launch
# ------------------------------------------------------------------------------------------------

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_kernel_inputs(x, weight, bias, lora_a, lora_b, router, probs) -> None:
    """What the kernels support beyond pemoe's argument checks: dtypes, devices, non-empty x, adapter width."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, K] (flattened tokens), got shape {list(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"molora_linear Triton kernels support x in float16, bfloat16 or float32, got {x.dtype}")
    if weight is not None and weight.dtype != x.dtype:
        raise TypeError(f"x and weight must share one dtype, got x {x.dtype} and weight {weight.dtype}")
    if bias is not None and bias.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"bias must be float16, bfloat16 or float32 for the Triton kernels, got {bias.dtype}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b), ("router", router), ("probs", probs)):
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 for the Triton kernels (adapter parameters), got {t.dtype}")
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b, "router": router}
    tensors["probs"] = probs
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != ("cpu" if INTERPRET else "cuda"):
            where = "CPU tensors (TRITON_INTERPRET=1)" if INTERPRET else "CUDA tensors"
            raise ValueError(f"molora_linear Triton kernels run on {where}; {name} is on {t.device}")
        if t.device != x.device:
            raise ValueError(f"all tensors must be on x's device {x.device}; {name} is on {t.device}")
    num_experts, _, rank = lora_a.shape
    block_e, rank_pad = _block_experts(num_experts, rank, _routing_mode(router, probs))
    if block_e * rank_pad > MAX_ADAPTER_COLUMNS:
        raise ValueError(
            f"molora_linear Triton kernels: lora_a [E, K, r] with E = {num_experts}, r = {rank} needs "
            f"{block_e * rank_pad} padded adapter columns (E and r rounded up to powers of two); at most "
            f"{MAX_ADAPTER_COLUMNS} are supported"
        )


def _check_base(x, base, n: int) -> None:
    """The adapter-only op's ``base``: None, or [T, N] in x's dtype on x's device."""
    if base is None:
        return
    if base.dtype != x.dtype:
        raise TypeError(f"x and base must share one dtype, got x {x.dtype} and base {base.dtype}")
    if base.device != x.device or tuple(base.shape) != (x.shape[0], n):
        raise ValueError(
            f"base must be [T, N] = [{x.shape[0]}, {n}] on x's device {x.device}, "
            f"got {list(base.shape)} on {base.device}"
        )


def _problem(x, weight, bias, base, lora_a, lora_b, router, probs, top_k, renormalize) -> MoLoRAProblem:
    return plan_problem(
        tuple(x.shape), tuple(lora_a.shape), tuple(lora_b.shape), x.dtype,
        has_router=router is not None, has_probs=probs is not None, top_k=top_k, renormalize=renormalize,
        has_weight=weight is not None, has_bias=bias is not None, has_base=base is not None,
    )  # fmt: skip


def _run(plan: Plan, tensors: dict[str, Tensor | None], device: torch.device) -> dict[str, Tensor | None]:
    """Allocates the plan's buffers and runs its launches (a role's ``use_configs`` tile when forced)."""
    tensors = tensors | allocate(plan.buffers, device)
    for launch in plan.launches:
        run_launch(launch, tensors, device, forced_config(launch.role))
    return tensors


def molora_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    router: Tensor | None,
    probs: Tensor | None,
    scale: float,
    top_k: int | None,
    renormalize: bool,
    save_for_backward: bool,
    schedule: str = "auto",
    base: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Runs the forward kernels of ``schedule`` ("auto", "fused", "two_kernel"; a ``use_schedule`` context
    wins) on x [T, K]; returns (y [T, N], U float32 [T, E·r] | None, p_soft float32 [T, E] | None), the last
    two when ``save_for_backward`` (p_soft with token routing only). ``weight`` None: the adapter-only op,
    y = base + the adapter's delta (``base`` None: the delta alone)."""
    pb = _problem(x, weight, bias, base, lora_a, lora_b, router, probs, top_k, renormalize)
    schedule = resolve_schedule(schedule, pb, bool(save_for_backward))
    tensors = dict(x=x, weight=weight, bias=bias, base=base, lora_a=lora_a, lora_b=lora_b, router=router, probs=probs)
    strides = {name: tuple(t.stride()) for name, t in tensors.items() if t is not None}
    plan = forward_plan(pb, scale, bool(save_for_backward), schedule, strides)
    out = _run(plan, tensors, x.device)
    return out["y"], out.get("u"), out.get("p_soft")


def molora_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    router: Tensor | None,
    probs: Tensor | None,
    u: Tensor,
    p_soft: Tensor | None,
    scale: float,
    top_k: int | None,
    renormalize: bool,
    needs: tuple[bool, bool, bool, bool, bool, bool],
) -> tuple[Tensor | None, ...]:
    """Runs the backward kernels. ``needs`` = (dx, d bias, d lora_a, d lora_b, d router, d probs) booleans.

    Returns those gradients (None where not needed): dx in x's dtype, the others float32. The adapter
    gradients are the chunk partial sums added by torch (deterministic: no atomics anywhere).
    """
    pb = _problem(x, weight, None, None, lora_a, lora_b, router, probs, top_k, renormalize)
    tensors = dict(dy=dy, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, router=router, probs=probs, u=u,
                   p_soft=p_soft)  # fmt: skip
    strides = {name: tuple(t.stride()) for name, t in tensors.items() if t is not None}
    out = _run(backward_plan(pb, scale, needs, strides), tensors, x.device)

    def total(name):  # Σ over token chunks (one chunk: the partial sum itself, no extra launch)
        if out.get(name) is None:
            return None
        return out[name][0] if out[name].shape[0] == 1 else out[name].sum(dim=0)

    d_probs = out.get("d_route") if (needs[5] and pb.mode == GIVEN_PROBS) else None
    return out.get("dx"), total("part_bias"), total("part_a"), total("part_b"), total("part_router"), d_probs


# ------------------------------------------------------------------------------------------------
# Autograd: torch.library custom ops (opaque to torch.compile; their fake kernels give the output shapes from
# the input shapes alone, so tracing never reads autotune state or the schedule model) and the entry point
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("pemoe::triton_molora_linear", mutates_args=())
def _forward_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    base: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    router: Tensor | None,
    probs: Tensor | None,
    scale: float,
    top_k: int | None,
    renormalize: bool,
    save: bool,
    schedule: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [T, N] in x's dtype, U [T, E·r] float32 when ``save``, p_soft [T, E] float32 when ``save`` with
    token routing); empty where not computed. ``weight`` None: the adapter-only op (y = base + delta)."""
    if x.shape[0] == 0:  # no tokens: nothing to launch
        return x.new_empty((0, lora_b.shape[2])), absent(x), absent(x)
    with launch_device(x.device):
        y, u, p_soft = molora_forward(
            x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize, save, schedule, base
        )
    return y, (u if u is not None else absent(x)), (p_soft if p_soft is not None else absent(x))


@_forward_op.register_fake
def _(x, weight, bias, base, lora_a, lora_b, router, probs, scale, top_k, renormalize, save, schedule):
    T, (E, _, R) = x.shape[0], lora_a.shape
    save = save and T > 0
    u = x.new_empty((T, E * R), dtype=torch.float32) if save else absent(x)
    token = save and _routing_mode(router, probs) == TOKEN_ROUTER
    p_soft = x.new_empty((T, E), dtype=torch.float32) if token else absent(x)
    return x.new_empty((T, lora_b.shape[2])), u, p_soft


@torch.library.custom_op("pemoe::triton_molora_linear_backward", mutates_args=())
def _backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    router: Tensor | None,
    probs: Tensor | None,
    u: Tensor,
    p_soft: Tensor | None,
    scale: float,
    top_k: int | None,
    renormalize: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx [T, K], d bias [N], d lora_a [E, K, r], d lora_b [E, r, N], d router [K, E], d probs [T, E]) for
    needs = (dx, d bias, d lora_a, d lora_b, d router, d probs); dx in x's dtype, the others float32; empty
    where not needed."""
    if x.shape[0] == 0:  # no tokens: the parameter gradients are zero
        n = lora_b.shape[2]
        grads = (x.new_empty(x.shape), x.new_zeros((n,), dtype=torch.float32), torch.zeros_like(lora_a),
                 torch.zeros_like(lora_b), torch.zeros_like(router) if router is not None else None,
                 torch.zeros_like(probs) if probs is not None else None)  # fmt: skip
    else:
        with launch_device(x.device):
            grads = molora_backward(
                dy, x, weight, lora_a, lora_b, router, probs, u, p_soft, scale, top_k, renormalize, tuple(needs)
            )
    return tuple(g if g is not None and need else absent(x) for g, need in zip(grads, needs, strict=True))


@_backward_op.register_fake
def _(dy, x, weight, lora_a, lora_b, router, probs, u, p_soft, scale, top_k, renormalize, needs):
    (T, K), N, E = x.shape, lora_b.shape[2], lora_a.shape[0]
    f32 = dict(dtype=torch.float32)
    shapes = ((T, K), (N,), tuple(lora_a.shape), tuple(lora_b.shape), (K, E), (T, E))
    return tuple(
        (x.new_empty(shape) if i == 0 else x.new_empty(shape, **f32)) if need else absent(x)
        for i, (shape, need) in enumerate(zip(shapes, needs, strict=True))
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, base, lora_a, lora_b, router, probs, scale, top_k, renormalize, save, schedule = inputs
    _, u, p_soft = output
    token = _routing_mode(router, probs) == TOKEN_ROUTER
    ctx.save_for_backward(x, weight, lora_a, lora_b, router, probs, u, p_soft if token else None)
    ctx.args = (scale, top_k, renormalize, bias.dtype if bias is not None else None)


@torch.autograd.function.once_differentiable  # the kernels' backward is not itself differentiable
def _backward_autograd(ctx, dy, _d_u, _d_p_soft):
    x, weight, lora_a, lora_b, router, probs, u, p_soft = ctx.saved_tensors
    scale, top_k, renormalize, bias_dtype = ctx.args
    need_x, _, need_bias, need_base, need_a, need_b, need_router, need_probs = ctx.needs_input_grad[:8]
    mode = _routing_mode(router, probs)
    needs = [
        need_x,
        need_bias,
        need_a,
        need_b,
        need_router and mode == TOKEN_ROUTER,
        need_probs and mode == GIVEN_PROBS,
    ]
    grads = torch.ops.pemoe.triton_molora_linear_backward(
        dy, x, weight, lora_a, lora_b, router, probs, u, p_soft, scale, top_k, renormalize, needs
    )
    dx, d_bias, d_a, d_b, d_router, d_probs = (g if need else None for g, need in zip(grads, needs, strict=True))
    if d_bias is not None:
        d_bias = d_bias.to(bias_dtype)
    return dx, None, d_bias, dy if need_base else None, d_a, d_b, d_router, d_probs, None, None, None, None, None


_forward_op.register_autograd(_backward_autograd, setup_context=_setup_context)


def _apply(x2d, weight, bias, base, lora_a, lora_b, router, probs, scale, top_k, renormalize, schedule) -> Tensor:
    """y of the forward custom op (``router`` dropped under sentence routing); U and p_soft are saved for the
    backward only when grad mode is on and a differentiable input requires grad (the weight is frozen)."""
    router = router if probs is None else None
    tensors = (x2d, bias, base, lora_a, lora_b, router, probs)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    y, _, _ = torch.ops.pemoe.triton_molora_linear(
        x2d, weight, bias, base, lora_a, lora_b, router, probs, float(scale), top_k, renormalize, save, schedule
    )
    return y


def molora_linear(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    router: torch.Tensor | None,
    probs: torch.Tensor | None,
    scale: float,
    top_k: int | None,
    renormalize: bool,
    schedule: str = "auto",
) -> torch.Tensor:
    """MoLoRA linear on x2d [T, K] -> [T, N] in x's dtype (autograd-aware; see the module docstring).

    ``probs`` (sentence routing): float32 [T, E] per-token probabilities, ``router`` then unused.
    ``schedule``: "auto" (:func:`choose_schedule`), "fused" or "two_kernel" (the forward; the backward
    is the same for both). The base weight is frozen: a ``weight`` that requires grad raises
    ``NotImplementedError``.
    """
    _check_kernel_inputs(x2d, weight, bias, lora_a, lora_b, router, probs)
    if schedule != "auto" and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be 'auto' or one of {SCHEDULES}, got {schedule!r}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "molora_linear Triton kernels treat the base weight as frozen: weight.requires_grad must be False"
        )
    return _apply(x2d, weight, bias, None, lora_a, lora_b, router, probs, scale, top_k, renormalize, schedule)


def molora_adapter(
    x2d: torch.Tensor,
    base: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    router: torch.Tensor | None,
    probs: torch.Tensor | None,
    scale: float,
    top_k: int | None,
    renormalize: bool,
) -> torch.Tensor:
    """The adapter-only op on x2d [T, K] -> [T, N] in x's dtype: base [T, N] (a frozen layer's own output,
    e.g. a quantized linear's; None: zeros) + scale·Σ_e p_e (x A_e) B_e. The shrink kernel (router, U, U′),
    then the expand GEMM with no base reduction (K = 0) whose epilogue adds ``base``; the backward is
    molora_linear's without the dy·W term, and ``base`` gets dy."""
    _check_base(x2d, base, lora_b.shape[2])
    _check_kernel_inputs(x2d, None, None, lora_a, lora_b, router, probs)
    return _apply(x2d, None, None, base, lora_a, lora_b, router, probs, scale, top_k, renormalize, "two_kernel")
