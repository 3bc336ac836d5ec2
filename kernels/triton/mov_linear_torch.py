"""PyTorch launcher and autograd of the fused MoV linear (:mod:`.mov_linear`: the kernels, the math and the
framework-neutral launch plan this launcher runs). Loaded by :mod:`.mov_linear` when torch is installed; its
names (``mov_linear``, ``mov_linear_forward`` / ``mov_linear_backward``, the custom ops) are read as attributes
of that module."""

from __future__ import annotations

import torch
import triton

from pemoe.kernels.triton import mov_linear as plan_module
from pemoe.kernels.triton.autograd import absent, launch_device
from pemoe.kernels.triton.interpreter import INTERPRET
from pemoe.kernels.triton.mov_linear import (
    _Problem,
    backward_constexprs,
    backward_grid,
    backward_needs,
    backward_outputs,
    forward_constexprs,
    forward_grid,
    forward_group_rows,
    legal_config,
    mov_linear_bwd_kernel,
    mov_linear_fwd_kernel,
    plan_problem,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ------------------------------------------------------------------------------------------
# Launcher: validate, allocate, grid, launch
# ------------------------------------------------------------------------------------------


def _problem(x2d, weight, bias, router, experts, probs, top_k, renormalize) -> _Problem:
    """Validates the kernel-specific limits (pemoe.ops has checked shapes) and describes the launch."""
    runs_on = "cpu" if INTERPRET else "cuda"
    if x2d.device.type != runs_on:
        raise NotImplementedError(
            f"mov_linear (triton) runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); "
            f"TRITON_INTERPRET={int(INTERPRET)} and x is on {x2d.device}"
        )
    tensors = (("weight", weight), ("bias", bias), ("router", router), ("experts", experts), ("probs", probs))
    for name, t in tensors:
        if t is not None and t.device != x2d.device:
            raise ValueError(f"mov_linear (triton): {name} is on {t.device}, x on {x2d.device}")
    if x2d.dim() != 2 or weight.dim() != 2 or experts.dim() != 3:
        raise ValueError("mov_linear (triton): expects x [T, K], weight [N, K], experts [G, E, D]")
    if x2d.dtype not in SUPPORTED_DTYPES:
        raise NotImplementedError(
            f"mov_linear (triton) supports float16, bfloat16 and float32 activations, got {x2d.dtype}"
        )
    if weight.dtype != x2d.dtype or (bias is not None and bias.dtype != x2d.dtype):
        raise TypeError("mov_linear (triton): x, weight and bias must share one dtype")
    for name, t in (("router", router), ("experts", experts), ("probs", probs)):
        if t is not None and t.dtype != torch.float32:
            raise NotImplementedError(
                f"mov_linear (triton): {name} must be float32 (adapter parameters), got {t.dtype}"
            )
    return plan_problem(
        x2d.shape[0],
        x2d.shape[1],
        weight.shape[0],
        tuple(experts.shape),
        router_shape=None if router is None else tuple(router.shape),
        probs_shape=None if probs is None else tuple(probs.shape),
        top_k=top_k,
        renormalize=renormalize,
        itemsize=x2d.element_size(),
        l2_bytes=_l2_bytes(x2d.device),
    )


def _l2_bytes(device: torch.device) -> int:
    """The device's L2 size (DEFAULT_L2_BYTES under the interpreter; read at each call: tests lower it)."""
    if device.type != "cuda":
        return plan_module.DEFAULT_L2_BYTES
    return torch.cuda.get_device_properties(device).L2_cache_size or plan_module.DEFAULT_L2_BYTES


def _launch(kernel, grid, args: list, constexprs: dict, config: dict | None):
    """Launches through the autotuner, or with an explicit tile configuration (tests, benchmarks)."""
    if config is None:
        kernel[grid](*args, **constexprs)
    else:
        tiles = {k: v for k, v in config.items() if k in kernel.fn.arg_names}  # GROUP_M is forward_group_rows'
        launch = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
        kernel.fn[grid](*args, **constexprs, **tiles, **launch)


def mov_linear_forward(x2d, weight, bias, router, experts, probs, pb: _Problem, save_p_soft: bool, config=None):
    """Launches the forward kernel; returns (y [T, N] in x's dtype, p_soft [T, G, E] float32 or None)."""
    constexprs = forward_constexprs(pb, bias is not None, save_p_soft)
    y = torch.empty((pb.T, pb.N), dtype=x2d.dtype, device=x2d.device)
    save = constexprs["SAVE_P_SOFT"]
    p_soft = torch.empty((pb.T, pb.G, pb.E), dtype=torch.float32, device=x2d.device) if save else None
    if pb.T == 0:
        return y, p_soft
    grid = lambda meta: forward_grid(pb, meta)  # noqa: E731
    args = [
        x2d, weight, bias, router, experts, probs,
        y, p_soft,
        pb.T, pb.N, pb.K, pb.G, pb.E, pb.m_bucket,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        forward_group_rows(pb, config),
    ]  # fmt: skip
    _launch(mov_linear_fwd_kernel, grid, args, constexprs, config)
    return y, p_soft


def mov_linear_backward(x2d, weight, bias, router, experts, probs, p_soft, dy, pb: _Problem, needs, config=None):
    """Launches the backward kernel and finishes the reductions.

    needs = (dh, d_experts, d_routing); returns (dh [T, N], d_experts [G, E, D], d_router [D, E],
    d_probs [T, E]) with None where not needed (d_router for token routing, d_probs for sentence routing).
    When the plan says so (``pb.h_from_gemm``), h = x·Wᵀ + b [T, N] comes from one torch GEMM in the
    activation dtype first (cuBLAS, large tiles), is read by the kernel and freed on return.
    """
    need_dh, need_experts, need_routing = backward_needs(pb, needs)
    dev = x2d.device

    def allocate(spec):
        if spec is None:
            return None
        shape, dtype, zeroed = spec
        dtype = x2d.dtype if dtype == "act" else torch.float32
        return (torch.zeros if zeroed else torch.empty)(shape, dtype=dtype, device=dev)

    outputs = backward_outputs(pb, needs)  # zero-filled where only some slots are written
    dh, d_experts_part, d_router_part, d_probs_part = (allocate(spec) for spec in outputs.values())
    if pb.T > 0 and (need_dh or need_experts or need_routing):
        h = torch.nn.functional.linear(x2d, weight, bias) if pb.h_from_gemm else None
        grid = lambda meta: backward_grid(pb, meta)  # noqa: E731
        args = [
            x2d, weight, bias, router, experts, probs, p_soft, dy, h,
            dh, d_experts_part, d_router_part, d_probs_part,
            pb.T, pb.N, pb.K, pb.G, pb.E, pb.m_bucket,
            x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), dy.stride(0), dy.stride(1),
        ]  # fmt: skip
        constexprs = backward_constexprs(pb, bias is not None, needs)
        _launch(mov_linear_bwd_kernel, grid, args, constexprs, config)
    d_experts = d_router = d_probs = None
    if need_experts:
        d_experts = d_experts_part.sum(0) if pb.T else torch.zeros((pb.G, pb.E, pb.D), dtype=torch.float32, device=dev)
    if d_router_part is not None:
        d_router = d_router_part.sum((0, 1))
    if d_probs_part is not None:
        d_probs = d_probs_part.sum(0)
    return dh, d_experts, d_router, d_probs


# ------------------------------------------------------------------------------------------
# Autograd: torch.library custom ops (opaque to torch.compile; their fake kernels give the output
# shapes from the input shapes alone, so tracing never reads autotune state) and the entry point
# ------------------------------------------------------------------------------------------

Tensor = torch.Tensor

#: Keys of a forced tile configuration, in the order the custom ops take them as a list of ints.
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def _config_list(config: dict | None) -> list[int] | None:
    if config is None:
        return None
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"mov_linear (triton): unknown config keys {sorted(unknown)}; expected some of {CONFIG_KEYS}")
    return [int(config.get(k, -1)) for k in CONFIG_KEYS]


def _config_dict(values: list[int] | None) -> dict | None:
    return None if values is None else {k: v for k, v in zip(CONFIG_KEYS, values, strict=True) if v >= 0}


def _saves_p_soft(router: Tensor | None, probs: Tensor | None, save: bool) -> bool:
    """p_soft is written for the backward with token routing only (sentence routing gets probs; (IA)3 has none)."""
    return save and router is not None and probs is None


@torch.library.custom_op("pemoe::triton_mov_linear", mutates_args=())
def _forward_op(
    x2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    router: Tensor | None,
    experts: Tensor,
    probs: Tensor | None,
    top_k: int | None,
    renormalize: bool,
    save: bool,
    config: list[int] | None,
) -> tuple[Tensor, Tensor]:
    """(y [T, N] in x's dtype, p_soft [T, G, E] float32 when saved for the backward, else empty)."""
    with launch_device(x2d.device):
        pb = _problem(x2d, weight, bias, router, experts, probs, top_k, renormalize)
        y, p_soft = mov_linear_forward(x2d, weight, bias, router, experts, probs, pb, save, _config_dict(config))
    return y, (p_soft if p_soft is not None else absent(x2d))


@_forward_op.register_fake
def _(x2d, weight, bias, router, experts, probs, top_k, renormalize, save, config):
    G, E, _ = experts.shape
    y = x2d.new_empty((x2d.shape[0], weight.shape[0]))
    if _saves_p_soft(router, probs, save):
        return y, x2d.new_empty((x2d.shape[0], G, E), dtype=torch.float32)
    return y, absent(x2d)


@torch.library.custom_op("pemoe::triton_mov_linear_backward", mutates_args=())
def _backward_op(
    dy: Tensor,
    x2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    router: Tensor | None,
    experts: Tensor,
    probs: Tensor | None,
    p_soft: Tensor | None,
    top_k: int | None,
    renormalize: bool,
    needs: list[bool],
    config: list[int] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dh [T, N], d_experts [G, E, D], d_router [D, E], d_probs [T, E]) for needs = (dh, d experts,
    d routing); the ones not computed (not needed, or not this routing's) are empty."""
    with launch_device(x2d.device):
        pb = _problem(x2d, weight, bias, router, experts, probs, top_k, renormalize)
        grads = mov_linear_backward(
            x2d, weight, bias, router, experts, probs, p_soft, dy, pb, tuple(needs), _config_dict(config)
        )
    return tuple(g if g is not None else absent(x2d) for g in grads)


@_backward_op.register_fake
def _(dy, x2d, weight, bias, router, experts, probs, p_soft, top_k, renormalize, needs, config):
    need_dh, need_experts, need_routing = needs
    token, sentence = router is not None and probs is None, probs is not None
    G, E, D = experts.shape
    f32 = dict(dtype=torch.float32)
    return (
        x2d.new_empty((x2d.shape[0], weight.shape[0])) if need_dh else absent(x2d),
        x2d.new_empty((G, E, D), **f32) if need_experts else absent(x2d),
        x2d.new_empty((D, E), **f32) if need_routing and token else absent(x2d),
        x2d.new_empty((x2d.shape[0], E), **f32) if need_routing and sentence else absent(x2d),
    )


def _setup_context(ctx, inputs, output):
    x2d, weight, bias, router, experts, probs, top_k, renormalize, save, config = inputs
    p_soft = output[1] if _saves_p_soft(router, probs, save) else None
    ctx.save_for_backward(x2d, weight, bias, router, experts, probs, p_soft)
    ctx.args = (top_k, renormalize, config)


@torch.autograd.function.once_differentiable  # the kernels' backward is not itself differentiable
def _backward(ctx, dy, _d_p_soft):
    x2d, weight, bias, router, experts, probs, p_soft = ctx.saved_tensors
    top_k, renormalize, config = ctx.args
    need_x, _, need_b, need_router, need_experts, need_probs = ctx.needs_input_grad[:6]
    needs = [need_x or need_b, need_experts, need_router or need_probs]
    dh, d_experts, d_router, d_probs = torch.ops.pemoe.triton_mov_linear_backward(
        dy, x2d, weight, bias, router, experts, probs, p_soft, top_k, renormalize, needs, config
    )
    token, sentence = router is not None and probs is None, probs is not None
    dx = torch.matmul(dh, weight) if need_x else None
    db = dh.sum(0, dtype=torch.float32).to(bias.dtype) if need_b else None
    return (
        dx,
        None,
        db,
        d_router if need_router and token else None,
        d_experts if need_experts else None,
        d_probs if need_probs and sentence else None,
        None,
        None,
        None,
        None,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def mov_linear(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    router: torch.Tensor | None,
    experts: torch.Tensor,
    probs: torch.Tensor | None,
    top_k: int | None,
    renormalize: bool,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """y [T, N] = mov(x2d [T, K] · weight [N, K]ᵀ + bias) with the fused Triton kernels (autograd-aware).

    router [D, E] float32 (None for (IA)3), experts [G, E, D] float32, probs [T, E] float32 for sentence
    routing (used instead of router logits; its gradient is returned). x2d and weight may be strided
    (the kernels take their strides); bias, router, experts and probs are made contiguous here (they are
    small). ``config`` (tests, benchmarks) forces one tile configuration, e.g. ``{"BLOCK_M": 16,
    "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}``, for both kernels; it must satisfy
    :func:`legal_config`. ``"GROUP_M"`` in it forces the forward's program groups to that many row tiles
    (otherwise :func:`group_rows` sizes them from the L2).
    """
    pb = _problem(x2d, weight, bias, router, experts, probs, top_k, renormalize)  # the limits, before any launch
    if config is not None:
        tiles = triton.Config(
            {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")},
            num_stages=config.get("num_stages", 3),
        )
        legal = (
            legal_config(tiles, pb.D, pb.block_e, pb.m_bucket, pb.itemsize, bwd, h_from_gemm=bwd and pb.h_from_gemm)
            for bwd in (False, True)
        )
        if not all(legal):
            raise ValueError(f"mov_linear (triton): config {config} is not legal for D={pb.D} (see legal_config)")
    if weight.requires_grad and torch.is_grad_enabled():  # checked here: the custom op runs below autograd
        raise NotImplementedError(
            "mov_linear (triton): the base weight is frozen in these kernels (no weight gradient); "
            "call weight.requires_grad_(False) or run under torch.no_grad()"
        )
    contiguous = [t.contiguous() if t is not None else None for t in (bias, router, experts, probs)]
    bias, router, experts, probs = contiguous
    # grad mode, not requires_grad alone: under torch.no_grad() nothing is saved (p_soft is 31 % more output)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x2d, bias, router, experts, probs)
    )
    y, _ = torch.ops.pemoe.triton_mov_linear(
        x2d, weight, bias, router, experts, probs, top_k, renormalize, save, _config_list(config)
    )
    return y
