"""``implementation="xla"``: the SPEC §3 reformulations in ``jnp``, with ``jax.custom_vjp`` backwards.

Functions here take flattened, validated arguments (x [T, K], h [T, G·D]); :mod:`pemoe.jax.ops`
validates, flattens and dispatches. All are traceable (use them under ``jax.jit``).

MoV site (``mov_site``), h seen as [T, G, D]:
    p_soft = softmax(h32 @ router)              [T, G, E]  float32 (one router shared by the groups)
    p      = p_soft, or its top-k part (renormalised on request)
    s      = Σ_e p[..., e] experts[:, e]         [T, G, D]  float32: the merge never forms [T, G, E, D]
    y      = h * s                              (rounded once)
  On the CPU, XLA fuses the frozen GEMM before the site (``mov_linear``) with this whole epilogue (router
  GEMM, softmax, merge, scaling) into one YNNPACK fusion: the ops are written as dots, element-wise ops and
  reductions (no einsum over G, whose batched dot runs on transposed copies outside that fusion).
  backward (custom_vjp):
    dp[t,g,e] = Σ_d dy·h·experts[g,e,d];  dlogits = top-k/softmax backward of dp (from p_soft)
    d experts = Σ_t p ⊗ (dy·h);  d router = Σ_{t,g} h ⊗ dlogits;  dh = dy·s + dlogits @ routerᵀ
  saved: h in its own dtype (the site's input) and p_soft float32 [T, G, E]; s and p are recomputed
  (a sum over E and an element-wise pass), not stored as [T, N] float32 tensors. d experts and dp
  stay batched dots over G (the product-and-reduce forms measured ~2x slower in the backward on CPU).
  Plain autodiff would instead keep h32 and s, two float32 [T, N] tensors.

``mov_linear`` = ``mov_site(x Wᵀ + b)``: the frozen GEMM and the bias go through ordinary autodiff
(their residuals are x and W, the op's own inputs), so the GEMM output h is the only [T, N] tensor kept:
cheaper to keep than to recompute (a second GEMM). ``mov_ffn`` likewise: plain autodiff for the three
GEMMs and the activation, ``mov_site`` on act(x wi_0ᵀ).

MoLoRA (``molora``), A_cat = [A_1 … A_E] ([K, E·r]), B_cat = [B_1; …; B_E] ([E·r, N]):
    p  = softmax(x32 @ router)                                [T, E] float32
    U  = x @ A_cat                                            [T, E·r] (float32 accumulation)
    U′ = U · p   (each expert's r columns scaled by its probability)
    y  = [x | U′] @ [Wᵀ ; scale·B_cat] + b                    never [T, E, N]
  The last line runs as x Wᵀ + U′ (scale·B_cat), two dots summed in float32 and rounded once (the
  same sum as SPEC §3's one GEMM of depth K + E·r, without copying x and W into concatenations).
  For float32 inputs the shrink and the router logits are one GEMM, x @ [A_cat | router].
  backward (custom_vjp):
    dU′ = scale · dy @ B_catᵀ;  d B_cat = scale · U′ᵀ dy;  dU = dU′ · p;  dp = Σ_r dU′·U
    dlogits = top-k/softmax backward of dp
    dx = dy W + [dU | dlogits] @ [A_cat | router]ᵀ;  [d A_cat | d router] = x32ᵀ [dU | dlogits]
  saved: x and the weights (inputs), U [T, E·r] float32 and p_soft [T, E] float32.
  The frozen weight's cotangent (dyᵀ x) is returned for completeness; under ``jax.jit`` XLA
  removes it when nothing asks for it (the usual case: only adapters train).
Sentence routing: probabilities [T, E] are computed outside (reference router, plain autodiff) and
passed in as ``probs``; their cotangent is returned.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from pemoe.jax.reference import compute_dtype, top_k_mask

__all__ = ["select", "probs_backward", "mov_site", "molora"]


# ------------------------------------------------------------------------------------------
# Router: top-k selection and its backward (probabilities with E on the last axis)
# ------------------------------------------------------------------------------------------


def select(p_soft: jax.Array, top_k: int | None, renormalize: bool) -> jax.Array:
    """The routing weights actually used: p_soft, or its top-k part (renormalised on request)."""
    if top_k is None or top_k == p_soft.shape[-1]:
        return p_soft
    p = p_soft * top_k_mask(p_soft, top_k)
    if renormalize:
        p = p / p.sum(axis=-1, keepdims=True)
    return p


def probs_backward(dp: jax.Array, p_soft: jax.Array, top_k: int | None, renormalize: bool) -> jax.Array:
    """d(logits) from d(p) through top-k selection and softmax."""
    dq = dp
    if top_k is not None and top_k != p_soft.shape[-1]:
        mask = top_k_mask(p_soft, top_k)
        if renormalize:
            q = p_soft * mask
            z = q.sum(axis=-1, keepdims=True)
            dq = (dp - (dp * q).sum(axis=-1, keepdims=True) / z) / z
        dq = dq * mask
    dlogits = p_soft * dq
    return dlogits - p_soft * dlogits.sum(axis=-1, keepdims=True)


def linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x Wᵀ + b, weight [N, K] (torch Linear layout), accumulated in float32 (or wider) and rounded to x's dtype.

    The frozen GEMM of the MoV ops. ``preferred_element_type`` is what lets XLA CPU run a 16-bit dot natively
    (its YNNPACK bf16 GEMM) when the weight is the transpose of a [K, N] array, as pemoe's Flax layers pass
    their kernel: measured at T5-large (T = 2048, K = N = 1024, bfloat16, 2 cores with AVX512-BF16) 5.3 ms
    against 10.4 ms for ``x @ kernel``, which XLA runs as a float32 GEMM on upcast copies. A torch-layout
    [N, K] weight gets the float32 GEMM either way. Values: the float32-accumulated product, rounded once.
    """
    y = jnp.matmul(x, weight.T, preferred_element_type=compute_dtype(x.dtype)).astype(x.dtype)
    return y if bias is None else y + bias.astype(y.dtype)


def _dot(a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
    """a @ b with float32 (or wider) accumulation, result in out_dtype."""
    acc = compute_dtype(jnp.result_type(a.dtype, b.dtype))
    return jnp.matmul(a, b, preferred_element_type=acc).astype(out_dtype)


# ------------------------------------------------------------------------------------------
# MoV site: y = h * einsum('tge,ged->tgd', p, experts)
# ------------------------------------------------------------------------------------------


def _mov_weights(h3, router, experts, probs, p_soft, top_k, renormalize):
    """Routing weights p [T, G, E] in the compute dtype, or None for (IA)3."""
    if probs is not None:  # sentence routing: one p per token, shared by the groups
        return jnp.broadcast_to(probs.astype(compute_dtype(h3.dtype))[:, None, :], h3.shape[:2] + probs.shape[-1:])
    if router is None:
        return None
    return select(p_soft, top_k, renormalize)


def _mov_scaling(p, experts, cd):
    """s[t, g, :] = Σ_e p[t, g, e] experts[g, e, :]  ([T, G, D], cd); (IA)3: experts[:, 0] broadcast.

    Written as a broadcast product summed over E, not as an einsum: XLA fuses the product into the
    reduction (no [T, G, E, D] buffer), and on the CPU it fuses the whole MoV epilogue (router GEMM,
    softmax, merge, scaling) with the frozen GEMM before it into one YNNPACK fusion. The einsum is a
    batched dot over G that XLA CPU runs on transposed copies, outside that fusion (~1.5x slower op).
    """
    if p is None:
        return experts[None, :, 0, :].astype(cd)
    return jnp.sum(p[..., None] * experts.astype(cd)[None], axis=-2)


def _mov_logits(h32, router, cd):
    """logits [T, G, E] = h32 @ router: one 2-D GEMM [T·G, D] @ [D, E] (the router is shared by the groups)."""
    t, g, d = h32.shape
    return jnp.matmul(h32.reshape(t * g, d), router.astype(cd)).reshape(t, g, router.shape[1])


def _mov_fwd_impl(h3, router, experts, probs, top_k, renormalize):
    cd = compute_dtype(h3.dtype)
    p_soft = None
    if probs is None and router is not None:
        p_soft = jax.nn.softmax(_mov_logits(h3.astype(cd), router, cd), axis=-1)
    p = _mov_weights(h3, router, experts, probs, p_soft, top_k, renormalize)
    y = (h3.astype(cd) * _mov_scaling(p, experts, cd)).astype(h3.dtype)
    return y, p_soft


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _mov_core(h3, router, experts, probs, top_k, renormalize):
    return _mov_fwd_impl(h3, router, experts, probs, top_k, renormalize)[0]


def _mov_core_fwd(h3, router, experts, probs, top_k, renormalize):
    y, p_soft = _mov_fwd_impl(h3, router, experts, probs, top_k, renormalize)
    return y, (h3, router, experts, probs, p_soft)


def _mov_core_bwd(top_k, renormalize, res, dy):
    h3, router, experts, probs, p_soft = res
    cd = compute_dtype(h3.dtype)
    p = _mov_weights(h3, router, experts, probs, p_soft, top_k, renormalize)
    h32 = h3.astype(cd)
    dy32 = dy.astype(cd)
    dy_h = dy32 * h32  # [T, G, D]
    if p is None:  # (IA)3
        d_experts = dy_h.sum(axis=0)[:, None, :]
    else:
        d_experts = jnp.einsum("tge,tgd->ged", p, dy_h)
    dh = dy32 * _mov_scaling(p, experts, cd)
    d_router = d_probs = None
    if p is not None:
        dp = jnp.einsum("ged,tgd->tge", experts.astype(cd), dy_h)  # [T, G, E]
        if probs is not None:
            d_probs = dp.sum(axis=1).astype(probs.dtype)
        else:
            dlogits = probs_backward(dp, p_soft, top_k, renormalize)  # [T, G, E]
            t, g, d = h32.shape
            flat = dlogits.reshape(t * g, dlogits.shape[-1])  # the router's GEMMs on [T·G, ·], as forward
            d_router = jnp.matmul(h32.reshape(t * g, d).T, flat).astype(router.dtype)
            dh = dh + jnp.matmul(flat, router.astype(cd).T).reshape(h32.shape)
    return dh.astype(h3.dtype), d_router, d_experts.astype(experts.dtype), d_probs


_mov_core.defvjp(_mov_core_fwd, _mov_core_bwd)


@partial(jax.jit, static_argnums=(4, 5))
def mov_site(
    h: jax.Array,
    router: jax.Array | None,
    experts: jax.Array,
    probs: jax.Array | None = None,
    top_k: int | None = None,
    renormalize: bool = False,
) -> jax.Array:
    """MoV on flattened h [T, G·D] (router [D, E] or None; probs [T, E] for sentence routing).

    Jitted as a unit: an eager call runs the same compiled epilogue as a call inside a caller's jit (XLA
    inlines it there), not ~15 separately compiled primitives whose roundings could differ from it.
    """
    groups, _, dim = experts.shape
    h3 = h.reshape(h.shape[0], groups, dim)
    return _mov_core(h3, router, experts, probs, top_k, renormalize).reshape(h.shape)


# ------------------------------------------------------------------------------------------
# MoLoRA: y = [x | U′] @ [Wᵀ ; scale·B_cat] + b
# ------------------------------------------------------------------------------------------


def _cat_a(lora_a: jax.Array) -> jax.Array:
    """[E, K, r] -> A_cat [K, E·r]."""
    num_experts, k, rank = lora_a.shape
    return lora_a.transpose(1, 0, 2).reshape(k, num_experts * rank)


def _scale_by_probs(u: jax.Array, p: jax.Array | None, num_experts: int) -> jax.Array:
    """U′[t, e·r + j] = U[t, e·r + j] · p[t, e]."""
    if p is None:
        return u
    t = u.shape[0]
    return (u.reshape(t, num_experts, u.shape[1] // num_experts) * p[:, :, None].astype(u.dtype)).reshape(u.shape)


def _molora_weights(probs, p_soft, top_k, renormalize, cd):
    if probs is not None:
        return probs.astype(cd)
    if p_soft is None:
        return None
    return select(p_soft, top_k, renormalize)


def _molora_fwd_impl(x, weight, lora_a, lora_b, router, probs, scale, top_k, renormalize):
    dt, cd = x.dtype, compute_dtype(x.dtype)
    num_experts, _, rank = lora_a.shape
    a_cat = _cat_a(lora_a)
    use_router = router is not None and probs is None
    if use_router and dt == cd:  # exact: one GEMM for the shrink and the router logits
        ul = _dot(x, jnp.concatenate([a_cat.astype(cd), router.astype(cd)], axis=1), cd)
        u, logits = ul[:, : num_experts * rank], ul[:, num_experts * rank :]
    else:
        u = _dot(x, a_cat.astype(dt), cd)
        logits = _dot(x.astype(cd), router.astype(cd), cd) if use_router else None
    p_soft = None if logits is None else jax.nn.softmax(logits, axis=-1)
    p = _molora_weights(probs, p_soft, top_k, renormalize, cd)
    u_scaled = _scale_by_probs(u, p, num_experts)
    # y = [x | U′] @ [Wᵀ ; scale·B_cat]: the base GEMM and the expand summed in the accumulation dtype and
    # rounded once. Two dots, not one over concatenated operands: XLA CPU would copy x and W into the
    # [T, K + E·r] / [N, K + E·r] concatenations on every call (measured ~5 % slower at T5-large widths).
    b_scaled = (scale * lora_b.reshape(num_experts * rank, lora_b.shape[2]).astype(cd)).astype(dt)  # [E·r, N]
    acc = compute_dtype(dt)
    y = jnp.matmul(x, weight.T, preferred_element_type=acc) + jnp.matmul(
        u_scaled.astype(dt), b_scaled, preferred_element_type=acc
    )
    return y.astype(dt), u, p_soft


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _molora_core(x, weight, lora_a, lora_b, router, probs, scale, top_k, renormalize):
    return _molora_fwd_impl(x, weight, lora_a, lora_b, router, probs, scale, top_k, renormalize)[0]


def _molora_core_fwd(x, weight, lora_a, lora_b, router, probs, scale, top_k, renormalize):
    y, u, p_soft = _molora_fwd_impl(x, weight, lora_a, lora_b, router, probs, scale, top_k, renormalize)
    return y, (x, weight, lora_a, lora_b, router, probs, p_soft, u)


def _molora_core_bwd(scale, top_k, renormalize, res, dy):
    x, weight, lora_a, lora_b, router, probs, p_soft, u = res
    dt, cd = x.dtype, compute_dtype(x.dtype)
    num_experts, k, rank = lora_a.shape
    t = x.shape[0]
    p = _molora_weights(probs, p_soft, top_k, renormalize, cd)
    b_scaled = scale * lora_b.reshape(num_experts * rank, lora_b.shape[2]).astype(cd)  # [E·r, N]
    u_scaled = _scale_by_probs(u, p, num_experts)

    d_b = _dot(u_scaled.T.astype(dt), dy, cd).reshape(lora_b.shape) * scale  # scale · U′ᵀ dy
    du_scaled = _dot(dy, b_scaled.T.astype(dt), cd)  # dU′ [T, E·r]
    du = _scale_by_probs(du_scaled, p, num_experts)
    d_router = d_probs = None
    d_cols, a_cols = du, _cat_a(lora_a).astype(cd)
    if p is not None:
        dp = (du_scaled.reshape(t, num_experts, rank) * u.reshape(t, num_experts, rank)).sum(axis=-1)  # [T, E]
        if probs is not None:
            d_probs = dp.astype(probs.dtype)
        else:
            dlogits = probs_backward(dp, p_soft, top_k, renormalize)
            d_cols = jnp.concatenate([du, dlogits], axis=1)  # [T, E·r + E]
            a_cols = jnp.concatenate([a_cols, router.astype(cd)], axis=1)  # [K, E·r + E]
    dx = (_dot(dy, weight, cd) + _dot(d_cols, a_cols.T, cd)).astype(dt)
    d_params = _dot(x.astype(cd).T, d_cols, cd)  # [K, E·r (+ E)]
    d_a = d_params[:, : num_experts * rank].reshape(k, num_experts, rank).transpose(1, 0, 2)
    if router is not None and probs is None:  # token routing: the router's columns follow A_cat's
        d_router = d_params[:, num_experts * rank :].astype(router.dtype)
    d_w = _dot(dy.T, x, weight.dtype)  # frozen in practice: dead code under jit unless asked for
    return dx, d_w, d_a.astype(lora_a.dtype), d_b.astype(lora_b.dtype), d_router, d_probs


_molora_core.defvjp(_molora_core_fwd, _molora_core_bwd)


def molora(
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
) -> jax.Array:
    """MoLoRA on flattened x [T, K]; probs [T, E] for sentence routing (router then unused)."""
    y = _molora_core(x, weight, lora_a, lora_b, router, probs, float(scale), top_k, renormalize)
    return y if bias is None else y + bias.astype(y.dtype)
