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

Adapter banks (``banked_mov_site``, ``banked_molora``: per-token adapters, parameters stacked along A): per-token
gathers for T <= A, else the cores above over the adapters' experts concatenated along E with each token's
routing confined to its own adapter's columns, or (TPU) the tokens sorted by adapter with ragged dots; see the
last section.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from pemoe.jax.reference import compute_dtype, top_k_mask

__all__ = ["select", "probs_backward", "mov_site", "molora", "banked_mov_site", "banked_molora", "banked_router_probs"]


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


def _mov_weights(h3, router, experts, probs, p_soft, top_k, renormalize, keep=None):
    """Routing weights p [T, G, E] in the compute dtype, or None for (IA)3; times ``keep`` [T] in a bank."""
    if probs is not None:  # sentence routing: one p per token, shared by the groups
        p = jnp.broadcast_to(probs.astype(compute_dtype(h3.dtype))[:, None, :], h3.shape[:2] + probs.shape[-1:])
    elif router is None:
        return None
    else:
        p = select(p_soft, top_k, renormalize)
    return p if keep is None else p * keep[:, None, None]


def _mov_scaling(p, experts, cd, keep=None):
    """s[t, g, :] = Σ_e p[t, g, e] experts[g, e, :]  ([T, G, D], cd); (IA)3: experts[:, 0] broadcast.
    In a bank (``keep`` given) the base tokens (keep 0, p 0) get s = 1 exactly: s + (1 - keep).

    Written as a broadcast product summed over E, not as an einsum: XLA fuses the product into the
    reduction (no [T, G, E, D] buffer), and on the CPU it fuses the whole MoV epilogue (router GEMM,
    softmax, merge, scaling) with the frozen GEMM before it into one YNNPACK fusion. The einsum is a
    batched dot over G that XLA CPU runs on transposed copies, outside that fusion (~1.5x slower op).
    """
    s = experts[None, :, 0, :].astype(cd) if p is None else jnp.sum(p[..., None] * experts.astype(cd)[None], axis=-2)
    return s if keep is None else s + (1 - keep)[:, None, None]


def _mov_logits(h32, router, cd):
    """logits [T, G, E] = h32 @ router: one 2-D GEMM [T·G, D] @ [D, E] (the router is shared by the groups)."""
    t, g, d = h32.shape
    return jnp.matmul(h32.reshape(t * g, d), router.astype(cd)).reshape(t, g, router.shape[1])


def _mov_fwd_impl(h3, router, experts, probs, top_k, renormalize, ids=None, num_adapters=1):
    """The MoV site; with ``ids`` the parameters are a bank's, concatenated along E (see :func:`banked_mov_site`)."""
    cd = compute_dtype(h3.dtype)
    keep = None if ids is None else bank_keep(ids, num_adapters, cd)
    p_soft = None
    if probs is None and router is not None:
        logits = _mov_logits(h3.astype(cd), router, cd)
        if ids is not None:  # each token's softmax runs over its own adapter's E columns
            logits = jnp.where(bank_mask(ids, num_adapters, logits.shape[-1])[:, None, :], logits, -jnp.inf)
        p_soft = jax.nn.softmax(logits, axis=-1)
    p = _mov_weights(h3, router, experts, probs, p_soft, top_k, renormalize, keep)
    y = (h3.astype(cd) * _mov_scaling(p, experts, cd, keep)).astype(h3.dtype)
    return y, p_soft


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _mov_core(h3, router, experts, probs, top_k, renormalize):
    return _mov_fwd_impl(h3, router, experts, probs, top_k, renormalize)[0]


def _mov_core_fwd(h3, router, experts, probs, top_k, renormalize):
    y, p_soft = _mov_fwd_impl(h3, router, experts, probs, top_k, renormalize)
    return y, (h3, router, experts, probs, p_soft)


def _mov_core_bwd(top_k, renormalize, res, dy):
    return _mov_bwd_impl(top_k, renormalize, res, dy)


def _mov_bwd_impl(top_k, renormalize, res, dy, ids=None, num_adapters=1):
    h3, router, experts, probs, p_soft = res
    cd = compute_dtype(h3.dtype)
    keep = None if ids is None else bank_keep(ids, num_adapters, cd)
    p = _mov_weights(h3, router, experts, probs, p_soft, top_k, renormalize, keep)
    h32 = h3.astype(cd)
    dy32 = dy.astype(cd)
    dy_h = dy32 * h32  # [T, G, D]
    if p is None:  # (IA)3
        d_experts = dy_h.sum(axis=0)[:, None, :]
    else:
        d_experts = jnp.einsum("tge,tgd->ged", p, dy_h)
    dh = dy32 * _mov_scaling(p, experts, cd, keep)
    d_router = d_probs = None
    if p is not None:
        dp = jnp.einsum("ged,tgd->tge", experts.astype(cd), dy_h)  # [T, G, E]
        if keep is not None:
            dp = dp * keep[:, None, None]
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


def _molora_weights(probs, p_soft, top_k, renormalize, cd, keep=None):
    if probs is not None:
        p = probs.astype(cd)
    elif p_soft is None:
        return None
    else:
        p = select(p_soft, top_k, renormalize)
    return p if keep is None else p * keep[:, None]


def _molora_fwd_impl(x, weight, lora_a, lora_b, router, probs, scale, top_k, renormalize, ids=None, num_adapters=1):
    """MoLoRA; with ``ids`` the parameters are a bank's, concatenated along E (see :func:`banked_molora`)."""
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
    if logits is not None and ids is not None:  # each token's softmax runs over its own adapter's E columns
        logits = jnp.where(bank_mask(ids, num_adapters, num_experts), logits, -jnp.inf)
    keep = None if ids is None else bank_keep(ids, num_adapters, cd)
    p_soft = None if logits is None else jax.nn.softmax(logits, axis=-1)
    p = _molora_weights(probs, p_soft, top_k, renormalize, cd, keep)
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
    return _molora_bwd_impl(scale, top_k, renormalize, res, dy)


def _molora_bwd_impl(scale, top_k, renormalize, res, dy, ids=None, num_adapters=1):
    x, weight, lora_a, lora_b, router, probs, p_soft, u = res
    dt, cd = x.dtype, compute_dtype(x.dtype)
    num_experts, k, rank = lora_a.shape
    t = x.shape[0]
    keep = None if ids is None else bank_keep(ids, num_adapters, cd)
    p = _molora_weights(probs, p_soft, top_k, renormalize, cd, keep)
    b_scaled = scale * lora_b.reshape(num_experts * rank, lora_b.shape[2]).astype(cd)  # [E·r, N]
    u_scaled = _scale_by_probs(u, p, num_experts)

    d_b = _dot(u_scaled.T.astype(dt), dy, cd).reshape(lora_b.shape) * scale  # scale · U′ᵀ dy
    du_scaled = _dot(dy, b_scaled.T.astype(dt), cd)  # dU′ [T, E·r]
    du = _scale_by_probs(du_scaled, p, num_experts)
    d_router = d_probs = None
    d_cols, a_cols = du, _cat_a(lora_a).astype(cd)
    if p is not None:
        dp = (du_scaled.reshape(t, num_experts, rank) * u.reshape(t, num_experts, rank)).sum(axis=-1)  # [T, E]
        if keep is not None:
            dp = dp * keep[:, None]
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


# ------------------------------------------------------------------------------------------
# Adapter banks: per-token adapters (``ids`` [T], -1 = the base alone), parameters stacked along A
# ------------------------------------------------------------------------------------------
#
# Three forms, chosen statically by :func:`bank_form` from T, A and the backend (fixed at trace time); each
# is valid for any T:
#
# * gathered per token (T <= A): each token's parameters are gathered (``param[ids]``: MoV experts
#   [T, G, E, D] and router [T, D, E]; MoLoRA lora_a [T, E, K, r], lora_b [T, E, r, N], router [T, K, E]) and
#   the op runs as batched products in the compute dtype, with plain autodiff (the gathers' transposes
#   scatter-add into the stacked parameters). Its memory is T copies of one adapter, at most the bank's own
#   size; the arithmetic is that of one single-adapter call (decoding: one token per sequence).
# * concatenated over the adapters (T > A): the bank runs as one single-adapter op with A·E experts — MoV
#   experts [G, A·E, D] and router [D, A·E]; MoLoRA A_cat [K, A·E·r], B_cat [A·E·r, N], router [K, A·E] —
#   whose routing weights are zero outside the token's own adapter: the router logits of the other adapters
#   are masked to -inf before the softmax (so each token's softmax, top-k and renormalisation run over its
#   own adapter's E columns, the single-adapter values exactly), and the base tokens get weight 0 (MoV: s = 1).
#   This is the ``custom_vjp`` core of the single-adapter op with that mask (``ids`` is kept for the
#   backward, the masks are rebuilt from it): its memory does not grow with T times an adapter's size (the
#   saved routing weights grow to [T, G, A·E] / [T, A·E]), its adapter arithmetic (router, merge / shrink,
#   expand) is A times one adapter's; the frozen GEMMs run once, as always.
# * sorted by adapter (T > A on TPU): the tokens are permuted so each adapter's are contiguous (a stable
#   argsort, base and bad ids last as group A) and the per-adapter products run as ``jax.lax.ragged_dot`` over
#   the stacked parameters with one zero adapter appended for group A — MoLoRA: shrink (and router logits)
#   x_sorted @ [A_cat | router] [A + 1, K, E·r (+ E)], U′ @ B_cat [A + 1, E·r, N]; MoV: router logits
#   [T·G, D] @ [A + 1, D, E], merge p [G·T, E] @ experts [G·(A + 1), E, D] — then unsorted. The routing runs
#   on each token's own E columns (no mask); its adapter arithmetic is one adapter's where the backend lowers
#   the ragged dot as a grouped matmul. Plain autodiff: the residuals are the sorted activations, U / U′ and
#   the routing weights [T, (G,) E] (MoV also keeps h float32 and s, [T, N] each); no [T, A·E] tensor.
#
# Ids outside [-1, A), which only a traced call can pass (the checks refuse them on concrete values), get a
# NaN weight: their rows come out NaN (and so do the gradients they reach), never another adapter's.


def bank_form(tokens: int, num_adapters: int, backend: str | None = None) -> str:
    """The bank's form: ``"gather"`` for T <= A; for T > A ``"sorted"`` on TPU, ``"concat"`` elsewhere.

    ``backend`` defaults to ``jax.default_backend()`` (the platform ``jax.jit`` compiles for; an export for
    another platform gets the default backend's form). The sorted form's ragged dots are A-fold dense products
    where they are expanded: on CPU each becomes one dot over a masked [T, (A + 1)·K] copy of its input (the
    weight gradients: batched dots over masked [A + 1, T, ·] copies), measured at T = 2048,
    K = N = 512, float32, one thread, forward + backward: MoLoRA (E = 8, r = 4) 203 / 638 ms sorted against
    48 / 193 ms concatenated at A = 8 / 32, MoV (E = 10) 162 / 508 against 40 / 78 ms. XLA GPU expands at
    least the weight-gradient ragged dot the same way, so GPU keeps the concatenated form; XLA TPU lowers the
    ragged dot natively (a grouped matmul), where the sorted form's adapter arithmetic is one adapter's."""
    if tokens <= num_adapters:
        return "gather"
    return "sorted" if (backend or jax.default_backend()) == "tpu" else "concat"


def bank_sort(ids: jax.Array, num_adapters: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The sorted form's permutation: (order [T], inverse [T], group_sizes [A + 1] int32).

    ``x[order]`` holds adapter 0's tokens, then adapter 1's, ..., then the base and bad ids (group A), each
    group in token order (a stable sort); ``y_sorted[inverse]`` undoes it."""
    key = jnp.where((ids >= 0) & (ids < num_adapters), ids, num_adapters)
    order = jnp.argsort(key, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    sizes = jnp.bincount(key, length=num_adapters + 1).astype(jnp.int32)
    return order, inverse, sizes


def _pad_bank(param: jax.Array) -> jax.Array:
    """[A, ...] -> [A + 1, ...]: a zero adapter for the sorted form's last group (base and bad ids), so the
    group sizes cover every row."""
    return jnp.concatenate([param, jnp.zeros((1,) + param.shape[1:], param.dtype)], axis=0)


def bank_keep(ids: jax.Array, num_adapters: int, dtype) -> jax.Array:
    """[T]: 1 for an adapter's token, 0 for a base token (id -1), NaN for an id outside [-1, A)."""
    inside = (ids >= 0) & (ids < num_adapters)
    return jnp.where(ids == -1, 0.0, jnp.where(inside, 1.0, jnp.nan)).astype(dtype)


def bank_index(ids: jax.Array, num_adapters: int) -> jax.Array:
    """The adapter whose parameters a token reads: its id, clipped into [0, A) (base and bad ids are then
    weighted by :func:`bank_keep`)."""
    return jnp.clip(ids, 0, num_adapters - 1)


def bank_mask(ids: jax.Array, num_adapters: int, width: int) -> jax.Array:
    """[T, A·E] bool: the columns of the token's own adapter (column c belongs to adapter c // E)."""
    per_adapter = width // num_adapters
    return (jnp.arange(width) // per_adapter)[None, :] == bank_index(ids, num_adapters)[:, None]


def _one_hot_probs(ids: jax.Array, num_adapters: int, cd) -> jax.Array:
    """(IA)3 / LoRA (E = 1) in the concatenated form: the weight of adapter a is [ids == a], [T, A]."""
    return jax.nn.one_hot(bank_index(ids, num_adapters), num_adapters, dtype=cd)


def banked_router_probs(logits: jax.Array, ids: jax.Array, top_k: int | None, renormalize: bool) -> jax.Array:
    """Sentence routing in a bank: from each adapter's router logits per token [T, A, E] (compute dtype), the
    routing weights of the token's own adapter, in the layout of :func:`bank_form`'s form: [T, E] gathered or
    sorted (in token order), [T, A·E] (zero outside the own adapter) concatenated. Plain autodiff (back to the
    router input and the stacked router)."""
    t, num_adapters, num_experts = logits.shape
    if bank_form(t, num_adapters) in ("gather", "sorted"):
        own = jnp.take_along_axis(logits, bank_index(ids, num_adapters)[:, None, None], axis=1)[:, 0]
        return select(jax.nn.softmax(own, axis=-1), top_k, renormalize)
    flat = logits.reshape(t, num_adapters * num_experts)
    masked = jnp.where(bank_mask(ids, num_adapters, flat.shape[1]), flat, -jnp.inf)
    return select(jax.nn.softmax(masked, axis=-1), top_k, renormalize)


# ---- MoV


def _gathered_mov(h3, ids, router, experts, probs, top_k, renormalize):
    """MoV with each token's own experts [T, G, E, D] and router [T, D, E] (probs [T, E]: sentence routing)."""
    cd = compute_dtype(h3.dtype)
    num_adapters = experts.shape[0]
    idx = bank_index(ids, num_adapters)
    keep = bank_keep(ids, num_adapters, cd)
    h32 = h3.astype(cd)
    experts_t = experts[idx].astype(cd)  # [T, G, E, D]
    if probs is not None:
        p = jnp.broadcast_to(probs.astype(cd)[:, None, :], h3.shape[:2] + probs.shape[-1:])
    elif router is None:  # (IA)3
        p = jnp.ones(h3.shape[:2] + (1,), dtype=cd)
    else:
        logits = jnp.einsum("tgd,tde->tge", h32, router[idx].astype(cd))
        p = select(jax.nn.softmax(logits, axis=-1), top_k, renormalize)
    s = jnp.einsum("tge,tged->tgd", p * keep[:, None, None], experts_t) + (1 - keep)[:, None, None]
    return (h32 * s).astype(h3.dtype)


def _sorted_mov(h3, ids, router, experts, probs, top_k, renormalize):
    """MoV with the tokens sorted by adapter (:func:`bank_sort`); the router and the merge as ragged dots.

    router logits: h_sorted [T·G, D] (each token's G rows adjacent) @ router [A + 1, D, E], groups sizes·G.
    merge: p_sorted [G, T, E] (group-major, so each (group, adapter) block is contiguous) @ experts
    [G·(A + 1), E, D], groups ``sizes`` tiled G times; the base / bad ids' group reads a zero adapter.
    """
    cd = compute_dtype(h3.dtype)
    num_adapters, groups, num_experts, dim = experts.shape
    t = h3.shape[0]
    order, inverse, sizes = bank_sort(ids, num_adapters)
    keep = bank_keep(ids, num_adapters, cd)[order]
    if probs is not None:
        p = jnp.broadcast_to(probs[order].astype(cd)[:, None, :], (t, groups, num_experts))
    elif router is None:  # (IA)3
        p = jnp.ones((t, groups, 1), dtype=cd)
    else:
        hs = h3[order].astype(cd).reshape(t * groups, dim)
        logits = jax.lax.ragged_dot(hs, _pad_bank(router).astype(cd), sizes * groups, preferred_element_type=cd)
        p = select(jax.nn.softmax(logits.reshape(t, groups, num_experts), axis=-1), top_k, renormalize)
    p = (p * keep[:, None, None]).transpose(1, 0, 2).reshape(groups * t, p.shape[-1])
    rhs = _pad_bank(experts).transpose(1, 0, 2, 3).reshape(groups * (num_adapters + 1), -1, dim).astype(cd)
    s = jax.lax.ragged_dot(p, rhs, jnp.tile(sizes, groups), preferred_element_type=cd).reshape(groups, t, dim)
    s = s.transpose(1, 0, 2) + (1 - keep)[:, None, None]  # the base tokens: s = 1 exactly
    return (h3.astype(cd) * s[inverse]).astype(h3.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _banked_mov_core(h3, router, experts, probs, ids, num_adapters, top_k, renormalize):
    return _mov_fwd_impl(h3, router, experts, probs, top_k, renormalize, ids, num_adapters)[0]


def _banked_mov_core_fwd(h3, router, experts, probs, ids, num_adapters, top_k, renormalize):
    y, p_soft = _mov_fwd_impl(h3, router, experts, probs, top_k, renormalize, ids, num_adapters)
    return y, ((h3, router, experts, probs, p_soft), ids)


def _banked_mov_core_bwd(num_adapters, top_k, renormalize, res, dy):
    core_res, ids = res
    return (*_mov_bwd_impl(top_k, renormalize, core_res, dy, ids, num_adapters), None)


_banked_mov_core.defvjp(_banked_mov_core_fwd, _banked_mov_core_bwd)


def banked_mov_site(
    h: jax.Array,
    ids: jax.Array,
    router: jax.Array | None,
    experts: jax.Array,
    probs: jax.Array | None = None,
    top_k: int | None = None,
    renormalize: bool = False,
) -> jax.Array:
    """MoV with per-token adapters on flattened h [T, G·D]: ids [T] (int), router [A, D, E] or None, experts
    [A, G, E, D]; probs (sentence routing, router then None) from :func:`banked_router_probs`. The form is
    :func:`bank_form`'s, passed to the jitted site as a static argument."""
    form = bank_form(h.shape[0], experts.shape[0])
    return _banked_mov_site(h, ids, router, experts, probs, top_k, renormalize, form)


@partial(jax.jit, static_argnums=(5, 6, 7))
def _banked_mov_site(h, ids, router, experts, probs, top_k, renormalize, form):
    num_adapters, groups, num_experts, dim = experts.shape
    t = h.shape[0]
    h3 = h.reshape(t, groups, dim)
    if form == "gather":
        return _gathered_mov(h3, ids, router, experts, probs, top_k, renormalize).reshape(h.shape)
    if form == "sorted":
        return _sorted_mov(h3, ids, router, experts, probs, top_k, renormalize).reshape(h.shape)
    experts_cat = experts.transpose(1, 0, 2, 3).reshape(groups, num_adapters * num_experts, dim)
    router_cat = None
    if router is not None:
        router_cat = router.transpose(1, 0, 2).reshape(router.shape[1], num_adapters * num_experts)
    elif probs is None:  # (IA)3
        probs = _one_hot_probs(ids, num_adapters, compute_dtype(h.dtype))
    y = _banked_mov_core(h3, router_cat, experts_cat, probs, ids, num_adapters, top_k, renormalize)
    return y.reshape(h.shape)


# ---- MoLoRA


def _gathered_molora(x, weight, lora_a, lora_b, router, probs, ids, scale, top_k, renormalize):
    """x Wᵀ + scale·Σ_e p_e (x A_e) B_e with each token's own lora_a [T, E, K, r], lora_b [T, E, r, N] and router
    [T, K, E] (probs [T, E]: sentence routing); the frozen GEMM and the adapter sum in float32, rounded once."""
    dt, cd = x.dtype, compute_dtype(x.dtype)
    num_adapters = lora_a.shape[0]
    idx = bank_index(ids, num_adapters)
    keep = bank_keep(ids, num_adapters, cd)
    x32 = x.astype(cd)
    u = jnp.einsum("tk,tekr->ter", x32, lora_a[idx].astype(cd))  # [T, E, r]
    if probs is not None:
        p = probs.astype(cd)
    elif router is None:  # LoRA
        p = jnp.ones(u.shape[:2], dtype=cd)
    else:
        logits = jnp.einsum("tk,tke->te", x32, router[idx].astype(cd))
        p = select(jax.nn.softmax(logits, axis=-1), top_k, renormalize)
    u_scaled = u * (p * keep[:, None])[:, :, None]
    delta = jnp.einsum("ter,tern->tn", u_scaled, lora_b[idx].astype(cd))
    base = jnp.matmul(x, weight.T, preferred_element_type=cd)
    return (base + scale * delta).astype(dt)


def _sorted_molora(x, weight, lora_a, lora_b, router, probs, ids, scale, top_k, renormalize):
    """x Wᵀ + scale·Σ_e p_e (x A_e) B_e with the tokens sorted by adapter (:func:`bank_sort`): the shrink (and
    the router logits) x_sorted @ [A_cat | router] [A + 1, K, E·r (+ E)] and the expand U′ @ B_cat
    [A + 1, E·r, N] as ragged dots (the base / bad ids' group reads a zero adapter), the expand unsorted and
    added to the frozen GEMM in float32, rounded once. Operand dtypes as the concatenated form's."""
    dt, cd = x.dtype, compute_dtype(x.dtype)
    num_adapters, num_experts, _, rank = lora_a.shape
    width = num_experts * rank
    order, inverse, sizes = bank_sort(ids, num_adapters)
    keep = bank_keep(ids, num_adapters, cd)[order]
    xs = x[order]
    a_cat = jax.vmap(_cat_a)(lora_a)  # [A, K, E·r]
    use_router = router is not None and probs is None
    if use_router and dt == cd:  # exact: one ragged dot for the shrink and the router logits
        rhs = _pad_bank(jnp.concatenate([a_cat.astype(cd), router.astype(cd)], axis=2))
        ul = jax.lax.ragged_dot(xs, rhs, sizes, preferred_element_type=cd)
        u, logits = ul[:, :width], ul[:, width:]
    else:
        u = jax.lax.ragged_dot(xs, _pad_bank(a_cat.astype(dt)), sizes, preferred_element_type=cd)
        logits = None
        if use_router:
            rhs = _pad_bank(router.astype(cd))
            logits = jax.lax.ragged_dot(xs.astype(cd), rhs, sizes, preferred_element_type=cd)
    if probs is not None:
        p = probs[order].astype(cd)
    elif logits is None:  # LoRA
        p = jnp.ones((x.shape[0], 1), dtype=cd)
    else:
        p = select(jax.nn.softmax(logits, axis=-1), top_k, renormalize)
    u_scaled = _scale_by_probs(u, p * keep[:, None], num_experts)
    b_cat = (scale * lora_b.reshape(num_adapters, width, lora_b.shape[3]).astype(cd)).astype(dt)  # [A, E·r, N]
    delta = jax.lax.ragged_dot(u_scaled.astype(dt), _pad_bank(b_cat), sizes, preferred_element_type=cd)
    y = jnp.matmul(x, weight.T, preferred_element_type=cd) + delta[inverse]
    return y.astype(dt)


@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _banked_molora_core(x, weight, lora_a, lora_b, router, probs, ids, scale, top_k, renormalize, num_adapters):
    fwd = _molora_fwd_impl(x, weight, lora_a, lora_b, router, probs, scale, top_k, renormalize, ids, num_adapters)
    return fwd[0]


def _banked_molora_core_fwd(x, weight, lora_a, lora_b, router, probs, ids, scale, top_k, renormalize, num_adapters):
    y, u, p_soft = _molora_fwd_impl(
        x, weight, lora_a, lora_b, router, probs, scale, top_k, renormalize, ids, num_adapters
    )
    return y, ((x, weight, lora_a, lora_b, router, probs, p_soft, u), ids)


def _banked_molora_core_bwd(scale, top_k, renormalize, num_adapters, res, dy):
    core_res, ids = res
    return (*_molora_bwd_impl(scale, top_k, renormalize, core_res, dy, ids, num_adapters), None)


_banked_molora_core.defvjp(_banked_molora_core_fwd, _banked_molora_core_bwd)


def banked_molora(
    x: jax.Array,
    ids: jax.Array,
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
    """MoLoRA with per-token adapters on flattened x [T, K]: ids [T] (int), lora_a [A, E, K, r], lora_b
    [A, E, r, N], router [A, K, E] or None; probs (sentence routing, router then None) from
    :func:`banked_router_probs`."""
    num_adapters, num_experts, k, rank = lora_a.shape
    form = bank_form(x.shape[0], num_adapters)
    if form == "gather":
        y = _gathered_molora(x, weight, lora_a, lora_b, router, probs, ids, float(scale), top_k, renormalize)
    elif form == "sorted":
        y = _sorted_molora(x, weight, lora_a, lora_b, router, probs, ids, float(scale), top_k, renormalize)
    else:
        n = lora_b.shape[-1]
        a_cat = lora_a.reshape(num_adapters * num_experts, k, rank)
        b_cat = lora_b.reshape(num_adapters * num_experts, rank, n)
        router_cat = None
        if router is not None:
            router_cat = router.transpose(1, 0, 2).reshape(k, num_adapters * num_experts)
        elif probs is None:  # LoRA
            probs = _one_hot_probs(ids, num_adapters, compute_dtype(x.dtype))
        y = _banked_molora_core(
            x, weight, a_cat, b_cat, router_cat, probs, ids, float(scale), top_k, renormalize, num_adapters
        )
    return y if bias is None else y + bias.astype(y.dtype)
