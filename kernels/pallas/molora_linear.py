"""Fused MoLoRA linear, forward and backward, in Pallas (TPU Mosaic; any backend with ``interpret=True``).

Math (SPEC §1, §3.3), x [T, K], W [N, K] frozen (torch Linear layout), b [N], lora_a [E, K, r],
lora_b [E, r, N], router [K, E] float32 (None: LoRA, E = 1), scale = alpha / r:
    A_cat[k, e·r + j] = lora_a[e, k, j]            [K, E·r]
    B_cat[e·r + j, n] = lora_b[e, j, n]            [E·r, N]
    U      = x · A_cat                             [T, E·r]  float32 accumulation
    logits = x32 · router                          [T, E]    float32
    p_soft = softmax(logits)                       float32; p = p_soft or its top-k part (renormalised on request)
    U′     = scale · U · p  (expert e's r columns scaled by p[:, e])
    y      = [x | U′] · [Wᵀ ; B_cat] + b           the expand is E·r extra columns of the base GEMM's K
Never a [T, E, N] tensor. Sentence routing: ``probs`` [T, E] float32 given instead of the router.

Schedule: ONE kernel (issue 5 allows one or two; why one): grid (T / block_m, N / block_n, K / block_k),
K innermost. Every grid step accumulates x_tile · W_tileᵀ into a float32 VMEM accumulator, as a plain
GEMM does. The first column of output tiles (j = 0) feeds the same x tile, already in VMEM, to the
shrink and router dots too (x · A_cat, x32 · router), so x is read from HBM exactly as often as the
plain GEMM reads it. At j = 0's last K step the float32 softmax (and top-k) gives p, and U′ is formed
once per row block into a VMEM scratch that persists across the row's column tiles; every tile's last
K step adds U′ · B_cat_tile (the extra K) to its accumulator before the bias and the single store of y.
A two-kernel schedule (a shrink+router kernel writing U′ [T, E·r], then the extended-K GEMM) would read
x twice and move U′ out and back in; here the only extra HBM traffic is the adapters (A_cat and the
router once per row block: their index maps stay on the last K block for j > 0, so Pallas skips the
copy; B_cat once per output tile, like W) and, when asked for the backward pass, U and p_soft
(float32 [T, E·r] and [T, E]). The price: the column axis must run in order ("arbitrary"), so only
the row axis is split across TensorCores ("parallel").

Layout: E·r is padded to a multiple of 128 lanes (P) with zero columns of A_cat and zero rows of
B_cat, the expert axis of the router/probabilities to 128 lanes (E_pad, zero columns; padded logits are
masked to -inf), so every dot is lane-aligned. The per-expert scaling of U is one small float32 dot,
p [block_m, E_pad] · S [E_pad, P] with S[e, c] = scale if e·r <= c < (e+1)·r, built from iotas in the kernel.
Dtypes: x and W share float32 / bfloat16 / float16; the shrink and the expand run in x's dtype
(lora_a, lora_b cast to it, as the authors' code does) with float32 accumulation; the router runs in
float32 (x cast up); float32 operands use HIGHEST precision dots. y has x's dtype.

Backward (``molora_linear_bwd``, the same schedule mirrored): from the saved U and p_soft
(``save_residuals=True``), grid (T / block_m, K / block_n, N / block_k) over dx [T, K] = dy · W, N innermost.
The first column of dx tiles also reduces G = dy · B_catᵀ from the same dy tiles; at its last N step
dU′ = scale·G, dU = dU′·p, dp = Σ_j dU′·U and d logits (top-k / softmax backward) are formed once per row
block in VMEM scratch, and every dx tile adds dU·A_cat_tileᵀ + d logits·router_tileᵀ as extra K before its
single store. dy is read as a plain dgrad reads it; dU and d logits (or d probs) are written for the thin
adapter GEMMs over T that :mod:`pemoe.jax.pallas` leaves to XLA (d A_cat, d router from x; d B_cat from dy).
GPU: this kernel uses TPU grid semantics (a sequential column and K axis with VMEM scratch), which
Pallas' Triton lowering does not have; :mod:`kernels.pallas.molora_linear_gpu` is its GPU twin (same math,
checks and results; one program per output tile looping over K, the shrink recomputed per tile).

This module never imports the rest of pemoe.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._blocks import check_positive_ints
from ._tpu import LANES, SUBLANES, check_output_block, check_reduction_block

__all__ = [
    "LANES",
    "SUBLANES",
    "VMEM_BUDGET",
    "MoLoRALinearBlocks",
    "CANDIDATES",
    "get_default",
    "molora_linear",
    "get_default_backward",
    "molora_linear_bwd",
    "padded_widths",
]

#: TPU vreg tile: the last two dims of a block are multiples of (SUBLANES, LANES) or the full dims.
#: VMEM the default tiles may use (TPU v4's default scoped-VMEM limit is 16 MiB).
VMEM_BUDGET = 16 * 2**20
#: Activation dtypes the kernel takes (TPU has no float64).
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Routing modes (a feature flag of the kernel)
NO_ROUTER, TOKEN_ROUTER, GIVEN_PROBS = 0, 1, 2


def padded_widths(num_experts: int, rank: int) -> tuple[int, int]:
    """(P, E_pad): E·r and E rounded up to whole 128-lane vregs."""
    return LANES * math.ceil(num_experts * rank / LANES), LANES * math.ceil(num_experts / LANES)


# ------------------------------------------------------------------------------------------
# Block sizes: data, validated against the problem and the TPU layout rules
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoLoRALinearBlocks:
    """Tile of the fused MoLoRA linear: output [block_m, block_n] accumulated over block_k of K.

    Rules (checked by :meth:`validate`, each error names the rule it broke):
      * block_m (tokens) is T, or a multiple of 8 no larger than T (a partial last row block is fine);
      * block_n (output columns) is N, or a multiple of 128 no larger than N (a partial last column
        block is fine);
      * block_k (reduction) is K, or a multiple of 128 that divides K (no partial reduction block).
    E·r and E need no rule: they are padded to 128 lanes inside.
    """

    block_m: int = 256
    block_n: int = 256
    block_k: int = 512

    def __post_init__(self) -> None:
        check_positive_ints(self)

    def validate(self, *, t: int, n: int, k: int) -> None:
        """Raise ValueError if these blocks cannot tile T = t, N = n, K = k."""
        check_output_block("block_m", self.block_m, "T", t, SUBLANES)
        check_output_block("block_n", self.block_n, "N", n, LANES)
        check_reduction_block("block_k", self.block_k, "K", k)

    def vmem_bytes(self, *, num_experts: int, rank: int, itemsize: int, routing: int = TOKEN_ROUTER) -> int:
        """Estimated VMEM use: double-buffered input/output blocks plus the float32 scratch."""
        bm, bn, bk = self.block_m, self.block_n, self.block_k
        p, e_pad = padded_widths(num_experts, rank)
        blocks = (bm * bk + bn * bk + bk * p + p * bn + bn + bm * bn) * itemsize  # x, W, A_cat, B_cat, bias, y
        blocks += (bm * num_experts * rank + bm * num_experts) * 4  # saved U, p_soft
        if routing == TOKEN_ROUTER:
            blocks += bk * e_pad * 4
        elif routing == GIVEN_PROBS:
            blocks += bm * e_pad * 4
        scratch = (bm * bn + bm * p + bm * e_pad) * 4 + bm * p * itemsize  # acc, U, logits, U′
        return 2 * blocks + scratch


#: Default tiles, best first: the first one that is legal for the shape (after clamping block_m / block_n
#: to T / N) and fits :data:`VMEM_BUDGET` is used.
CANDIDATES: tuple[MoLoRALinearBlocks, ...] = (
    MoLoRALinearBlocks(256, 256, 512),
    MoLoRALinearBlocks(256, 256, 256),
    MoLoRALinearBlocks(256, 256, 128),
    MoLoRALinearBlocks(128, 128, 128),
)


def get_default(t: int, n: int, k: int, e: int, r: int, *, itemsize: int = 2) -> MoLoRALinearBlocks:
    """TPU-legal default tile for x [t, k] @ W [n, k]ᵀ with E = e experts of rank r (see :data:`CANDIDATES`).

    A K that no candidate's block_k divides is taken whole (block_k = K), with the smallest candidate's
    block_m / block_n. Raises ValueError if nothing fits :data:`VMEM_BUDGET`.
    """
    if min(t, n, k, e, r) < 1:
        raise ValueError(f"get_default needs positive sizes, got t={t}, n={n}, k={k}, e={e}, r={r}")
    tried = []
    for c in CANDIDATES + (dataclasses.replace(CANDIDATES[-1], block_k=k),):
        if k % c.block_k and c.block_k != k:
            continue
        blocks = MoLoRALinearBlocks(min(c.block_m, t), min(c.block_n, n), min(c.block_k, k))
        blocks = dataclasses.replace(
            blocks,
            block_m=t if blocks.block_m == t else blocks.block_m,
            block_n=n if blocks.block_n == n else blocks.block_n,
        )
        vmem = blocks.vmem_bytes(num_experts=e, rank=r, itemsize=itemsize)
        if vmem <= VMEM_BUDGET:
            blocks.validate(t=t, n=n, k=k)
            return blocks
        tried.append((blocks, vmem))
    raise ValueError(
        f"no default tile fits the VMEM budget {VMEM_BUDGET} B for T={t}, N={n}, K={k}, E={e}, r={r}: "
        + ", ".join(f"{b} needs {v} B" for b, v in tried)
    )


# ------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, k] · b [k, n] with float32 accumulation (HIGHEST precision for float32 operands)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 and b.dtype == jnp.float32 else None
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, k] · b [n, k]ᵀ with float32 accumulation."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 and b.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision)


def _top_k_mask(p: jax.Array, num_experts: int, top_k: int) -> jax.Array:
    """1.0 at the top_k largest of p's first num_experts lanes (ties: the lower index), 0.0 elsewhere."""
    lane = jax.lax.broadcasted_iota(jnp.int32, p.shape, 1).astype(jnp.float32)
    q = jnp.where(lane < num_experts, p, -1.0)  # p >= 0: padded lanes are never picked
    mask = jnp.zeros_like(p)
    for _ in range(top_k):
        best = q.max(axis=1, keepdims=True)
        first = jnp.where(q == best, lane, float(p.shape[1])).min(axis=1, keepdims=True)
        picked = lane == first
        mask = jnp.where(picked, 1.0, mask)
        q = jnp.where(picked, -2.0, q)
    return mask


def _molora_linear_kernel(
    *refs,
    num_experts: int,
    rank: int,
    scale: float,
    routing: int,
    top_k: int | None,
    renormalize: bool,
    has_bias: bool,
    save_residuals: bool,
):
    # ---- unpack: inputs, outputs, scratch (which exist depends on the feature flags) ----
    refs = list(refs)
    x_ref, w_ref = refs.pop(0), refs.pop(0)  # [bm, bk], [bn, bk]
    bias_ref = refs.pop(0) if has_bias else None  # [1, bn]
    a_ref = refs.pop(0)  # [bk, P]  A_cat in x's dtype
    router_ref = refs.pop(0) if routing == TOKEN_ROUTER else None  # [bk, E_pad] float32
    probs_ref = refs.pop(0) if routing == GIVEN_PROBS else None  # [bm, E_pad] float32
    b_ref = refs.pop(0)  # [P, bn]  B_cat in x's dtype
    y_ref = refs.pop(0)  # [bm, bn]
    u_out_ref = refs.pop(0) if save_residuals else None  # [bm, E·r] float32
    p_out_ref = refs.pop(0) if save_residuals and routing == TOKEN_ROUTER else None  # [bm, E] float32
    acc_ref, u_acc_ref, u_scaled_ref = refs.pop(0), refs.pop(0), refs.pop(0)  # [bm, bn], [bm, P] f32, [bm, P]
    logit_acc_ref = refs.pop(0) if routing == TOKEN_ROUTER else None  # [bm, E_pad] float32
    assert not refs

    j, k_step = pl.program_id(1), pl.program_id(2)
    last_k = pl.num_programs(2) - 1
    first_col = j == 0

    @pl.when(k_step == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(jnp.logical_and(first_col, k_step == 0))
    def _init_shrink():
        u_acc_ref[...] = jnp.zeros_like(u_acc_ref)
        if logit_acc_ref is not None:
            logit_acc_ref[...] = jnp.zeros_like(logit_acc_ref)

    # ---- base GEMM: acc += x_tile · W_tileᵀ ----
    x = x_ref[...]
    acc_ref[...] += _dot_nt(x, w_ref[...])

    # ---- first column: the same x tile feeds the shrink and the router ----
    @pl.when(first_col)
    def _shrink():
        u_acc_ref[...] += _dot(x, a_ref[...])
        if logit_acc_ref is not None:
            logit_acc_ref[...] += _dot(x.astype(jnp.float32), router_ref[...])

    # ---- first column, last K step: routing weights and U′ (kept in VMEM for the row's other tiles) ----
    @pl.when(jnp.logical_and(first_col, k_step == last_k))
    def _route():
        u = u_acc_ref[...]  # [bm, P] float32
        if routing == NO_ROUTER:
            u_scaled = scale * u
        else:
            if routing == TOKEN_ROUTER:
                logits = logit_acc_ref[...]  # [bm, E_pad]
                lane = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
                logits = jnp.where(lane < num_experts, logits, -jnp.inf)
                unnorm = jnp.exp(logits - logits.max(axis=1, keepdims=True))
                p_soft = unnorm / unnorm.sum(axis=1, keepdims=True)
                if p_out_ref is not None:
                    p_out_ref[...] = p_soft[:, :num_experts]
                p = p_soft
                if top_k is not None and top_k < num_experts:
                    p = p_soft * _top_k_mask(p_soft, num_experts, top_k)
                    if renormalize:
                        p = p / p.sum(axis=1, keepdims=True)
            else:
                p = probs_ref[...]  # [bm, E_pad], zero-padded
            # expand p to U's columns with the scale folded in: S[e, c] = scale if e·r <= c < (e+1)·r
            e_pad, width = p.shape[1], u.shape[1]
            row = jax.lax.broadcasted_iota(jnp.int32, (e_pad, width), 0)
            col = jax.lax.broadcasted_iota(jnp.int32, (e_pad, width), 1)
            spread = jnp.where(jnp.logical_and(col >= row * rank, col < row * rank + rank), scale, 0.0)
            u_scaled = u * _dot(p, spread.astype(jnp.float32))
        u_scaled_ref[...] = u_scaled.astype(u_scaled_ref.dtype)
        if u_out_ref is not None:
            u_out_ref[...] = u[:, : num_experts * rank]

    # ---- every tile, last K step: the expand as extra K, bias, one store of y ----
    @pl.when(k_step == last_k)
    def _epilogue():
        out = acc_ref[...] + _dot(u_scaled_ref[...], b_ref[...])
        if bias_ref is not None:
            out = out + bias_ref[...].astype(jnp.float32)
        y_ref[...] = out.astype(y_ref.dtype)


def _probs_backward(dp: jax.Array, p_soft: jax.Array, num_experts: int, top_k, renormalize: bool) -> jax.Array:
    """d logits from d p through the top-k selection (renormalised on request) and the softmax; [bm, E_pad]."""
    dq = dp
    if top_k is not None and top_k < num_experts:
        mask = _top_k_mask(p_soft, num_experts, top_k)
        if renormalize:
            q = p_soft * mask
            z = q.sum(axis=1, keepdims=True)
            dq = (dp - (dp * q).sum(axis=1, keepdims=True) / z) / z
        dq = dq * mask
    dlogits = p_soft * dq
    return dlogits - p_soft * dlogits.sum(axis=1, keepdims=True)


def _molora_linear_bwd_kernel(
    *refs,
    num_experts: int,
    rank: int,
    scale: float,
    routing: int,
    top_k: int | None,
    renormalize: bool,
):
    """dx tile [block_m, block_n of K] = Σ over N of dy·W, plus (at the last N step) the extra K d_cols·[A | router]ᵀ.

    Grid (T / block_m, K / block_n, N / block_k): the first column of dx tiles (c = 0) also reduces
    G = dy · B_catᵀ over N from the same dy tiles and, at its last N step, forms dU = scale·G·p,
    dp = Σ_j scale·G·U and d logits (or d probs) into VMEM scratch kept for the row's other dx tiles.
    """
    refs = list(refs)
    dy_ref, w_ref = refs.pop(0), refs.pop(0)  # [bm, bn_N], [bn_N, bk_K]
    b_ref = refs.pop(0)  # [P, bn_N]  B_cat in dy's dtype
    u_ref = refs.pop(0) if routing != NO_ROUTER else None  # [bm, P] float32 (zero-padded U)
    p_ref = refs.pop(0) if routing != NO_ROUTER else None  # [bm, E_pad] float32: p_soft, or the given probs
    a_ref = refs.pop(0)  # [bk_K, P] float32 A_cat
    router_ref = refs.pop(0) if routing == TOKEN_ROUTER else None  # [bk_K, E_pad] float32
    dx_ref, du_out_ref = refs.pop(0), refs.pop(0)  # [bm, bk_K], [bm, E·r] float32
    dp_out_ref = refs.pop(0) if routing != NO_ROUTER else None  # [bm, E]: d logits (router) or d probs
    acc_ref, g_ref, du_ref = refs.pop(0), refs.pop(0), refs.pop(0)  # [bm, bk_K], [bm, P], [bm, P] float32
    dlogits_ref = refs.pop(0) if routing == TOKEN_ROUTER else None  # [bm, E_pad] float32
    assert not refs

    c, n_step = pl.program_id(1), pl.program_id(2)
    last_n = pl.num_programs(2) - 1
    first_col = c == 0

    @pl.when(n_step == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(jnp.logical_and(first_col, n_step == 0))
    def _init_g():
        g_ref[...] = jnp.zeros_like(g_ref)

    dy = dy_ref[...]
    acc_ref[...] += _dot(dy, w_ref[...])

    @pl.when(first_col)
    def _g():
        g_ref[...] += _dot_nt(dy, b_ref[...])

    @pl.when(jnp.logical_and(first_col, n_step == last_n))
    def _route_backward():
        du_scaled = scale * g_ref[...]  # dU′ [bm, P]
        if routing == NO_ROUTER:
            du = du_scaled
        else:
            e_pad, width = p_ref.shape[1], du_scaled.shape[1]
            row = jax.lax.broadcasted_iota(jnp.int32, (e_pad, width), 0)
            col = jax.lax.broadcasted_iota(jnp.int32, (e_pad, width), 1)
            spread = jnp.where(jnp.logical_and(col >= row * rank, col < row * rank + rank), 1.0, 0.0)
            p_in = p_ref[...]
            p = p_in
            if routing == TOKEN_ROUTER and top_k is not None and top_k < num_experts:
                p = p_in * _top_k_mask(p_in, num_experts, top_k)
                if renormalize:
                    p = p / p.sum(axis=1, keepdims=True)
            du = du_scaled * _dot(p, spread)  # dU = dU′ · p
            dp = _dot_nt(du_scaled * u_ref[...], spread)  # dp[t, e] = Σ_j dU′ · U over expert e's columns
            if routing == TOKEN_ROUTER:
                dlogits = _probs_backward(dp, p_in, num_experts, top_k, renormalize)
                dlogits_ref[...] = dlogits
                dp_out_ref[...] = dlogits[:, :num_experts]
            else:
                dp_out_ref[...] = dp[:, :num_experts]
        du_ref[...] = du
        du_out_ref[...] = du[:, : num_experts * rank]

    @pl.when(n_step == last_n)
    def _epilogue():
        out = acc_ref[...] + _dot_nt(du_ref[...], a_ref[...])
        if dlogits_ref is not None:
            out = out + _dot_nt(dlogits_ref[...], router_ref[...])
        dx_ref[...] = out.astype(dx_ref.dtype)


# ------------------------------------------------------------------------------------------
# Launcher: validate, concatenate and pad the adapters, grid, launch
# ------------------------------------------------------------------------------------------


def _shape(a) -> list[int]:
    return list(a.shape)


def _check(x, weight, bias, lora_a, lora_b, router, probs, scale, top_k) -> tuple[int, int, int]:
    """Validate at trace time; returns (E, r, routing mode)."""
    for name, a in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x must be [T, K], got shape {_shape(x)}")
    if weight.ndim != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [N, K] with K = {x.shape[1]} (x's width), got shape {_shape(weight)}")
    if jnp.dtype(x.dtype) not in DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must share one dtype, got x {x.dtype} and weight {weight.dtype}")
    n, k = weight.shape
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [N] = [{n}], got shape {_shape(bias)}")
    if lora_a.ndim != 3 or lora_a.shape[1] != k or 0 in lora_a.shape:
        raise ValueError(f"lora_a must be [E, K, r] with K = {k} and E, r >= 1, got shape {_shape(lora_a)}")
    num_experts, _, rank = lora_a.shape
    if tuple(lora_b.shape) != (num_experts, rank, n):
        raise ValueError(f"lora_b must be [E, r, N] = [{num_experts}, {rank}, {n}], got shape {_shape(lora_b)}")
    for name, a in (("lora_a", lora_a), ("lora_b", lora_b), ("router", router), ("probs", probs)):
        if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got {a.dtype}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float (alpha / r), got {type(scale).__name__}")
    if router is not None and probs is not None:
        raise ValueError("give router (token routing) or probs (sentence routing), not both")
    if router is not None and tuple(router.shape) != (k, num_experts):
        raise ValueError(f"router must be [K, E] = [{k}, {num_experts}], got shape {_shape(router)}")
    if probs is not None and tuple(probs.shape) != (x.shape[0], num_experts):
        raise ValueError(f"probs must be [T, E] = [{x.shape[0]}, {num_experts}], got shape {_shape(probs)}")
    if router is None and probs is None and num_experts != 1:
        raise ValueError(f"router [K, E] (or probs [T, E]) is required when E > 1 (lora_a has E = {num_experts})")
    if top_k is not None:
        if router is None:
            raise ValueError("top_k needs the router (with probs, select the top-k before the call)")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, E = {num_experts}], got {top_k!r}")
    routing = TOKEN_ROUTER if router is not None else GIVEN_PROBS if probs is not None else NO_ROUTER
    return num_experts, rank, routing


@functools.partial(jax.jit, static_argnames=("scale", "top_k", "renormalize", "blocks", "interpret", "save_residuals"))
def molora_linear(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    lora_a: jax.Array,
    lora_b: jax.Array,
    router: jax.Array | None,
    probs: jax.Array | None = None,
    *,
    scale: float,
    top_k: int | None = None,
    renormalize: bool = False,
    blocks: MoLoRALinearBlocks | None = None,
    interpret: bool = False,
    save_residuals: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array | None]:
    """y = x Wᵀ + b + scale·Σ_e p_e (x A_e) B_e in one Pallas kernel.

    x [T, K] (float32 / bfloat16 / float16), weight [N, K] (x's dtype), bias [N] or None,
    lora_a [E, K, r], lora_b [E, r, N], router [K, E] (None: LoRA with E = 1, or sentence routing with
    probs [T, E] given), all adapters float32. Returns y [T, N] in x's dtype; with ``save_residuals``,
    (y, U [T, E·r] float32, p_soft [T, E] float32 or None without a router) for the backward pass.
    ``blocks`` defaults to :func:`get_default`; ``interpret=True`` runs the Pallas interpreter.
    """
    num_experts, rank, routing = _check(x, weight, bias, lora_a, lora_b, router, probs, scale, top_k)
    t, k = x.shape
    n = weight.shape[0]
    dt = x.dtype
    er = num_experts * rank
    if t == 0:  # empty batch: nothing to launch
        y = jnp.zeros((0, n), dt)
        empty_p = jnp.zeros((0, num_experts), jnp.float32) if routing == TOKEN_ROUTER else None
        return (y, jnp.zeros((0, er), jnp.float32), empty_p) if save_residuals else y
    blocks = blocks or get_default(t, n, k, num_experts, rank, itemsize=jnp.dtype(dt).itemsize)
    blocks.validate(t=t, n=n, k=k)
    bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
    p_width, e_pad = padded_widths(num_experts, rank)
    nk = k // bk

    # ---- adapters: concatenate, cast to the GEMM dtype, pad E·r and E to whole lanes (zeros) ----
    a_cat = lora_a.transpose(1, 0, 2).reshape(k, er).astype(dt)
    a_cat = jnp.pad(a_cat, ((0, 0), (0, p_width - er)))  # [K, P]
    b_cat = jnp.pad(lora_b.reshape(er, n).astype(dt), ((0, p_width - er), (0, 0)))  # [P, N]

    # A_cat and the router are read at j = 0 only: for j > 0 their block index stays on the last K block,
    # so the pipeline does not copy them again.
    def shrink_index(i, j, kk):
        return (jnp.where(j == 0, kk, nk - 1), 0)

    operands = [x, weight]
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)), pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk))]
    if bias is not None:
        operands.append(bias.astype(dt).reshape(1, n))
        in_specs.append(pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)))
    operands.append(a_cat)
    in_specs.append(pl.BlockSpec((bk, p_width), shrink_index))
    if routing == TOKEN_ROUTER:
        operands.append(jnp.pad(router.astype(jnp.float32), ((0, 0), (0, e_pad - num_experts))))
        in_specs.append(pl.BlockSpec((bk, e_pad), shrink_index))
    elif routing == GIVEN_PROBS:
        operands.append(jnp.pad(probs.astype(jnp.float32), ((0, 0), (0, e_pad - num_experts))))
        in_specs.append(pl.BlockSpec((bm, e_pad), lambda i, j, kk: (i, 0)))
    operands.append(b_cat)
    in_specs.append(pl.BlockSpec((p_width, bn), lambda i, j, kk: (0, j)))

    out_shape = [jax.ShapeDtypeStruct((t, n), dt)]
    out_specs = [pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j))]
    if save_residuals:  # written at j = 0; the block index stays (i, 0) for the row's other tiles
        out_shape.append(jax.ShapeDtypeStruct((t, er), jnp.float32))
        out_specs.append(pl.BlockSpec((bm, er), lambda i, j, kk: (i, 0)))
        if routing == TOKEN_ROUTER:
            out_shape.append(jax.ShapeDtypeStruct((t, num_experts), jnp.float32))
            out_specs.append(pl.BlockSpec((bm, num_experts), lambda i, j, kk: (i, 0)))

    scratch = [
        pltpu.VMEM((bm, bn), jnp.float32),  # base GEMM accumulator
        pltpu.VMEM((bm, p_width), jnp.float32),  # U accumulator
        pltpu.VMEM((bm, p_width), dt),  # U′, kept across the row's column tiles
    ]
    if routing == TOKEN_ROUTER:
        scratch.append(pltpu.VMEM((bm, e_pad), jnp.float32))  # router logits accumulator

    itemsize = jnp.dtype(dt).itemsize
    cost = pl.CostEstimate(
        flops=2 * t * n * (k + p_width) + 2 * t * k * (p_width + (e_pad if routing == TOKEN_ROUTER else 0)),
        transcendentals=t * e_pad if routing == TOKEN_ROUTER else 0,
        bytes_accessed=(t * k + n * k + t * n) * itemsize
        + pl.cdiv(t, bm) * (k * p_width * itemsize + k * e_pad * 4)
        + pl.cdiv(t, bm) * p_width * n * itemsize,
    )
    kernel = functools.partial(
        _molora_linear_kernel,
        num_experts=num_experts,
        rank=rank,
        scale=float(scale),
        routing=routing,
        top_k=top_k,
        renormalize=renormalize,
        has_bias=bias is not None,
        save_residuals=save_residuals,
    )
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(t, bm), pl.cdiv(n, bn), nk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(*operands)
    if not save_residuals:
        return outs[0]
    return outs[0], outs[1], outs[2] if routing == TOKEN_ROUTER else None


def get_default_backward(t: int, n: int, k: int, e: int, r: int, *, itemsize: int = 2) -> MoLoRALinearBlocks:
    """Default tile of the backward kernel: dx [t, k] = dy [t, n] · W [n, k], i.e. :func:`get_default` with the
    roles of N and K swapped (block_n tiles K, block_k reduces over N); validate with ``validate(t=t, n=k, k=n)``."""
    return get_default(t, k, n, e, r, itemsize=itemsize)


@functools.partial(jax.jit, static_argnames=("scale", "top_k", "renormalize", "blocks", "interpret"))
def molora_linear_bwd(
    dy: jax.Array,
    weight: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    router: jax.Array | None,
    probs: jax.Array | None,
    u: jax.Array,
    p_soft: jax.Array | None,
    *,
    scale: float,
    top_k: int | None = None,
    renormalize: bool = False,
    blocks: MoLoRALinearBlocks | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """The backward kernel: (dx [T, K] in dy's dtype, dU [T, E·r] float32, d logits or d probs [T, E] float32).

    Math (U, p_soft saved by the forward; p = the routing weights used, from p_soft or the given probs):
        dU′ = scale · dy · B_catᵀ;  dU = dU′ · p;  dp[t, e] = Σ_j dU′[t, e·r+j] · U[t, e·r+j]
        d logits = top-k / softmax backward of dp (token routing), or d probs = dp (given probs)
        dx = dy · W + dU · A_catᵀ + d logits · routerᵀ       (the extra K of the dgrad GEMM)
    The adapter gradients are thin GEMMs over T left to the caller: d A_cat = x32ᵀ dU, d router = x32ᵀ d logits,
    d B_cat = scale · U′ᵀ dy. ``blocks`` default to :func:`get_default_backward`.
    """
    t, n = dy.shape
    x_like = jax.ShapeDtypeStruct((t, weight.shape[1]), dy.dtype)
    num_experts, rank, routing = _check(x_like, weight, None, lora_a, lora_b, router, probs, scale, top_k)
    if tuple(dy.shape) != (t, weight.shape[0]):
        raise ValueError(f"dy must be [T, N] with N = {weight.shape[0]}, got shape {_shape(dy)}")
    k = weight.shape[1]
    dt = dy.dtype
    er = num_experts * rank
    if tuple(u.shape) != (t, er):
        raise ValueError(f"u must be [T, E·r] = [{t}, {er}], got shape {_shape(u)}")
    if routing == TOKEN_ROUTER and (p_soft is None or tuple(p_soft.shape) != (t, num_experts)):
        raise ValueError(f"p_soft must be [T, E] = [{t}, {num_experts}] with a router")
    no_p = None if routing == NO_ROUTER else jnp.zeros((0, num_experts), jnp.float32)
    if t == 0:
        return jnp.zeros((0, k), dt), jnp.zeros((0, er), jnp.float32), no_p
    blocks = blocks or get_default_backward(t, n, k, num_experts, rank, itemsize=jnp.dtype(dt).itemsize)
    blocks.validate(t=t, n=k, k=n)
    bm, bkc, bn = blocks.block_m, blocks.block_n, blocks.block_k  # rows, dx columns (over K), reduction (over N)
    p_width, e_pad = padded_widths(num_experts, rank)
    n_steps = n // bn

    b_cat = jnp.pad(lora_b.reshape(er, n).astype(dt), ((0, p_width - er), (0, 0)))  # [P, N]
    a_cat = jnp.pad(lora_a.transpose(1, 0, 2).reshape(k, er).astype(jnp.float32), ((0, 0), (0, p_width - er)))

    def b_index(i, c, nn):  # B_cat is read by the first column of dx tiles only
        return (0, jnp.where(c == 0, nn, n_steps - 1))

    operands = [dy, weight, b_cat]
    in_specs = [
        pl.BlockSpec((bm, bn), lambda i, c, nn: (i, nn)),
        pl.BlockSpec((bn, bkc), lambda i, c, nn: (nn, c)),
        pl.BlockSpec((p_width, bn), b_index),
    ]
    if routing != NO_ROUTER:
        p_in = p_soft if routing == TOKEN_ROUTER else probs
        operands += [
            jnp.pad(u.astype(jnp.float32), ((0, 0), (0, p_width - er))),
            jnp.pad(p_in.astype(jnp.float32), ((0, 0), (0, e_pad - num_experts))),
        ]
        in_specs += [
            pl.BlockSpec((bm, p_width), lambda i, c, nn: (i, 0)),
            pl.BlockSpec((bm, e_pad), lambda i, c, nn: (i, 0)),
        ]
    operands.append(a_cat)
    in_specs.append(pl.BlockSpec((bkc, p_width), lambda i, c, nn: (c, 0)))
    if routing == TOKEN_ROUTER:
        operands.append(jnp.pad(router.astype(jnp.float32), ((0, 0), (0, e_pad - num_experts))))
        in_specs.append(pl.BlockSpec((bkc, e_pad), lambda i, c, nn: (c, 0)))

    out_shape = [jax.ShapeDtypeStruct((t, k), dt), jax.ShapeDtypeStruct((t, er), jnp.float32)]
    out_specs = [pl.BlockSpec((bm, bkc), lambda i, c, nn: (i, c)), pl.BlockSpec((bm, er), lambda i, c, nn: (i, 0))]
    if routing != NO_ROUTER:
        out_shape.append(jax.ShapeDtypeStruct((t, num_experts), jnp.float32))
        out_specs.append(pl.BlockSpec((bm, num_experts), lambda i, c, nn: (i, 0)))
    scratch = [
        pltpu.VMEM((bm, bkc), jnp.float32),  # dx accumulator
        pltpu.VMEM((bm, p_width), jnp.float32),  # G = dy · B_catᵀ accumulator
        pltpu.VMEM((bm, p_width), jnp.float32),  # dU, kept across the row's dx tiles
    ]
    if routing == TOKEN_ROUTER:
        scratch.append(pltpu.VMEM((bm, e_pad), jnp.float32))  # d logits, kept likewise

    itemsize = jnp.dtype(dt).itemsize
    cost = pl.CostEstimate(
        flops=2 * t * k * (n + p_width + (e_pad if routing == TOKEN_ROUTER else 0)) + 2 * t * n * p_width,
        transcendentals=0,
        bytes_accessed=(t * n * pl.cdiv(k, bkc) + n * k * pl.cdiv(t, bm) + t * k) * itemsize,
    )
    kernel = functools.partial(
        _molora_linear_bwd_kernel,
        num_experts=num_experts,
        rank=rank,
        scale=float(scale),
        routing=routing,
        top_k=top_k,
        renormalize=renormalize,
    )
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(t, bm), pl.cdiv(k, bkc), n_steps),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(*operands)
    return outs[0], outs[1], outs[2] if routing != NO_ROUTER else None
