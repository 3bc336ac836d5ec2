"""``implementation="pallas"``: Pallas kernels (``pemoe.kernels.pallas``) wrapped for autodiff.

``mov_linear``: the forward is the fused Pallas kernel (one GEMM with the MoV epilogue; it writes
only y). The backward is explicit XLA: it recomputes h = x Wᵀ + b (one GEMM) and runs the
``"xla"`` MoV backward of :mod:`pemoe.jax.xla` (which recomputes p from h). Saved for the
backward: the op's inputs only — no [T, N] tensor and no probabilities, at the price of that
recomputed GEMM. (A Pallas backward kernel does not exist yet.) The kernel lowers for TPU (Mosaic,
``kernels/pallas/mov_linear.py``) and for GPU (Triton, ``kernels/pallas/mov_linear_gpu.py``: ``backend="gpu"``,
the default on the gpu JAX backend).

``molora_linear``: the forward is the one fused Pallas kernel (base GEMM, shrink + router on the same
x tiles, float32 softmax / top-k, the expand as extra K; ``kernels/pallas/molora_linear.py``), which
also saves U = x·A_cat [T, E·r] and p_soft [T, E] (float32). The backward on TPU is a Pallas dgrad
kernel mirroring the forward (``molora_linear_bwd``): dx = dy·W with dU·A_catᵀ + d logits·routerᵀ as
extra K, where the first column of dx tiles also reduces G = dy·B_catᵀ from the same dy tiles and forms
dU = scale·G·p, dp and d logits (top-k / softmax backward) once per row block — dy is read as a plain
dgrad reads it, and no [T, K] float32 partial is materialised (the "xla" backward reads dy three times and
adds two float32 [T, K] products). It also writes dU and d logits; the remaining adapter gradients are
thin GEMMs over T left to XLA: [d A_cat | d router] = x32ᵀ [dU | d logits] (one read of x) and
d B_cat = scale·U′ᵀ dy (one more read of dy; a [P, N] accumulator resident across the row blocks would
serialise the grid's parallel axis), d bias = Σ_t dy. On GPU (``backend="gpu"``,
``kernels/pallas/molora_linear_gpu.py``) the forward lowers through Triton and the backward is the
``"xla"`` one of :mod:`pemoe.jax.xla` from the same residuals.

``mov_ffn``: the forward is the two Pallas kernels of ``kernels/pallas/mov_ffn.py`` — (a) the dual GEMM
writing u = act(h0) ⊙ g and the float32 probabilities p [T, E], (b) the wo GEMM with the expert merge
as its A-operand prologue; top-k selection (or sentence routing's given probabilities) happens on the
[T, E] array between them. The backward is explicit XLA from residuals the forward kernel (a) writes
when differentiated: h0 = x·wi_0ᵀ and g = x·wi_1ᵀ in x's dtype and p_soft [T, E] float32. Why save h0
and g rather than recompute them: both are needed (act'(h0), the router input a = act(h0), da = du ⊙ g,
dg = du ⊙ a), so recomputing costs the dual GEMM — two of a training step's six GEMMs, +33 % — while
keeping them costs no more memory than a plain frozen FFN's autodiff keeps (h0 and g; a and z are
recomputed element-wise here). The backward then runs exactly the GEMMs of a plain FFN's (dz = dy·wo,
dx = dh0·wi_0 + dg·wi_1) plus rank-E ones; a fused Pallas backward could save re-reading dz and the
residuals once but would need two passes (the router backward reduces over all of F before da).
Without differentiation (inference), (a) writes only u and p. The kernels lower for TPU (Mosaic) and
for GPU (Triton: ``backend="gpu"``, the default on the gpu JAX backend).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from pemoe.jax import reference, xla

__all__ = ["mov_linear", "molora_linear", "mov_ffn"]


def _xla_mov_linear(x, weight, bias, router, experts):
    return xla.mov_site(reference.linear(x, weight, bias), router, experts)


def _default_backend() -> str:
    """The kernels' lowering when none is given: "gpu" on the gpu JAX backend, else "tpu" (also in the interpreter)."""
    return "gpu" if jax.default_backend() == "gpu" else "tpu"


def _mov_kernel(backend: str):
    """The Pallas MoV-linear kernel module: "tpu" (Mosaic, one tile of whole heads, K on a grid axis) or "gpu"
    (Pallas' Triton lowering, ``kernels/pallas/mov_linear_gpu.py``: one head per tile, K looped inside)."""
    if backend == "tpu":
        from pemoe.kernels.pallas import mov_linear as kernel
    elif backend == "gpu":
        from pemoe.kernels.pallas import mov_linear_gpu as kernel
    else:
        raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
    return kernel


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _mov_linear(x, weight, bias, router, experts, interpret, backend):
    return _mov_kernel(backend).mov_linear(x, weight, bias, router, experts, interpret=interpret)


def _mov_linear_fwd(x, weight, bias, router, experts, interpret, backend):
    y = _mov_linear(x, weight, bias, router, experts, interpret, backend)
    return y, (x, weight, bias, router, experts)


def _mov_linear_bwd(interpret, backend, res, dy):
    _, vjp = jax.vjp(_xla_mov_linear, *res)
    return vjp(dy)


_mov_linear.defvjp(_mov_linear_fwd, _mov_linear_bwd)


def mov_linear(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    router: jax.Array | None,
    experts: jax.Array,
    *,
    top_k: int | None = None,
    interpret: bool = False,
    backend: str | None = None,
) -> jax.Array:
    """mov(x Wᵀ + b) on flattened x [T, K] with the Pallas forward; top-k raises NotImplementedError.

    backend: the kernel's lowering, "tpu" (Mosaic) or "gpu" (Triton); default "gpu" on the gpu JAX backend,
    else "tpu" (also in the interpreter).
    """
    if top_k is not None:
        raise NotImplementedError("mov_linear: implementation='pallas' does not support top-k routing yet")
    backend = backend or _default_backend()
    _mov_kernel(backend)  # an unknown backend raises here
    return _mov_linear(x, weight, bias, router, experts, interpret, backend)


# ------------------------------------------------------------------------------------------
# molora_linear: Pallas forward (saves U and p_soft), XLA backward
# ------------------------------------------------------------------------------------------


def _molora_kernel(backend: str):
    """The Pallas kernel module for a backend: "tpu" (Mosaic) or "gpu" (Pallas' Triton lowering)."""
    if backend == "tpu":
        from pemoe.kernels.pallas import molora_linear as kernel
    elif backend == "gpu":
        from pemoe.kernels.pallas import molora_linear_gpu as kernel
    else:
        raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
    return kernel


@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _molora_linear(x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize, interpret, backend):
    return _molora_kernel(backend).molora_linear(
        x, weight, bias, lora_a, lora_b, router, probs,
        scale=scale, top_k=top_k, renormalize=renormalize, interpret=interpret,
    )  # fmt: skip


def _molora_linear_fwd(x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize, interpret, backend):
    y, u, p_soft = _molora_kernel(backend).molora_linear(
        x, weight, bias, lora_a, lora_b, router, probs,
        scale=scale, top_k=top_k, renormalize=renormalize, interpret=interpret, save_residuals=True,
    )  # fmt: skip
    return y, ((x, weight, lora_a, lora_b, router, probs, p_soft, u), bias)


def _molora_pallas_backward(scale, top_k, renormalize, interpret, res, dy):
    """TPU: the Pallas dgrad kernel (dx with dU·A_catᵀ + d logits·routerᵀ as extra K; dU and d logits out),
    then the thin adapter GEMMs over T in XLA: [d A_cat | d router] = x32ᵀ [dU | d logits], d B_cat = scale·U′ᵀ dy."""
    from pemoe.kernels.pallas import molora_linear as kernel

    x, weight, lora_a, lora_b, router, probs, p_soft, u = res
    num_experts, k, rank = lora_a.shape
    dx, du, d_col = kernel.molora_linear_bwd(
        dy, weight, lora_a, lora_b, router, probs, u, p_soft,
        scale=scale, top_k=top_k, renormalize=renormalize, interpret=interpret,
    )  # fmt: skip
    f32 = jnp.float32
    token = router is not None and probs is None
    d_cols = jnp.concatenate([du, d_col], axis=1) if token else du
    d_params = jnp.matmul(x.astype(f32).T, d_cols, preferred_element_type=f32)  # [K, E·r (+ E)]
    d_a = d_params[:, : num_experts * rank].reshape(k, num_experts, rank).transpose(1, 0, 2)
    d_router = d_params[:, num_experts * rank :].astype(router.dtype) if token else None
    d_probs = d_col.astype(probs.dtype) if probs is not None else None
    p = probs.astype(f32) if probs is not None else None if p_soft is None else xla.select(p_soft, top_k, renormalize)
    u_scaled = u if p is None else (u.reshape(-1, num_experts, rank) * p[:, :, None]).reshape(u.shape)
    d_b = scale * jnp.matmul(u_scaled.astype(dy.dtype).T, dy, preferred_element_type=f32)
    d_w = jnp.matmul(dy.T, x, preferred_element_type=f32).astype(weight.dtype)  # frozen: dead code under jit
    return dx, d_w, d_a.astype(lora_a.dtype), d_b.reshape(lora_b.shape).astype(lora_b.dtype), d_router, d_probs


def _molora_linear_bwd(scale, top_k, renormalize, interpret, backend, res, dy):
    core_res, bias = res
    if backend == "tpu":
        grads = _molora_pallas_backward(scale, top_k, renormalize, interpret, core_res, dy)
    else:  # the "xla" MoLoRA backward, fed the GPU kernel's residuals (same layout as xla._molora_core_fwd's)
        grads = xla._molora_core_bwd(scale, top_k, renormalize, core_res, dy)
    dx, d_w, d_a, d_b, d_router, d_probs = grads
    d_bias = None if bias is None else dy.astype(jnp.float32).sum(axis=0).astype(bias.dtype)
    return dx, d_w, d_bias, d_a, d_b, d_router, d_probs


_molora_linear.defvjp(_molora_linear_fwd, _molora_linear_bwd)


def molora_linear(
    x: jax.Array,
    weight: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    router: jax.Array | None,
    *,
    scale: float,
    bias: jax.Array | None = None,
    probs: jax.Array | None = None,
    top_k: int | None = None,
    renormalize: bool = False,
    interpret: bool = False,
    backend: str | None = None,
) -> jax.Array:
    """x Wᵀ + b + scale·Σ_e p_e (x A_e) B_e on flattened x [T, K] ([T, N] out) with the Pallas forward.

    backend: the kernels' lowering, "tpu" (Mosaic forward and backward kernels) or "gpu" (the forward written
    for Pallas' Triton lowering, ``kernels/pallas/molora_linear_gpu.py``, with the XLA backward); default
    "gpu" on the gpu JAX backend, else "tpu" (also in the interpreter).

    router [K, E] (token routing; top-k supported), or probs [T, E] (sentence routing, router None), or
    neither (LoRA, E = 1). Every input gets a gradient (the XLA backward), the frozen weight's included.
    """
    backend = backend or ("gpu" if jax.default_backend() == "gpu" else "tpu")
    _molora_kernel(backend)  # an unknown backend raises here
    return _molora_linear(
        x, weight, bias, lora_a, lora_b, router, probs, float(scale), top_k, renormalize, interpret, backend
    )


# ------------------------------------------------------------------------------------------
# mov_ffn: Pallas forward (kernels (a) and (b); (a) saves h0, g and p_soft), XLA backward
# ------------------------------------------------------------------------------------------


def _ffn_probs(p_pad, probs, num_experts, top_k, renormalize):
    """(p_soft [T, E] or None, the routing weights kernel (b) reads: [T, E_pad] / [T, E] or None)."""
    if probs is not None:  # sentence routing: given, top-k already applied by the caller
        return None, probs
    if p_pad is None:  # (IA)3
        return None, None
    if top_k is None or top_k == num_experts:
        return p_pad[:, :num_experts], p_pad  # padded lanes are exactly 0: (b) reads p_pad as is
    p_soft = p_pad[:, :num_experts]
    return p_soft, xla.select(p_soft, top_k, renormalize)


def _ffn_forward(x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize, kernel_kw, save):
    from pemoe.kernels.pallas import mov_ffn as kernel

    blocks, backend, interpret = kernel_kw
    kw = dict(blocks=blocks, backend=backend, interpret=interpret)
    num_experts = experts.shape[1]
    up = kernel.mov_ffn_up(
        x, wi_0, wi_1, None if probs is not None else router,
        num_experts=num_experts, activation=activation, save_residuals=save, **kw,
    )  # fmt: skip
    p_soft, p = _ffn_probs(up.p, probs, num_experts, top_k, renormalize)
    y = kernel.mov_ffn_down(up.u, p, experts, wo, **kw)
    return y, (up.h0, up.g, p_soft)


@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _mov_ffn(x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize, kernel_kw):
    args = (x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize, kernel_kw)
    return _ffn_forward(*args, save=False)[0]


def _mov_ffn_fwd(x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize, kernel_kw):
    args = (x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize, kernel_kw)
    y, (h0, g, p_soft) = _ffn_forward(*args, save=True)
    return y, (x, wi_0, wi_1, wo, router, experts, probs, h0, g, p_soft)


def _matmul(a, b, out_dtype):
    """a @ b with float32 accumulation, in out_dtype."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _mov_ffn_bwd(activation, top_k, renormalize, kernel_kw, res, dy):
    """XLA backward from the kernel's residuals (no GEMM is recomputed), cd = float32:
    a = act(h0), u = a ⊙ g, s = p·experts[0], z = u ⊙ s (x's dtype)
    dz = dy·wo; ds = dz ⊙ u; d experts = pᵀ·ds; dp = ds·experts[0]ᵀ; dlogits = softmax/top-k backward
    du = dz ⊙ s; da = du ⊙ g + dlogits·routerᵀ; dg = du ⊙ a; dh0 = da ⊙ act'(h0); d router = a32ᵀ·dlogits
    dx = dh0·wi_0 + dg·wi_1; d wi_0 = dh0ᵀ·x; d wi_1 = dgᵀ·x; d wo = dyᵀ·z (frozen weights: dead code under
    jax.jit unless asked for); d probs = dp (sentence routing).
    """
    x, wi_0, wi_1, wo, router, experts, probs, h0, g, p_soft = res
    dt, cd = x.dtype, jnp.float32
    a, act_vjp = jax.vjp(reference.ACTIVATIONS[activation], h0.astype(cd))
    u = a if g is None else a * g.astype(cd)
    if probs is not None:
        p = probs.astype(cd)
    elif router is not None:
        p = xla.select(p_soft, top_k, renormalize)
    else:
        p = None
    ex = experts[0].astype(cd)  # [E, F]
    s = ex[0][None, :] if p is None else p @ ex
    dz = _matmul(dy, wo, cd)  # [T, F]
    ds = dz * u
    d_experts = (ds.sum(axis=0)[None, :] if p is None else p.T @ ds)[None].astype(experts.dtype)
    du = dz * s
    da = du if g is None else du * g.astype(cd)
    d_router = d_probs = None
    if p is not None:
        dp = ds @ ex.T  # [T, E]
        if probs is not None:
            d_probs = dp.astype(probs.dtype)
        else:
            dlogits = xla.probs_backward(dp, p_soft, top_k, renormalize)
            d_router = (a.astype(dt).astype(cd).T @ dlogits).astype(router.dtype)  # the router reads a in x's dtype
            da = da + dlogits @ router.astype(cd).T
    (dh0,) = act_vjp(da)
    dh0 = dh0.astype(dt)
    dx = _matmul(dh0, wi_0, cd)
    d_wi_0 = _matmul(dh0.T, x, wi_0.dtype)
    d_wi_1 = None
    if g is not None:
        dg = (du * a).astype(dt)
        dx = dx + _matmul(dg, wi_1, cd)
        d_wi_1 = _matmul(dg.T, x, wi_1.dtype)
    d_wo = _matmul(dy.T, (u * s).astype(dt), wo.dtype)
    return dx.astype(dt), d_wi_0, d_wi_1, d_wo, d_router, d_experts, d_probs


_mov_ffn.defvjp(_mov_ffn_fwd, _mov_ffn_bwd)


def mov_ffn(
    x: jax.Array,
    wi_0: jax.Array,
    wo: jax.Array,
    router: jax.Array | None,
    experts: jax.Array,
    *,
    wi_1: jax.Array | None = None,
    activation: str = "gelu_new",
    probs: jax.Array | None = None,
    top_k: int | None = None,
    renormalize: bool = False,
    blocks=None,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """(mov(act(x wi_0ᵀ)) [⊙ x wi_1ᵀ])·woᵀ on flattened x [T, M] ([T, M] out) with the Pallas forward.

    wi_0, wi_1 [F, M], wo [M, F] (x's dtype); router [F, E] float32 (token routing; top-k applied to the
    kernel's float32 probabilities between its two kernels), or probs [T, E] (sentence routing, router
    None), or neither ((IA)3, E = 1); experts [1, E, F] float32. ``backend``: the kernels' lowering, "tpu"
    (Mosaic) or "gpu" (Triton); default "gpu" on the gpu JAX backend, else "tpu" (also in the interpreter).
    ``blocks``: the backend's ``MoVFFNBlocks`` / ``MoVFFNTritonBlocks`` (default: its ``get_default*``).
    Every input gets a gradient (the XLA backward), the frozen weights' included.
    """
    backend = backend or ("gpu" if jax.default_backend() == "gpu" else "tpu")
    routing = ("probs", probs) if probs is not None else ("router", router)
    if routing[1] is not None and experts.ndim == 3 and routing[1].shape[-1] != experts.shape[1]:
        raise ValueError(
            f"experts must be [1, E, F] with E = {routing[1].shape[-1]} (the {routing[0]}'s E), got shape "
            f"[{', '.join(map(str, experts.shape))}]"
        )
    kernel_kw = (blocks, backend, interpret)
    return _mov_ffn(x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize, kernel_kw)
