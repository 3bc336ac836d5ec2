"""PyTorch launcher and autograd of the fused MoV T5 feed-forward block (:mod:`.mov_ffn`: the kernels, the math
and the framework-neutral launch plan this launcher runs). Loaded by :mod:`.mov_ffn` when torch is installed;
its names (``mov_ffn``, the custom ops) are read as attributes of that module."""

from __future__ import annotations

import torch

from pemoe.kernels.triton.autograd import absent, allocate, launch_device, run_launch
from pemoe.kernels.triton.interpreter import INTERPRET
from pemoe.kernels.triton.mov_ffn import (
    ACTIVATIONS,
    ROUTE_GIVEN,
    ROUTE_NONE,
    ROUTE_SELF,
    Problem,
    backward_needs,
    down_backward_launch,
    down_launch,
    plan_problem,
    router_backward_launch,
    routing_mode,
    up_backward_launch,
    up_launch,
)
from pemoe.kernels.triton.plan import dtype_name

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ------------------------------------------------------------------------------------------
# Launcher: validate, plan, allocate, launch
# ------------------------------------------------------------------------------------------


def _check_inputs(
    x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, *, check_device: bool = True
) -> tuple[int, int, int, int]:
    """Clear errors for what these kernels do not support; returns (T, M, F, E). ``check_device=False``:
    shapes and dtypes only."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"mov_ffn (triton): activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"mov_ffn (triton): x must be a 2-D tensor [T, M], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"mov_ffn (triton): x has dtype {x.dtype}; the kernels support {[str(d) for d in SUPPORTED_DTYPES]}"
        )
    want = "cuda" if not INTERPRET else "cpu"
    tensors = dict(x=x, wi_0=wi_0, wi_1=wi_1, wo=wo, router=router, experts=experts, probs=probs)
    for name, t in tensors.items():
        if check_device and t is not None and t.device.type != want:
            raise NotImplementedError(
                f"mov_ffn (triton): {name} is on {t.device.type}; the kernels run on {want} tensors"
                + (" (TRITON_INTERPRET=1 is set)" if INTERPRET else "")
            )
    T, M = x.shape
    if M == 0:
        raise ValueError(f"mov_ffn (triton): x must have M >= 1 features, got {list(x.shape)}")
    if wi_0.dim() != 2 or wi_0.shape[1] != M:
        raise ValueError(f"mov_ffn (triton): wi_0 must have shape [F, M] = [F, {M}], got {list(wi_0.shape)}")
    F = wi_0.shape[0]
    for name, w, shape in (("wi_0", wi_0, (F, M)), ("wi_1", wi_1, (F, M)), ("wo", wo, (M, F))):
        if w is None:
            continue
        if tuple(w.shape) != shape:
            raise ValueError(f"mov_ffn (triton): {name} must have shape {list(shape)}, got {list(w.shape)}")
        if w.dtype != x.dtype:
            raise TypeError(f"mov_ffn (triton): {name} must have x's dtype {x.dtype}, got {w.dtype}")
        if w.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                f"mov_ffn (triton): {name} requires grad, but the kernels treat the base FFN weights as frozen "
                "(no weight gradient); freeze it or use implementation='torch'"
            )
    if experts.dim() != 3 or experts.shape[0] != 1 or experts.shape[2] != F:
        raise ValueError(
            f"mov_ffn (triton): experts must have shape [1, E, F] = [1, E, {F}], got {list(experts.shape)}"
        )
    E = experts.shape[1]
    if E == 0:
        raise ValueError(f"mov_ffn (triton): experts must have E >= 1 experts, got shape {list(experts.shape)}")
    for name, t in (("experts", experts), ("router", router), ("probs", probs)):
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"mov_ffn (triton): {name} must be float32 (adapter parameters), got {t.dtype}")
    if probs is None:
        if router is None and E != 1:
            raise ValueError(f"mov_ffn (triton): router [F, E] is required when E = {E} > 1")
        if router is not None and tuple(router.shape) != (F, E):
            raise ValueError(f"mov_ffn (triton): router must have shape [F, E] = [{F}, {E}], got {list(router.shape)}")
    elif tuple(probs.shape) != (T, E):
        raise ValueError(f"mov_ffn (triton): probs must have shape [T, E] = [{T}, {E}], got {list(probs.shape)}")
    # Row (token) and partial-buffer offsets are 64-bit in every kernel; within a weight the column offsets
    # (k · stride) stay 32-bit, so a frozen weight must hold fewer than 2^31 elements.
    for name, w in (("wi_0", wi_0), ("wi_1", wi_1), ("wo", wo)):
        if w is not None and w.numel() >= 2**31:
            raise ValueError(f"mov_ffn (triton): {name} has {w.numel()} elements; the kernels support < 2**31")
    if top_k is not None and not 1 <= top_k <= E:
        raise ValueError(f"mov_ffn (triton): top_k must be in [1, E = {E}], got {top_k}")
    return T, M, F, E


def _problem(x, wi_1, router, experts, probs, activation, top_k, renormalize) -> Problem:
    (T, M), (_, E, F) = x.shape, experts.shape
    return plan_problem(
        T, M, F, E, dtype_name(x.dtype), gated=wi_1 is not None, has_router=router is not None,
        has_probs=probs is not None, activation=activation, top_k=top_k, renormalize=renormalize,
    )  # fmt: skip


def _strides(**tensors: torch.Tensor | None) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.stride()) for name, t in tensors.items() if t is not None}


def _forward(x, wi_0, wi_1, wo, router, experts, probs, prob: Problem, save_p_soft: bool):
    """Launches (a) and (b); returns (y [T, M], u [T, F], p_soft [T, E] float32 or None)."""
    dev = x.device
    tensors = dict(x=x, wi_0=wi_0, wi_1=wi_1, wo=wo, router=router, experts=experts, probs=probs)
    strides = _strides(**tensors)
    buffers, up = up_launch(prob, strides)
    tensors |= allocate(buffers, dev)
    run_launch(up, tensors, dev)
    buffers, down = down_launch(prob, save_p_soft, strides)
    tensors |= allocate(buffers, dev)
    run_launch(down, tensors, dev)
    return tensors["y"], tensors["inter"], tensors.get("p_soft")


def _backward(dy, x, wi_0, wi_1, wo, router, experts, probs, inter, p_soft, prob: Problem, needs):
    """Launches (c), (r), (d) and the dx GEMMs; returns (dx, d router, d experts, d probs), None where not needed."""
    need_x, need_router, need_experts, need_probs = needs
    plan = backward_needs(prob, need_x, need_router, need_experts, need_probs)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()  # explicit: unit-stride rows for the GEMM loads
    dev = x.device
    tensors = dict(x=x, wi_0=wi_0, wi_1=wi_1, wo=wo, router=router, experts=experts, probs=probs, dy=dy,
                   inter=inter, p_soft=p_soft)  # fmt: skip
    strides = _strides(**tensors)
    # ---- (c)
    buffers, down = down_backward_launch(prob, plan["need_du"], plan["need_dp"], plan["need_dexperts"], strides)
    tensors |= allocate(buffers, dev)
    run_launch(down, tensors, dev)
    d_experts = d_probs = d_router = dx = None
    if need_experts:
        # one slot per row chunk, every one written; freed before (d) allocates its own partials
        d_experts = tensors.pop("dexperts_part").sum(0).unsqueeze(0)
        if prob.mode == ROUTE_NONE:
            d_experts = d_experts[:, :1]  # only expert row 0 is written when p ≡ 1 (E = 1)
    # ---- (r)
    if plan["need_dp"]:
        buffers, router_bwd = router_backward_launch(prob)
        tensors |= allocate(buffers, dev)
        run_launch(router_bwd, tensors, dev)
        del tensors["dp_part"]  # summed by (r): freed before (d)
        if prob.mode == ROUTE_GIVEN:
            d_probs = tensors["d_route"]
    # ---- (d) and the dx GEMMs (torch: the vendor GEMM)
    if plan["run_up_backward"]:
        buffers, up = up_backward_launch(prob, need_x, plan["need_drouter"], strides)
        tensors |= allocate(buffers, dev)
        run_launch(up, tensors, dev)
        if plan["need_drouter"]:
            d_router = tensors.pop("drouter_part").sum(0)  # one slot per row chunk, every one written
        if need_x:
            dx = tensors["dh0"] @ wi_0
            if prob.gated:
                dx.addmm_(tensors["dg"], wi_1)
    return dx, d_router, d_experts, d_probs


# ------------------------------------------------------------------------------------------
# Autograd: torch.library custom ops (opaque to torch.compile; their fake kernels give the output
# shapes from the input shapes alone, so tracing never reads autotune state) and the entry point
# ------------------------------------------------------------------------------------------

Tensor = torch.Tensor


@torch.library.custom_op("pemoe::triton_mov_ffn", mutates_args=())
def _forward_op(
    x: Tensor,
    wi_0: Tensor,
    wi_1: Tensor | None,
    wo: Tensor,
    router: Tensor | None,
    experts: Tensor,
    probs: Tensor | None,
    activation: str,
    top_k: int | None,
    renormalize: bool,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [T, M], the intermediate u [T, F] in x's dtype, p_soft [T, E] float32 when ``save`` with token
    routing, else empty). u is the wo GEMM's input, kept for the backward (under no grad it is simply freed)."""
    T, F = x.shape[0], wi_0.shape[0]
    if T == 0:  # no tokens: nothing to launch
        return x.new_empty((0, wo.shape[0])), x.new_empty((0, F)), absent(x)
    prob = _problem(x, wi_1, router, experts, probs, activation, top_k, renormalize)
    with launch_device(x.device):
        y, inter, p_soft = _forward(x, wi_0, wi_1, wo, router, experts, probs, prob, save_p_soft=save)
    return y, inter, (p_soft if p_soft is not None else absent(x))


@_forward_op.register_fake
def _(x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize, save):
    T, E = x.shape[0], experts.shape[1]
    p_soft = x.new_empty((T, E), dtype=torch.float32) if save and _saves_p_soft(router, probs) else absent(x)
    return x.new_empty((T, wo.shape[0])), x.new_empty((T, wi_0.shape[0])), p_soft


def _saves_p_soft(router: Tensor | None, probs: Tensor | None) -> bool:
    return routing_mode(router is not None, probs is not None) == ROUTE_SELF


@torch.library.custom_op("pemoe::triton_mov_ffn_backward", mutates_args=())
def _backward_op(
    dy: Tensor,
    x: Tensor,
    wi_0: Tensor,
    wi_1: Tensor | None,
    wo: Tensor,
    router: Tensor | None,
    experts: Tensor,
    probs: Tensor | None,
    inter: Tensor,
    p_soft: Tensor | None,
    activation: str,
    top_k: int | None,
    renormalize: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [T, M], d router [F, E], d experts [1, E, F], d probs [T, E]) for needs = (x, router, experts,
    probs); the ones not computed (not needed, or not this routing's) are empty."""
    need_x, need_router, need_experts, need_probs = needs
    if x.shape[0] == 0:  # no tokens: the parameter gradients are zero
        grads = (x.new_empty((0, x.shape[1])), torch.zeros_like(router) if router is not None else None,
                 torch.zeros_like(experts), torch.zeros_like(probs) if probs is not None else None)  # fmt: skip
    else:
        prob = _problem(x, wi_1, router, experts, probs, activation, top_k, renormalize)
        with launch_device(x.device):
            grads = _backward(dy, x, wi_0, wi_1, wo, router, experts, probs, inter, p_soft, prob, tuple(needs))
    return tuple(g if g is not None and need else absent(x) for g, need in zip(grads, needs, strict=True))


@_backward_op.register_fake
def _(dy, x, wi_0, wi_1, wo, router, experts, probs, inter, p_soft, activation, top_k, renormalize, needs):
    T, M, E, F = x.shape[0], x.shape[1], experts.shape[1], wi_0.shape[0]
    mode = routing_mode(router is not None, probs is not None)
    f32 = dict(dtype=torch.float32)
    return (
        x.new_empty((T, M)) if needs[0] else absent(x),
        x.new_empty((F, E), **f32) if needs[1] and mode == ROUTE_SELF else absent(x),
        x.new_empty((1, E, F), **f32) if needs[2] else absent(x),
        x.new_empty((T, E), **f32) if needs[3] and mode == ROUTE_GIVEN else absent(x),
    )


def _setup_context(ctx, inputs, output):
    x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize, save = inputs
    _, inter, p_soft = output
    p_soft = p_soft if save and _saves_p_soft(router, probs) else None
    ctx.save_for_backward(x, wi_0, wi_1, wo, router, experts, probs, inter, p_soft)
    ctx.args = (activation, top_k, renormalize)


@torch.autograd.function.once_differentiable  # the kernels' backward is not itself differentiable
def _backward_autograd(ctx, dy, _d_inter, _d_p_soft):
    x, wi_0, wi_1, wo, router, experts, probs, inter, p_soft = ctx.saved_tensors
    activation, top_k, renormalize = ctx.args
    n = ctx.needs_input_grad
    mode = routing_mode(router is not None, probs is not None)
    needs = [n[0], n[4] and mode == ROUTE_SELF, n[5], n[6] and mode == ROUTE_GIVEN]
    dx, d_router, d_experts, d_probs = torch.ops.pemoe.triton_mov_ffn_backward(
        dy, x, wi_0, wi_1, wo, router, experts, probs, inter, p_soft, activation, top_k, renormalize, needs
    )
    grads = [g if need else None for g, need in zip((dx, d_router, d_experts, d_probs), needs, strict=True)]
    dx, d_router, d_experts, d_probs = grads
    return dx, None, None, None, d_router, d_experts, d_probs, None, None, None, None


_forward_op.register_autograd(_backward_autograd, setup_context=_setup_context)


def mov_ffn(
    x2d: torch.Tensor,
    wi_0: torch.Tensor,
    wi_1: torch.Tensor | None,
    wo: torch.Tensor,
    router: torch.Tensor | None,
    experts: torch.Tensor,
    probs: torch.Tensor | None,
    activation: str,
    top_k: int | None,
    renormalize: bool,
) -> torch.Tensor:
    """Fused MoV T5 FFN on x2d [T, M] -> [T, M] in x's dtype (autograd-aware; see the module docstring).

    ``probs`` [T, E] float32 is given for sentence routing (then ``router`` is not used here);
    ``router`` is None when E = 1 ((IA)3). Strided inputs are read through their strides.
    """
    _check_inputs(x2d, wi_0, wi_1, wo, router, experts, probs, activation, top_k)
    # grad mode, not requires_grad alone: under torch.no_grad() the forward keeps nothing for a backward
    need = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2d, router, experts, probs))
    y, _, _ = torch.ops.pemoe.triton_mov_ffn(
        x2d, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize, need
    )
    return y
