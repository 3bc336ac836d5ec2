"""MoLoRA linear (SPEC §3 item 3) as Triton kernels: a two-kernel forward (shrink, then the base GEMM
extended over K), a one-kernel forward kept for the shapes where the schedule model prefers it, and a
deterministic three-kernel backward; each forward and backward call first packs the adapters it reads.

Math (SPEC §1), x [T, K], W [N, K] frozen, b [N], lora_a [E, K, r], lora_b [E, r, N], router [K, E]
(None for LoRA, E = 1), scale = alpha / r:
    p  = softmax(x32 · router)  (top-k, renormalised on request; or given per token: sentence routing)
    U  = x · A_cat               [T, E·r]   A_cat[k, e·r + j] = lora_a[e, k, j]
    U′ = scale · U · p           (each expert's r columns scaled by its probability)
    y  = [x | U′] · [Wᵀ ; B_cat] + b          B_cat[e·r + j, n] = lora_b[e, j, n]
Never a [T, E, N] tensor.

Packing (``_molora_pack_kernel``, the first launch of each forward and backward call): lora_a and lora_b
(float32 parameters) become A_cat [K, BLOCK_J] and B_cat [BLOCK_J, N] in the activation dtype, in the padded
column layout the kernels compute in (Layouts and dtypes), once per call: every later program reads whole
contiguous rows of 16-bit values (no per-element expert / rank index math, no column mask, no cast) instead
of re-reading and casting the float32 tensors; the backward packs B_cat only for G (and its low part, see
Numerics) and A_cat only for dx. The router stays float32 and unpacked (SPEC §5: its products are
float32-grade, split in registers; [K, E] is read as rows of E contiguous floats already).

Forward schedules (``schedule=`` of :func:`molora_linear`; "auto" asks
:func:`.molora_linear_analysis.choose_schedule`):
  * "two_kernel": ``_molora_shrink_kernel`` runs over row tiles: one pass over x gives U and the router
    logits (float32-accurate, see Numerics), the float32 softmax (+ top-k / renormalisation; sentence
    routing reads the given p), and writes U′ [T, E·r] in the activation dtype (plus U float32 and
    p_soft float32 when backward will run). ``_molora_gemm_kernel`` is then a plain tiled GEMM over the
    extended K: the K loop x·Wᵀ, then the E·r tail U′·B_cat (in steps of TAIL_STEP columns), the bias
    and one store of y.
  * "fused": ``_molora_fused_forward_kernel``, one program per BLOCK_M rows and N_TILES column tiles;
    the first tile's K loop feeds each x tile to the base GEMM, the shrink and the router dots, so x is
    read once, but every column of programs recomputes its rows' shrink.

Why two kernels, and when one (the model: :mod:`.molora_linear_analysis`). :func:`hbm_traffic` models every
launch (bytes loaded / stored, each tensor's unique bytes, padded tensor-core FLOPs, programs);
:func:`modelled_seconds` turns that into time per launch = launch gap + max(waves x one program's padded
FLOPs / per-SM peak, unique bytes / HBM bandwidth) with the :data:`H100` constants (:class:`DeviceModel`,
data: 132 SMs, 989 TFLOP/s, 3.35 TB/s, a 1 µs gap between dependent launches); :func:`choose_schedule` takes
the schedule with the smaller modelled time, each with its best legal tiles. bf16, E = 10, r = 4, saving for
backward, default tiles, ratios against a plain linear of the same shape on the same model (``python -m
pemoe.kernels.triton.molora_linear_analysis`` prints the table):

    shape (T = 2048)          schedule     bytes   FLOPs   modelled time
    T5-large K = N = 1024     fused        1.12x   1.81x  10.3 µs  1.88x   (linear 4.3 GFLOP, 10.0 MiB, 5.5 µs)
                              two-kernel   1.56x   1.16x   9.4 µs  1.72x   <- chosen
    T5-XL wi K=2048, N=5120   fused        1.07x   1.78x  82.4 µs  1.80x
                              two-kernel   1.24x   1.05x  52.6 µs  1.15x   <- chosen
    T5-XL wo K=5120, N=2048   fused        1.07x   1.76x  81.5 µs  1.78x
                              two-kernel   1.49x   1.06x  55.6 µs  1.22x   <- chosen
    T5-large, E=15, r=16      fused        1.59x  10.25x  48.8 µs          (recompute of 256+32 columns)
                              two-kernel   2.18x   1.53x  11.8 µs          <- chosen

(The packing launch is in each line: at T5-large it reads the float32 adapters, 0.31 MiB, and writes 0.25
MiB, read again by the kernels, and adds one launch gap: +0.5 MiB and ~1.2 µs modelled. The time model
counts unique bytes only; what packing saves is the programs' re-reads of the adapters, served by L2: at
T5-large the shrink loads 14.5 MiB instead of 16.5, the fused kernel 87 MiB instead of 92 (E = 10 padded to
16 experts in the layout takes most of the halving from float32 to bfloat16; at E = 15, r = 16 it is 47%).)

The one-kernel schedule reads x once (bytes 1.09x the minimum, SPEC §6's <= 1.1x) but every column of programs
recomputes its rows' shrink: BLOCK_J + router columns (64 + 32 at E = 10, r = 4) per BLOCK_N = 128
output columns, 1.8x the GEMM's FLOPs. These GEMMs are compute-bound (~410 FLOP/byte against the
H100's ~295), so FLOPs decide: two kernels cost a second read of x in a memory-bound pass (~1.4 µs
at T5-large) and one more launch, and win at each schedule's best tiles (:func:`schedule_costs`, what
:func:`choose_schedule` compares) by 9% at T5-large (9.4 vs 10.3 µs; break-even at a ~1.9 µs launch gap),
25% at T5-XL wi (51.4 vs 68.1 µs) and only 2.7% at T5-XL wo (54.9 vs 56.4 µs: there the fused kernel's
N_TILES = 4 tiles amortise the recompute over 512 columns and K = 5120 makes x's second read costly).
The one-kernel schedule stays the choice where its recompute is small or nothing is compute-bound:
plain LoRA (E = 1: 16 padded columns; 1.30x vs 1.62x at T5-large) and decode-sized T (T = 64: one
launch, W-bound). The bytes target (<= 1.1x the minimum) holds for the one-kernel schedule only; the
modelled-time ratio at T5-large (1.7x) misses SPEC's GPU target of 1.10x. Nothing was timed on a GPU
here; ``schedule=`` forces either schedule. (A schedule that might meet both, overlapping the shrink with
the GEMM's K loop in one persistent launch with per-row-block ready flags, needs a GPU to validate and
was not attempted.)

Backward (base frozen), the packing launch, three kernels and torch sums, all deterministic (no atomics):
  1. ``_molora_grad_u_kernel`` over row tiles: G = dy·B_catᵀ, ONE GEMM of width E·r (dy read once), then
     dU = scale·G·p, dp[t, e] = scale·Σ_j G[t, e·r+j]·U[t, e·r+j], dlogits = softmax / top-k backward
     (``routing.router_probs_backward``; sentence routing stores d probs = dp), and U′ = scale·U·p (for
     d lora_b). dU, U′: activation dtype [T, E·r]; dlogits float32 [T, E].
  2. ``_molora_gemm_kernel`` again: dx = [dy | dU | dlogits]·[W ; A_catᵀ ; routerᵀ] (the dlogits tail in
     float32-grade hi/lo products).
  3. ``_molora_wgrad_kernel``, twice: d A_cat = xᵀ·dU and d router = xᵀ·dlogits (one pass over x), then
     d B_catᵀ = dyᵀ·U′ and d bias = Σ_t dy (one pass over dy). Each program owns a [BLOCK_C, J_STEP] tile
     (J_STEP = min(E·r padded, 64) adapter columns) of one chunk of REDUCE_ROWS tokens and writes its
     partial sum once; torch sums the chunks (two-stage: the same order every run).
  At T5-large (E = 10, r = 4, bf16) this moves 3.06x a plain dgrad's bytes (dy is read by passes 1, 2
  and 3, x by 3, 8 token chunks of partial sums written and read) with 1.39x its padded FLOPs (2.42x at
  E = 15, r = 16; G's two dots with B_cat's low part included); modelled 18 µs against the dgrad's 5.5 µs.
  The earlier single backward kernel moved 1.51x but recomputed G for every dx tile (2.25x the FLOPs, 9.8x
  at E = 15, r = 16), added adapter gradients with float32 atomics in a run-dependent order (11 MiB of
  atomics, 248 MiB at E = 15, r = 16) and spilled at E = 15, r = 16.

Layouts and dtypes. Adapters are float32 parameters, rounded to the activation dtype for the tensor-core
dots as the authors' code does, once per call by the packing launch (A_cat [K, BLOCK_J], B_cat
[BLOCK_J, N], row-major, zeros in the padded columns); the router is read in float32. The [T, E·r]
buffers are compact (column e·r + j); inside the kernels, and in A_cat / B_cat, U's columns are in a
per-expert padded layout: column c = e·RANK_PAD + j (RANK_PAD = next power of two ≥ r, BLOCK_E experts,
BLOCK_J = BLOCK_E·RANK_PAD ≥ 16 columns), so "scale expert e's columns by p_e" and "sum expert e's
columns" are reshapes to [BLOCK_M, BLOCK_E, RANK_PAD].

Numerics. Every dot accumulates in float32; softmax and routing math are float32. Router logits stay
float32-accurate with 16-bit activations: x (exact in its dtype) times a hi/lo split of the float32
router (:mod:`.split_dot`: two dots; router_hi + router_lo carry 16 mantissa bits in bfloat16, 22 in
float16); the dlogits·routerᵀ and xᵀ·dlogits products use the same splits, in float16 after scaling the
d logits by powers of two (they fall far below float16's smallest normal). U′ and dU are rounded once,
float32 -> activation dtype (round to nearest even), because they are A-operands of tensor-core dots:
the same rounding the one-kernel schedule applies in registers, so both schedules feed the expand
identical U′ values given identical U. G = dy·B_catᵀ is float32-grade where its dp feeds a probability
gradient with 16-bit dy: dy (exact in its dtype) times B_cat + B_lo, the packed float32 remainder (two dots,
as for the router): the softmax backward's dp − Σ_e p·dp cancels, and with B_cat rounded to 16 bits the d
router at one token (nothing averages) missed the tolerance rule by up to 2-7x in float16. U stays x·A_cat
with A_cat rounded (within the rule: U's rounding is that of x itself). float32 activations use
``input_precision="ieee"`` dots throughout (no TF32: the tolerance rule is float32's).

Sentence routing (``probs`` given, float32 [T, E]) is supported: the router is not read and the
gradient flows to ``probs``. Supported dtypes: x and W float16, bfloat16 or float32 (one dtype),
adapters float32; E·r up to 256 padded columns. Anything else raises ``TypeError`` / ``ValueError``;
there is no fallback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import triton
import triton.language as tl

from pemoe.kernels.triton import routing, split_dot, tiles
from pemoe.kernels.triton.interpreter import do_bench
from pemoe.kernels.triton.plan import (
    ITEMSIZE,
    Buffer,
    Launch,
    Plan,
    dtype_name,
    load_torch_part,
    strides_of,
    torch_attribute,
)

logger = logging.getLogger("pemoe")

# Routing modes (the ROUTING feature flag)
NO_ROUTER, TOKEN_ROUTER, GIVEN_PROBS = 0, 1, 2
#: Forward schedules (``schedule=``); "auto" picks one with :func:`.molora_linear_analysis.choose_schedule`.
SCHEDULES = ("fused", "two_kernel")
#: Tokens whose adapter-gradient partial sums one backward weight-gradient program reduces (a multiple of
#: every WGRAD_CONFIGS BLOCK_T). Read by the launcher at each call (tests lower it to get several chunks).
REDUCE_ROWS = 256
#: Widest supported padded adapter width BLOCK_E·RANK_PAD (E = 15, r = 16 pads to 16·16 = 256).
MAX_ADAPTER_COLUMNS = 256


# ------------------------------------------------------------------------------------------------
# @triton.jit helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _expert_columns(E, R, BLOCK_E: tl.constexpr, RANK_PAD: tl.constexpr):
    """Padded U columns c = e·RANK_PAD + j: (expert e, rank j, real) for c in [0, BLOCK_E·RANK_PAD)."""
    offs_c = tl.arange(0, BLOCK_E * RANK_PAD)
    expert = offs_c // RANK_PAD
    rank = offs_c % RANK_PAD
    return expert, rank, (expert < E) & (rank < R)


@triton.jit
def _scale_per_expert(u, p, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, RANK_PAD: tl.constexpr):
    """u [BLOCK_M, BLOCK_E·RANK_PAD] with expert e's columns multiplied by p[:, e] (p [BLOCK_M, BLOCK_E])."""
    u3 = tl.reshape(u, (BLOCK_M, BLOCK_E, RANK_PAD))
    return tl.reshape(u3 * p[:, :, None], (BLOCK_M, BLOCK_E * RANK_PAD))


@triton.jit
def _sum_per_expert(v, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, RANK_PAD: tl.constexpr):
    """[BLOCK_M, BLOCK_E]: the sum of each expert's RANK_PAD columns of v [BLOCK_M, BLOCK_E·RANK_PAD]."""
    return tl.sum(tl.reshape(v, (BLOCK_M, BLOCK_E, RANK_PAD)), axis=2)


@triton.jit
def _routing_weights(
    p_soft_ptr, probs_ptr, offs_m, m_mask, offs_e, E, stride_st, stride_pt, stride_pe,
    ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """(p, p_soft) for the rows offs_m from the saved softmax / given probs; rows >= T get p = 0."""
    rows = offs_m.to(tl.int64)
    mask = m_mask[:, None] & (offs_e[None, :] < E)
    if ROUTING == 1:
        p_soft = tl.load(p_soft_ptr + rows[:, None] * stride_st + offs_e[None, :], mask=mask, other=0.0)
        # rows past T hold zeros; keep them out of the renormalisation (0 / 0)
        p_soft = tl.where(m_mask[:, None], p_soft, tl.where(offs_e[None, :] < E, 1.0 / E, 0.0))
        p = routing.select(p_soft, offs_e, E, TOP_K, RENORMALIZE)
    elif ROUTING == 2:
        p_soft = tl.load(probs_ptr + rows[:, None] * stride_pt + offs_e[None, :] * stride_pe, mask=mask, other=0.0)
        p = p_soft
    else:
        p_soft = tl.where(offs_e[None, :] < E, 1.0, 0.0) + tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
        p = p_soft
    return tl.where(m_mask[:, None], p, 0.0), p_soft


@triton.jit
def _forward_probs(
    logits, probs_ptr, rows, m_mask, offs_e, E, stride_pt, stride_pe,
    ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """(p, p_soft) [BLOCK_M, BLOCK_E] float32 in the forward: softmax of the logits (token routing), the
    given probabilities (sentence routing) or ones (LoRA; p_soft then unused). Padded experts get 0."""
    if ROUTING == 1:
        p, p_soft = routing.router_probs(logits, offs_e, E, TOP_K, RENORMALIZE)
    elif ROUTING == 2:
        p = tiles.load_tile(probs_ptr, rows * stride_pt, offs_e * stride_pe, m_mask, offs_e < E)
        p_soft = p
    else:
        p = tl.where(offs_e[None, :] < E, 1.0, 0.0) + tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
        p_soft = p
    return p, p_soft


@triton.jit
def _shrink_step(
    x_tile, kk, k_mask, acc_u, logits, lora_a_ptr, router_ptr, expert, rank, col_real, offs_e, E,
    stride_ae, stride_ak, stride_ar, stride_rk, stride_re,
    ROUTING: tl.constexpr, DOT_PRECISION: tl.constexpr, A_PACKED: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """One K step of the shrink on the x tile [BLOCK_M, BLOCK_K] of reduction indices kk: (acc_u + x·A_cat[kk],
    logits + x·router[kk]); the router logits float32-grade (:func:`.split_dot.dot_exact_a`), only with token
    routing. ``A_PACKED``: lora_a_ptr is the packed A_cat [K, BLOCK_J] in x's dtype (row stride stride_ak; whole
    rows, no column mask); else lora_a [E, K, R] float32 at the given strides, cast to x's dtype for the dot."""
    DT: tl.constexpr = x_tile.dtype
    if A_PACKED:
        a_tile = tl.load(
            lora_a_ptr + kk[:, None] * stride_ak + tl.arange(0, BLOCK_J)[None, :], mask=k_mask[:, None], other=0.0
        )
    else:
        a_tile = tiles.load_tile(lora_a_ptr, kk * stride_ak, expert * stride_ae + rank * stride_ar, k_mask, col_real)
    acc_u = tl.dot(x_tile, a_tile.to(DT), acc_u, input_precision=DOT_PRECISION)
    if ROUTING == 1:
        router_tile = tiles.load_tile(router_ptr, kk * stride_rk, offs_e * stride_re, k_mask, offs_e < E)
        logits = split_dot.dot_exact_a(x_tile, router_tile, logits, DT, DOT_PRECISION)
    return acc_u, logits


@triton.jit
def _shrink_rows(
    x_ptr, lora_a_ptr, router_ptr, probs_ptr, rows, m_mask, K, E, R,
    stride_xt, stride_xk, stride_ae, stride_ak, stride_ar, stride_rk, stride_re, stride_pt, stride_pe,
    scale,
    ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    A_PACKED: tl.constexpr = False,
):  # fmt: skip
    """The shrink of the x rows ``rows`` [BLOCK_M] int64 (and the same rows of probs): U = x·A_cat and the
        router logits x·router (float32, hi/lo for 16-bit x) in one pass over K, then p (softmax / top-k / given /
        ones). Returns (U, p_soft, U′ = scale·U·p), float32, U and U′ [BLOCK_M, BLOCK_E·RANK_PAD] in the padded
        column layout (:func:`_expert_columns`). lora_a_ptr / router_ptr point at one adapter's [E, K, R] / [K, E]
    (float32), or with ``A_PACKED`` lora_a_ptr at the packed A_cat [K, BLOCK_E·RANK_PAD] (x's dtype, row stride
    stride_ak)."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_e = tl.arange(0, BLOCK_E)
    expert, rank, col_real = _expert_columns(E, R, BLOCK_E, RANK_PAD)
    acc_u = tl.zeros((BLOCK_M, BLOCK_E * RANK_PAD), dtype=tl.float32)
    logits = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        x_tile = tiles.load_tile(x_ptr, rows * stride_xt, kk * stride_xk, m_mask, k_mask)
        acc_u, logits = _shrink_step(
            x_tile, kk, k_mask, acc_u, logits, lora_a_ptr, router_ptr, expert, rank, col_real, offs_e, E,
            stride_ae, stride_ak, stride_ar, stride_rk, stride_re, ROUTING, DOT_PRECISION, A_PACKED,
            BLOCK_E * RANK_PAD,
        )  # fmt: skip

    p, p_soft = _forward_probs(
        logits, probs_ptr, rows, m_mask, offs_e, E, stride_pt, stride_pe,
        ROUTING, TOP_K, RENORMALIZE, BLOCK_M, BLOCK_E,
    )  # fmt: skip
    return acc_u, p_soft, _scale_per_expert(acc_u, p, BLOCK_M, BLOCK_E, RANK_PAD) * scale


@triton.jit
def _tail_dot(
    acc, tail_ptr, tail_rows, m_mask, adapter_ptr, offs_n, n_mask, E, R, stride_ae, stride_ar, stride_an,
    DOT_PRECISION: tl.constexpr, BLOCK_E: tl.constexpr, RANK_PAD: tl.constexpr, TAIL_STEP: tl.constexpr,
    ADAPTER_PACKED: tl.constexpr = False,
):  # fmt: skip
    """acc + tail·adapter_cat: the E·R reduction over the padded columns c = e·RANK_PAD + j, TAIL_STEP at a
    time. tail [M, E·R] (activation dtype, unit column stride) at the row offsets ``tail_rows`` [BLOCK_M];
    adapter [E, R, N] float32, cast to the tail's dtype for the dot; adapter_cat[e·R + j, n] = adapter[e, j, n].
    ``ADAPTER_PACKED``: the adapter is packed in the tail's dtype, element (c, n) at c·stride_ae + n·stride_an
    (padded columns hold zeros: no column mask; stride_ar unused)."""
    DT: tl.constexpr = tail_ptr.dtype.element_ty
    for c0 in range(0, BLOCK_E * RANK_PAD, TAIL_STEP):
        offs_c = c0 + tl.arange(0, TAIL_STEP)
        expert = offs_c // RANK_PAD
        rank = offs_c % RANK_PAD
        real = (expert < E) & (rank < R)
        t_tile = tiles.load_tile(tail_ptr, tail_rows, expert * R + rank, m_mask, real)
        if ADAPTER_PACKED:
            ad_tile = tl.load(
                adapter_ptr + offs_c[:, None] * stride_ae + offs_n[None, :] * stride_an, mask=n_mask[None, :], other=0.0
            )
        else:
            ad_tile = tiles.load_tile(
                adapter_ptr, expert * stride_ae + rank * stride_ar, offs_n * stride_an, real, n_mask
            )
        acc = tl.dot(t_tile, ad_tile.to(DT), acc, input_precision=DOT_PRECISION)
    return acc


# ------------------------------------------------------------------------------------------------
# Autotune configurations (data) and pruning
# ------------------------------------------------------------------------------------------------


def _config(warps: int, stages: int, **blocks: int) -> triton.Config:
    """A tile configuration: block sizes (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_C, BLOCK_T, N_TILES, GROUP_M)."""
    return triton.Config(dict(blocks), num_warps=warps, num_stages=stages)


def _fused(bm: int, bn: int, bk: int, warps: int, stages: int, n_tiles: int) -> triton.Config:
    return _config(warps, stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, N_TILES=n_tiles)


def _gemm(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return _config(warps, stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)


#: One-kernel forward: tiles of y, BLOCK_M tokens x BLOCK_N outputs, BLOCK_K the reduction step; N_TILES
#: column tiles per program share one shrink. Ordered by preference; the first survivor of pruning is
#: the default (and what the interpreter runs).
FUSED_CONFIGS = [
    _fused(128, 128, 32, 8, 3, 1),
    _fused(128, 128, 32, 8, 3, 4),  # large T: the shrink recomputed for every 512 columns only
    _fused(64, 128, 64, 8, 3, 1),
    _fused(64, 128, 64, 8, 3, 4),
    _fused(64, 32, 32, 8, 3, 1),  # wide E·r (E = 15, r = 16): the float32 lora_a tile, U in registers
    _fused(128, 256, 64, 8, 2, 1),
    _fused(64, 64, 64, 4, 3, 1),
    _fused(32, 64, 64, 4, 2, 1),
    _fused(16, 64, 64, 4, 2, 1),
    _fused(16, 32, 32, 4, 2, 1),  # float32 activations
]
#: Row-tile passes with a reduction loop and an E·r-wide float32 accumulator: the forward shrink (BLOCK_K
#: steps over K) and the backward G = dy·B_catᵀ (BLOCK_K steps over N). Short row tiles keep enough
#: programs for the SMs (T = 2048 -> 64-128 programs) and the [BLOCK_K, E·r] float32 adapter tile small.
ROW_PASS_CONFIGS = [
    _config(4, 3, BLOCK_M=32, BLOCK_K=32),  # spill-free for fp16 / bf16 at E·r <= 64 (32x64 spills fp16 sm_90)
    _config(4, 3, BLOCK_M=32, BLOCK_K=64),
    _config(4, 3, BLOCK_M=16, BLOCK_K=64),
    _config(8, 3, BLOCK_M=64, BLOCK_K=64),
    _config(4, 2, BLOCK_M=16, BLOCK_K=32),  # wide E·r (BLOCK_J = 256) and float32: a small float32 adapter tile
    _config(4, 2, BLOCK_M=16, BLOCK_K=16),  # the 16-bit shrink at BLOCK_J = 256 (16x32 spills, AOT reports)
]
#: Base GEMM over the extended K (forward: y = x·Wᵀ + U′·B_cat + b; backward: dx = dy·W + dU·A_catᵀ +
#: dlogits·routerᵀ): tiles of the output, BLOCK_K the reduction step.
GEMM_CONFIGS = [
    _gemm(128, 128, 64, 8, 3),
    _gemm(128, 256, 64, 8, 3),
    _gemm(128, 64, 64, 8, 3),  # dx with the dlogits·routerᵀ tail (spill-free on sm_80 in the AOT reports)
    _gemm(64, 128, 64, 4, 4),
    _gemm(64, 64, 32, 4, 3),
    _gemm(32, 32, 32, 4, 3),  # float32 activations (FMA dots: accumulators and operands in registers)
    _gemm(16, 64, 64, 4, 3),  # decode-sized T
    _gemm(16, 32, 32, 4, 2),
]
#: Adapter weight gradients (partial sums over a REDUCE_ROWS token chunk): BLOCK_C columns of x (or dy)
#: x J_STEP padded adapter columns, BLOCK_T tokens a step.
WGRAD_CONFIGS = [
    _config(8, 3, BLOCK_C=128, BLOCK_T=64),
    _config(4, 3, BLOCK_C=64, BLOCK_T=64),
    _config(4, 3, BLOCK_C=64, BLOCK_T=32),
    _config(4, 3, BLOCK_C=32, BLOCK_T=32),
    _config(4, 2, BLOCK_C=16, BLOCK_T=32),  # float32 activations
]
#: Packing lora_a / lora_b into A_cat / B_cat: BLOCK_C rows of A_cat (columns of B_cat) a program, a
#: [BLOCK_C, BLOCK_J] float32 tile within 64 registers a thread.
PACK_CONFIGS = [
    _config(4, 1, BLOCK_C=64),
    _config(4, 1, BLOCK_C=32),  # wide E·r (BLOCK_J = 256)
    _config(4, 1, BLOCK_C=16),
]
#: Which table each launch role tunes over.
ROLE_CONFIGS = {
    "pack": PACK_CONFIGS,
    "fused": FUSED_CONFIGS,
    "shrink": ROW_PASS_CONFIGS,
    "expand": GEMM_CONFIGS,
    "grad_u": ROW_PASS_CONFIGS,
    "dx": GEMM_CONFIGS,
    "wgrad_a": WGRAD_CONFIGS,
    "wgrad_b": WGRAD_CONFIGS,
}
#: Per-thread float32 register budget of the estimates below (registers), and the shared-memory budget
#: of the pipelined tiles (sm_80: 163 KiB usable per block).
REGISTER_BUDGET = 192
SHARED_MEMORY_BUDGET = 160 * 1024
DOT_MIN = 16  # tl.dot needs M, N, K >= 16


@dataclass(frozen=True)
class Problem:
    """What pruning looks at: the launch role, its row / column / reduction extents and the padded adapter
    widths. ``elem``: bytes of a dot operand (2 for 16-bit activations, 4 for float32)."""

    role: str
    rows: int
    cols: int
    reduction: int
    block_e: int
    rank_pad: int
    elem: int
    router_cols: int  # float32-grade router / dlogits dot columns (0, BLOCK_E or 2-3·BLOCK_E)

    @property
    def block_j(self) -> int:
        return self.block_e * self.rank_pad


def legal_config(cfg: triton.Config, pb: Problem) -> bool:
    """Whether a tile configuration compiles within the budgets for a problem (estimates of float32
    registers per thread and of pipelined shared memory; the AOT reports check the defaults):

    * every tl.dot has M, N, K >= 16;
    * fused forward: y + U + logits accumulators in registers; x, W and the float32 lora_a / router tiles
      pipelined in shared memory;
    * row passes (shrink, G): the [BLOCK_M, E·r] accumulator plus the [BLOCK_K, E·r] float32 adapter tile
      within 128 registers; the 16-bit shrink beyond 128 padded adapter columns BLOCK_K <= 16 (calibrated on
      the AOT reports: 16x32 spills at E·r = 256, the U / softmax epilogue next to the router's hi/lo tiles);
    * float32 activations (FMA dots: operands and accumulators in registers), calibrated on the AOT reports
      so that the defaults do not spill: fused BLOCK_M·BLOCK_N <= 512, BLOCK_K <= 32 and BLOCK_M·(BLOCK_N + E·r)
      <= 4608, row passes BLOCK_M·BLOCK_K
      <= 512, GEMM BLOCK_M·BLOCK_N <= 1024 (512 beyond 64 adapter columns), weight gradients BLOCK_C·BLOCK_T
      <= 512;
    * GEMM: the accumulator plus one TAIL_STEP slice of the tail operands;
      with the float32-grade dlogits·routerᵀ tail (dx, token routing) BLOCK_M·BLOCK_N <= 8192 (calibrated on
      the AOT reports: 128x128 spills 232 bytes on sm_80);
    * weight gradients: the [BLOCK_C, J_STEP] (+ [BLOCK_C, BLOCK_E]) accumulators and a [BLOCK_T, J_STEP]
      operand within 128 registers (every table BLOCK_T divides REDUCE_ROWS = 256; the kernel masks each
      chunk's rows, so any BLOCK_T is correct);
    * packing: the [BLOCK_C, BLOCK_J] float32 tile within 64 registers.
    """
    kw = cfg.kwargs
    threads = 32 * cfg.num_warps
    bj, be, elem = pb.block_j, pb.block_e, pb.elem
    if pb.role == "pack":
        return kw["BLOCK_C"] * bj / threads <= 64
    if pb.role == "fused":
        bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
        regs = (bm * bn + bm * bj + bm * be) / threads
        stage = bm * bk * elem + bk * bn * elem + bk * (bj + be) * 4
        if elem == 4 and (bm * bn > 512 or bk > 32 or bm * (bn + bj) > 4608):  # float32 FMA dots (AOT reports)
            return False
        return min(bm, bn, bk) >= DOT_MIN and regs <= REGISTER_BUDGET and stage * cfg.num_stages <= SHARED_MEMORY_BUDGET
    if pb.role in ("shrink", "grad_u"):
        bm, bk = kw["BLOCK_M"], kw["BLOCK_K"]
        regs = (bm * bj + bm * be + bk * bj) / threads
        stage = bm * bk * elem + bk * (bj + be) * 4
        if elem == 4 and bm * bk > 512:  # float32 FMA dots (AOT: 32x64 spills on sm_80)
            return False
        if pb.role == "shrink" and elem == 2 and bj > 128 and bk > 16:  # AOT: 16x32 spills 56-120 bytes
            return False
        return min(bm, bk) >= DOT_MIN and regs <= 128 and stage * cfg.num_stages <= SHARED_MEMORY_BUDGET
    if pb.role in ("expand", "dx"):
        bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
        step = _tail_step(bj)
        regs = (bm * bn + (bm * step + step * bn) * elem / 4) / threads
        if elem == 4 and bm * bn > (1024 if bj <= 64 else 512):  # float32 FMA dots: 32x64 spills (AOT)
            return False
        if pb.router_cols and bm * bn > 8192:  # the hi/lo dlogits·routerᵀ tail: 128x128 spills on sm_80 (AOT)
            return False
        stage = (bm + bn) * bk * elem
        return min(bm, bn, bk) >= DOT_MIN and regs <= REGISTER_BUDGET and stage * cfg.num_stages <= SHARED_MEMORY_BUDGET
    bc, bt = kw["BLOCK_C"], kw["BLOCK_T"]  # weight gradients, J_STEP adapter columns a program
    step = _tail_step(bj)
    regs = (bc * step + bc * be + bt * step * elem / 4) / threads
    stage = bc * bt * elem + bt * (step * elem + be * 4)
    if elem == 4 and bc * bt > 512:  # float32 FMA dots (AOT: 128x64 spills on sm_80)
        return False
    return min(bc, bt) >= DOT_MIN and regs <= 128 and stage * cfg.num_stages <= SHARED_MEMORY_BUDGET


def legal_configs(pb: Problem) -> list[triton.Config]:
    """The configurations of ``pb.role``'s table that fit (order kept: the first is the default), and among
    them those not much larger than the problem (no tile mostly padding for decode-sized T)."""
    configs = ROLE_CONFIGS[pb.role]
    legal = [c for c in configs if legal_config(c, pb)]
    if not legal:
        raise ValueError(
            f"molora_linear Triton kernels: no {pb.role} tile configuration fits {pb.block_j} padded adapter "
            f"columns (BLOCK_E = {pb.block_e}, RANK_PAD = {pb.rank_pad})"
        )
    row_key = "BLOCK_C" if pb.role.startswith("wgrad") or pb.role == "pack" else "BLOCK_M"
    rows = pb.cols if pb.role.startswith("wgrad") or pb.role == "pack" else pb.rows
    snug = [c for c in legal if c.kwargs[row_key] <= max(DOT_MIN, triton.next_power_of_2(rows))]
    if pb.role in ("fused", "expand", "dx"):
        snug = [
            c
            for c in snug
            if c.kwargs["BLOCK_N"] * c.kwargs.get("N_TILES", 1) <= max(32, triton.next_power_of_2(pb.cols))
        ]
    return snug or legal[-1:]


def _tail_step(block_j: int) -> int:
    """Padded adapter columns per step: the GEMM's tail (a dot's K) and a weight-gradient program's share
    (J_STEP): the whole BLOCK_E·RANK_PAD up to 64."""
    return min(block_j, 64)


def _problem_from_args(role: str, args: dict) -> Problem:
    """The :class:`Problem` of a kernel launch from its named arguments and constexprs (autotune pruning)."""
    be, rp = args["BLOCK_E"], args["RANK_PAD"]
    if role == "pack":  # cols: the longer of the packed extents (A_cat's K rows, B_cat's N columns)
        return Problem(role, 0, max(args["K"] * args["PACK_A"], args["N"] * args["PACK_B"]), 0, be, rp, 4, 0)
    elem = 4 if args["DOT_PRECISION"] == "ieee" else 2
    if role == "fused":
        rows, cols, red = args["T"], args["N"], args["K"]
    elif role == "shrink":
        rows, cols, red = args["T"], 0, args["K"]
    elif role == "grad_u":
        rows, cols, red = args["T"], 0, args["N"]
    elif role in ("expand", "dx"):
        rows, cols, red = args["M"], args["N"], args["K"]
    else:
        rows, cols, red = args["T"], args["C"], args["T"]
    return Problem(role, rows, cols, red, be, rp, elem, _router_cols(role, args, be, elem))


def _router_cols(role: str, flags: dict, block_e: int, elem: int) -> int:
    """Columns of the float32-grade router / dlogits dots a launch runs (FLOP model): hi + lo of the router
    (x·router, xᵀ·dlogits), hi·hi + hi·lo + lo·hi (dlogits·routerᵀ); one ieee dot for float32."""
    if role in ("fused", "shrink") and flags.get("ROUTING") == TOKEN_ROUTER:
        return block_e * (1 if elem == 4 else 2)
    if role == "dx" and flags.get("ROUTER_TAIL"):
        return block_e * (1 if elem == 4 else 3)
    if role == "wgrad_a" and flags.get("HAS_RHS2"):
        return block_e * (1 if elem == 4 else 2)
    return 0


def _pruner(role: str) -> Callable:
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return legal_configs(_problem_from_args("dx" if args.get("ROUTER_TAIL") else role, args))

    return prune


# ------------------------------------------------------------------------------------------------
# Packing (first launch of the forward and of the backward)
# ------------------------------------------------------------------------------------------------


@triton.autotune(
    configs=PACK_CONFIGS,
    key=["K", "N", "E", "R", "PACK_A", "PACK_B", "SPLIT_B"],
    prune_configs_by={"early_config_prune": _pruner("pack")},
    do_bench=do_bench,
)
@triton.jit
def _molora_pack_kernel(
    # inputs: lora_a [E, K, R], lora_b [E, R, N] (float32)
    lora_a_ptr, lora_b_ptr,
    # outputs (activation dtype, row-major): A_cat [K, BLOCK_J], B_cat [BLOCK_J, N], B_lo [BLOCK_J, N]
    a_cat_ptr, b_cat_ptr, b_lo_ptr,
    # sizes
    K, N, E, R,
    # strides
    stride_ae, stride_ak, stride_ar, stride_be, stride_br, stride_bn,
    # feature flags
    PACK_A: tl.constexpr, PACK_B: tl.constexpr, SPLIT_B: tl.constexpr,
    # block sizes
    BLOCK_E: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """A_cat[k, c] = lora_a[e, k, j] and B_cat[c, n] = lora_b[e, j, n] for the padded columns c = e·RANK_PAD + j
    (0 where e >= E or j >= R), in the activation dtype (round to nearest even), written once per call so
    that every program of the later launches reads whole contiguous rows of half the bytes and casts
    nothing. ``SPLIT_B``: also B_lo = (lora_b − B_cat) rounded, the float32 remainder (B_cat + B_lo carries
    16 / 22 mantissa bits in bfloat16 / float16) for a float32-grade G = dy·B_catᵀ.

    Programs [0, ⌈K / BLOCK_C⌉) (``PACK_A``) pack BLOCK_C rows of A_cat, the next ⌈N / BLOCK_C⌉
    (``PACK_B``) BLOCK_C columns of B_cat."""
    pid = tl.program_id(0)
    expert, rank, col_real = _expert_columns(E, R, BLOCK_E, RANK_PAD)
    offs_j = tl.arange(0, BLOCK_E * RANK_PAD)
    offs = tl.arange(0, BLOCK_C)
    num_a = tl.cdiv(K, BLOCK_C) if PACK_A else 0
    if PACK_A:
        if pid < num_a:
            kk = pid * BLOCK_C + offs
            k_mask = kk < K
            a = tiles.load_tile(lora_a_ptr, kk * stride_ak, expert * stride_ae + rank * stride_ar, k_mask, col_real)
            dst = kk[:, None] * (BLOCK_E * RANK_PAD) + offs_j[None, :]
            tl.store(a_cat_ptr + dst, a.to(a_cat_ptr.dtype.element_ty), mask=k_mask[:, None])
    if PACK_B:
        if pid >= num_a:
            nn = (pid - num_a) * BLOCK_C + offs
            n_mask = nn < N
            b = tiles.load_tile(lora_b_ptr, expert * stride_be + rank * stride_br, nn * stride_bn, col_real, n_mask)
            dst = offs_j[:, None] * N + nn[None, :]
            b_hi = b.to(b_cat_ptr.dtype.element_ty)
            tl.store(b_cat_ptr + dst, b_hi, mask=n_mask[None, :])
            if SPLIT_B:
                b_lo = (b - b_hi.to(tl.float32)).to(b_lo_ptr.dtype.element_ty)
                tl.store(b_lo_ptr + dst, b_lo, mask=n_mask[None, :])


# ------------------------------------------------------------------------------------------------
# Forward kernels
# ------------------------------------------------------------------------------------------------

_FUSED_KEY = ["tokens_bucket", "N", "K", "E", "R", "ROUTING"]


@triton.autotune(
    configs=FUSED_CONFIGS,
    key=_FUSED_KEY,
    prune_configs_by={"early_config_prune": _pruner("fused")},
    do_bench=do_bench,
)
@triton.jit
def _molora_fused_forward_kernel(
    # inputs: x, weight, bias, the packed A_cat [K, BLOCK_J] and B_cat [BLOCK_J, N] (x's dtype), router, probs
    x_ptr, weight_ptr, bias_ptr, a_cat_ptr, b_cat_ptr, router_ptr, probs_ptr,
    # outputs: y, and (SAVE_FOR_BACKWARD) U float32 [T, E·R] and p_soft float32 [T, E]
    y_ptr, u_ptr, p_soft_ptr,
    # sizes (tokens_bucket: autotune key only)
    T, N, K, E, R, tokens_bucket,
    # strides
    stride_xt, stride_xk, stride_wn, stride_wk, stride_rk, stride_re, stride_pt, stride_pe,
    stride_yt, stride_yn, stride_ut, stride_st,
    # scalars
    scale,
    # feature flags
    ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    SAVE_FOR_BACKWARD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_E: tl.constexpr, RANK_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    N_TILES: tl.constexpr,
):  # fmt: skip
    """One-kernel schedule: y = x·Wᵀ + scale·(U·p)·B_cat + b for N_TILES [BLOCK_M, BLOCK_N] tiles side by side.

    The shrink runs in the first tile's K loop only; the later tiles reuse U′ from registers, so the
    recomputed shrink costs (BLOCK_J + router columns) / (N_TILES·BLOCK_N) of the base GEMM's work.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    BLOCK_J: tl.constexpr = BLOCK_E * RANK_PAD
    # ---- this program's rows and group of N_TILES column tiles
    pid_m, pid_n = tiles.grouped_ids(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(N, BLOCK_N * N_TILES), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)  # pointer arithmetic in int64: T·K may exceed 2^31
    offs_k = tl.arange(0, BLOCK_K)
    offs_e = tl.arange(0, BLOCK_E)
    m_mask = offs_m < T
    expert, rank, col_real = _expert_columns(E, R, BLOCK_E, RANK_PAD)

    for tile in tl.static_range(N_TILES):
        offs_n = (pid_n * N_TILES + tile) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        # ---- K loop: base GEMM; in the first tile the shrink x·A_cat and the router logits share each x tile
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if tile == 0:
            acc_u = tl.zeros((BLOCK_M, BLOCK_E * RANK_PAD), dtype=tl.float32)
            logits = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < K
            x_tile = tiles.load_tile(x_ptr, rows * stride_xt, kk * stride_xk, m_mask, k_mask)
            w_tile = tiles.load_tile(weight_ptr, kk * stride_wk, offs_n * stride_wn, k_mask, n_mask)
            acc = tl.dot(x_tile, w_tile, acc, input_precision=DOT_PRECISION)
            if tile == 0:
                acc_u, logits = _shrink_step(
                    x_tile, kk, k_mask, acc_u, logits, a_cat_ptr, router_ptr, expert, rank, col_real, offs_e, E,
                    0, BLOCK_J, 0, stride_rk, stride_re, ROUTING, DOT_PRECISION, True, BLOCK_J,
                )  # fmt: skip

        if tile == 0:
            # ---- routing weights p [BLOCK_M, BLOCK_E] (float32; padded experts 0), U′ = scale·U·p
            p, p_soft = _forward_probs(
                logits, probs_ptr, rows, m_mask, offs_e, E, stride_pt, stride_pe,
                ROUTING, TOP_K, RENORMALIZE, BLOCK_M, BLOCK_E,
            )  # fmt: skip
            u_scaled = (_scale_per_expert(acc_u, p, BLOCK_M, BLOCK_E, RANK_PAD) * scale).to(DT)
            # the first program of each row block saves U and p_soft for backward
            if SAVE_FOR_BACKWARD:
                if pid_n == 0:
                    tiles.store_tile(u_ptr, rows * stride_ut, expert * R + rank, acc_u, m_mask, col_real)
                    if ROUTING == 1:
                        tiles.store_tile(p_soft_ptr, rows * stride_st, offs_e, p_soft, m_mask, offs_e < E)

        # ---- expand: E·r extra columns of K, acc += U′ · B_cat (packed: whole padded rows)
        offs_j = tl.arange(0, BLOCK_J)
        b_tile = tl.load(b_cat_ptr + offs_j[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0.0)
        acc = tl.dot(u_scaled, b_tile, acc, input_precision=DOT_PRECISION)

        # ---- epilogue: bias, one store of the y tile
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tiles.store_tile(y_ptr, rows * stride_yt, offs_n * stride_yn, acc.to(y_ptr.dtype.element_ty), m_mask, n_mask)


_ROW_PASS_KEY = ["tokens_bucket", "K", "E", "R", "ROUTING"]


@triton.autotune(
    configs=ROW_PASS_CONFIGS,
    key=_ROW_PASS_KEY,
    prune_configs_by={"early_config_prune": _pruner("shrink")},
    do_bench=do_bench,
)
@triton.jit
def _molora_shrink_kernel(
    # inputs: x, the packed A_cat [K, BLOCK_E·RANK_PAD] (x's dtype), router, probs
    x_ptr, a_cat_ptr, router_ptr, probs_ptr,
    # outputs: U′ [T, E·R] (activation dtype); (SAVE_FOR_BACKWARD) U float32 [T, E·R], p_soft float32 [T, E]
    u_scaled_ptr, u_ptr, p_soft_ptr,
    # sizes (tokens_bucket: autotune key only)
    T, K, E, R, tokens_bucket,
    # strides (the [T, E·R] and [T, E] outputs are row-major with unit column stride)
    stride_xt, stride_xk, stride_rk, stride_re, stride_pt, stride_pe, stride_vt, stride_ut, stride_st,
    # scalars
    scale,
    # feature flags
    ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    SAVE_FOR_BACKWARD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_E: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Two-kernel schedule, pass 1, rows [pid·BLOCK_M, +BLOCK_M): one pass over x gives U = x·A_cat and the
    router logits x·router (float32, hi/lo for 16-bit x), then p (softmax / top-k / given / ones) and
    U′ = scale·U·p, stored in the activation dtype for the expand GEMM."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)  # pointer arithmetic in int64: T·K may exceed 2^31
    m_mask = offs_m < T
    offs_e = tl.arange(0, BLOCK_E)
    expert, rank, col_real = _expert_columns(E, R, BLOCK_E, RANK_PAD)
    acc_u, p_soft, u_scaled = _shrink_rows(
        x_ptr, a_cat_ptr, router_ptr, probs_ptr, rows, m_mask, K, E, R,
        stride_xt, stride_xk, 0, BLOCK_E * RANK_PAD, 0, stride_rk, stride_re, stride_pt, stride_pe,
        scale,
        ROUTING, TOP_K, RENORMALIZE, DOT_PRECISION, BLOCK_E, RANK_PAD, BLOCK_M, BLOCK_K, True,
    )  # fmt: skip
    u_mask = m_mask[:, None] & col_real[None, :]
    cols = (expert * R + rank)[None, :]
    tl.store(u_scaled_ptr + rows[:, None] * stride_vt + cols, u_scaled.to(u_scaled_ptr.dtype.element_ty), mask=u_mask)
    if SAVE_FOR_BACKWARD:
        tl.store(u_ptr + rows[:, None] * stride_ut + cols, acc_u, mask=u_mask)
        if ROUTING == 1:
            tiles.store_tile(p_soft_ptr, rows * stride_st, offs_e, p_soft, m_mask, offs_e < E)


_GEMM_KEY = ["tokens_bucket", "N", "K", "E", "R", "ROUTER_TAIL"]


@triton.autotune(
    configs=GEMM_CONFIGS,
    key=_GEMM_KEY,
    prune_configs_by={"early_config_prune": _pruner("expand")},
    do_bench=do_bench,
)
@triton.jit
def _molora_gemm_kernel(
    # inputs: a [M, K], b [K, N] (strided views of the frozen weight), tail [M, E·R] (activation dtype),
    # adapter_cat [BLOCK_E·RANK_PAD, N] (packed, activation dtype; a strided view), logits [M, E] and router
    # viewed as [E, N] (float32), bias [N], residual [M, N] (activation dtype)
    a_ptr, b_ptr, tail_ptr, adapter_ptr, logits_ptr, router_ptr, bias_ptr, residual_ptr,
    # output [M, N]
    out_ptr,
    # sizes (tokens_bucket: autotune key only)
    M, N, K, E, R, tokens_bucket,
    # strides (tail and logits: unit column stride)
    stride_am, stride_ak, stride_bk, stride_bn, stride_tm, stride_ac, stride_an,
    stride_lm, stride_re, stride_rn, stride_sm, stride_sn, stride_om, stride_on,
    # feature flags
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROUTER_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_E: tl.constexpr, RANK_PAD: tl.constexpr, TAIL_STEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out = a·b + tail·adapter_cat (+ logits·router, float32-grade) (+ bias) (+ residual), one [BLOCK_M, BLOCK_N]
    tile.

    Forward expand: a = x, b = Wᵀ, tail = U′, adapter_cat = B_cat (packed [BLOCK_J, N]): y = x·Wᵀ + U′·B_cat + b.
    Adapter-only forward expand (a frozen layer that runs its own forward): K = 0, residual = that layer's
    output: y = base + U′·B_cat; its backward dx: K = 0 (no dy·W term).
    Backward dx: a = dy, b = W, tail = dU, adapter_cat = A_catᵀ (the packed A_cat [K, BLOCK_J] read transposed),
    logits = dlogits, router = routerᵀ: dx = dy·W + dU·A_catᵀ + dlogits·routerᵀ. The tail adds E·R (padded
    BLOCK_J = BLOCK_E·RANK_PAD) columns to the reduction, TAIL_STEP at a time; adapter_cat row c = e·RANK_PAD + j.
    """
    DT: tl.constexpr = a_ptr.dtype.element_ty
    pid_m, pid_n = tiles.grouped_ids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    m_mask = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    # ---- K loop: the base GEMM
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        a_tile = tiles.load_tile(a_ptr, rows * stride_am, kk * stride_ak, m_mask, k_mask)
        b_tile = tiles.load_tile(b_ptr, kk * stride_bk, offs_n * stride_bn, k_mask, n_mask)
        acc = tl.dot(a_tile, b_tile, acc, input_precision=DOT_PRECISION)

    # ---- the E·R tail: extra reduction columns c = e·RANK_PAD + j, TAIL_STEP at a time
    acc = _tail_dot(
        acc, tail_ptr, rows * stride_tm, m_mask, adapter_ptr, offs_n, n_mask, E, R, stride_ac, 0, stride_an,
        DOT_PRECISION, BLOCK_E, RANK_PAD, TAIL_STEP, True,
    )  # fmt: skip
    if ROUTER_TAIL:
        offs_e = tl.arange(0, BLOCK_E)
        lg = tiles.load_tile(logits_ptr, rows * stride_lm, offs_e, m_mask, offs_e < E)
        rt = tiles.load_tile(router_ptr, offs_e * stride_re, offs_n * stride_rn, offs_e < E, n_mask)
        acc = split_dot.dot_split(lg, rt, acc, DT, DOT_PRECISION)

    # ---- epilogue: bias, residual, one store
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        acc += tiles.load_tile(residual_ptr, rows * stride_sm, offs_n * stride_sn, m_mask, n_mask).to(tl.float32)
    tiles.store_tile(out_ptr, rows * stride_om, offs_n * stride_on, acc.to(out_ptr.dtype.element_ty), m_mask, n_mask)


# ------------------------------------------------------------------------------------------------
# Backward kernels (the dx GEMM is _molora_gemm_kernel)
# ------------------------------------------------------------------------------------------------

_GRAD_U_KEY = ["tokens_bucket", "N", "E", "R", "ROUTING"]


@triton.autotune(
    configs=ROW_PASS_CONFIGS,
    key=_GRAD_U_KEY,
    prune_configs_by={"early_config_prune": _pruner("grad_u")},
    do_bench=do_bench,
)
@triton.jit
def _molora_grad_u_kernel(
    # inputs: dy, the packed B_cat [BLOCK_J, N] (dy's dtype) and (SPLIT_B) its low part, U float32, p_soft, probs
    dy_ptr, b_cat_ptr, b_lo_ptr, u_ptr, p_soft_ptr, probs_ptr,
    # outputs: dU and U′ [T, E·R] (activation dtype), d_route [T, E] float32 (dlogits, or d probs)
    d_u_ptr, u_scaled_ptr, d_route_ptr,
    # sizes (tokens_bucket: autotune key only)
    T, N, E, R, tokens_bucket,
    # strides (the [T, E·R] and [T, E] buffers are row-major with unit column stride)
    stride_dyt, stride_dyn, stride_ut, stride_st, stride_pt, stride_pe, stride_dut, stride_vt, stride_drt,
    # scalars
    scale,
    # feature flags
    ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    NEED_D_U: tl.constexpr, NEED_D_ROUTE: tl.constexpr, NEED_U_SCALED: tl.constexpr, SPLIT_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    # block sizes (BLOCK_K: the reduction step, here over N)
    BLOCK_E: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Backward pass 1, rows [pid·BLOCK_M, +BLOCK_M): G = dy·B_catᵀ (the E·R-wide GEMM, dy read once), then
    dU = scale·G·p, dp = scale·Σ_j G·U per expert -> dlogits (token routing) or d probs (sentence routing),
    and U′ = scale·U·p for d lora_b. U and p are loaded after the N loop: a [BLOCK_M, E·r] float32 U tile
    live across the loop next to G and the B_cat tile makes the widest adapters spill (E·r = 256).

    ``SPLIT_B`` (16-bit dy with a probability gradient): G = dy·B_hiᵀ + dy·B_loᵀ, float32-grade (dy is exact
    in its dtype, B_hi + B_lo carries the float32 lora_b to 16 / 22 bits): dp feeds the softmax backward,
    whose dp − Σ_e p·dp cancels, and a 16-bit B_cat there breaks the tolerance rule for d router at one token."""
    DT: tl.constexpr = dy_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)
    m_mask = offs_m < T
    offs_e = tl.arange(0, BLOCK_E)
    expert, rank, col_real = _expert_columns(E, R, BLOCK_E, RANK_PAD)
    u_mask = m_mask[:, None] & col_real[None, :]
    cols = (expert * R + rank)[None, :]

    if NEED_D_U or NEED_D_ROUTE:
        # ---- N loop: G = dy · B_catᵀ
        offs_k = tl.arange(0, BLOCK_K)
        offs_j = tl.arange(0, BLOCK_E * RANK_PAD)
        acc_g = tl.zeros((BLOCK_M, BLOCK_E * RANK_PAD), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_K):
            nn = n0 + offs_k
            n_mask = nn < N
            dy_tile = tiles.load_tile(dy_ptr, rows * stride_dyt, nn * stride_dyn, m_mask, n_mask)
            b_offs = offs_j[None, :] * N + nn[:, None]  # B_catᵀ [BLOCK_K, BLOCK_J]: whole padded rows of B_cat
            b_t_tile = tl.load(b_cat_ptr + b_offs, mask=n_mask[:, None], other=0.0)
            acc_g = tl.dot(dy_tile, b_t_tile, acc_g, input_precision=DOT_PRECISION)
            if SPLIT_B:
                acc_g = tl.dot(dy_tile, tl.load(b_lo_ptr + b_offs, mask=n_mask[:, None], other=0.0), acc_g)

    # ---- after the N loop: U, p and the products that need them (not held in registers across the loop)
    p, p_soft = _routing_weights(
        p_soft_ptr, probs_ptr, offs_m, m_mask, offs_e, E, stride_st, stride_pt, stride_pe,
        ROUTING, TOP_K, RENORMALIZE, BLOCK_M, BLOCK_E,
    )  # fmt: skip
    if NEED_U_SCALED or NEED_D_ROUTE:
        u = tl.load(u_ptr + rows[:, None] * stride_ut + cols, mask=u_mask, other=0.0)
    if NEED_U_SCALED:
        u_scaled = _scale_per_expert(u, p, BLOCK_M, BLOCK_E, RANK_PAD) * scale
        tl.store(u_scaled_ptr + rows[:, None] * stride_vt + cols, u_scaled.to(DT), mask=u_mask)
    if NEED_D_U or NEED_D_ROUTE:
        g = acc_g * scale
        if NEED_D_U:
            d_u = _scale_per_expert(g, p, BLOCK_M, BLOCK_E, RANK_PAD)
            tl.store(d_u_ptr + rows[:, None] * stride_dut + cols, d_u.to(DT), mask=u_mask)
        if NEED_D_ROUTE:
            dp = _sum_per_expert(g * u, BLOCK_M, BLOCK_E, RANK_PAD)
            if ROUTING == 1:
                d_route = routing.router_probs_backward(dp, p_soft, offs_e, E, TOP_K, RENORMALIZE)
            else:
                d_route = dp
            tiles.store_tile(d_route_ptr, rows * stride_drt, offs_e, d_route, m_mask, offs_e < E)


_WGRAD_KEY = ["tokens_bucket", "C", "E", "R", "rows_per_chunk", "HAS_RHS", "HAS_RHS2"]


@triton.autotune(
    configs=WGRAD_CONFIGS,
    key=_WGRAD_KEY,
    prune_configs_by={"early_config_prune": _pruner("wgrad_a")},
    do_bench=do_bench,
)
@triton.jit
def _molora_wgrad_kernel(
    # inputs: lhs [T, C] (x or dy, activation dtype), rhs [T, E·R] (dU or U′, activation dtype),
    # rhs2 [T, E] float32 (dlogits)
    lhs_ptr, rhs_ptr, rhs2_ptr,
    # outputs (float32 partial sums per token chunk z): out [z, c, e, j] at z·s_oz + c·s_oc + e·s_oe + j·s_or,
    # out2 [z, c, e] at z·s_o2z + c·s_o2c + e, rowsum [z, c] at z·s_sz + c
    out_ptr, out2_ptr, rowsum_ptr,
    # sizes (tokens_bucket: autotune key only); rows_per_chunk = REDUCE_ROWS
    T, C, E, R, tokens_bucket, rows_per_chunk,
    # strides
    stride_lt, stride_lc, stride_rt, stride_r2t,
    stride_oz, stride_oc, stride_oe, stride_or, stride_o2z, stride_o2c, stride_sz,
    # feature flags
    HAS_RHS: tl.constexpr, HAS_RHS2: tl.constexpr, ROW_SUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_E: tl.constexpr, RANK_PAD: tl.constexpr, J_STEP: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Partial sums over token chunk z (rows_per_chunk tokens) for BLOCK_C columns c of lhs and J_STEP padded
    adapter columns (e, j) (the grid splits BLOCK_E·RANK_PAD into J_STEP-wide tiles; the first one also
    does out2 and rowsum):
        out[z, c, e, j] = Σ_t lhs[t, c]·rhs[t, e·R + j]      (d lora_a from x, dU; d lora_bᵀ from dy, U′)
        out2[z, c, e]   = Σ_t lhs[t, c]·rhs2[t, e]          (d router from x, dlogits; float32-grade)
        rowsum[z, c]    = Σ_t lhs[t, c]                     (d bias from dy)
    Each program writes its tile once (no atomics); the launcher sums the chunks with torch."""
    DT: tl.constexpr = lhs_ptr.dtype.element_ty
    num_c = tl.cdiv(C, BLOCK_C)
    num_j: tl.constexpr = BLOCK_E * RANK_PAD // J_STEP
    pid = tl.program_id(0)
    chunk = pid // (num_c * num_j)
    pid_c = (pid // num_j) % num_c
    pid_j = pid % num_j
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_t = tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_j = pid_j * J_STEP + tl.arange(0, J_STEP)
    expert = offs_j // RANK_PAD
    rank = offs_j % RANK_PAD
    col_real = (expert < E) & (rank < R)
    # the first J tile's programs also do out2 and rowsum (masks as blocks: the interpreter wants them so)
    e_on = (offs_e < E) & ((offs_e * 0 + pid_j) == 0)
    c_on = c_mask & ((offs_c * 0 + pid_j) == 0)

    acc = tl.zeros((BLOCK_C, J_STEP), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_C, BLOCK_E), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first = chunk * rows_per_chunk
    end = tl.minimum(T, first + rows_per_chunk)
    for t0 in range(first, end, BLOCK_T):
        tt = t0 + offs_t
        t_mask = tt < end  # this chunk's rows only, whatever BLOCK_T
        rows = tt.to(tl.int64)
        lhs_t = tiles.load_tile(lhs_ptr, offs_c * stride_lc, rows * stride_lt, c_mask, t_mask)
        if HAS_RHS:
            rhs = tiles.load_tile(rhs_ptr, rows * stride_rt, expert * R + rank, t_mask, col_real)
            acc = tl.dot(lhs_t, rhs, acc, input_precision=DOT_PRECISION)
        if HAS_RHS2:
            rhs2 = tiles.load_tile(rhs2_ptr, rows * stride_r2t, offs_e, t_mask, e_on)
            acc2 = split_dot.dot_exact_a_scaled_b(lhs_t, rhs2, acc2, DT, DOT_PRECISION)  # rhs2: d logits
        if ROW_SUM:
            acc_s += tl.sum(lhs_t.to(tl.float32), axis=1)

    z = chunk.to(tl.int64)
    if HAS_RHS:
        cols = expert * stride_oe + rank * stride_or
        tiles.store_tile(out_ptr + z * stride_oz, offs_c * stride_oc, cols, acc, c_mask, col_real)
    if HAS_RHS2:
        tiles.store_tile(out2_ptr + z * stride_o2z, offs_c * stride_o2c, offs_e, acc2, c_mask, e_on)
    if ROW_SUM:
        tl.store(rowsum_ptr + z * stride_sz + offs_c, acc_s, mask=c_on)


# ------------------------------------------------------------------------------------------------
# Launch plan: framework-neutral (shapes, dtype names, strides; no tensors), consumed by the PyTorch launcher
# (molora_linear_torch.py) and by pemoe.jax.triton (jax-triton)
# ------------------------------------------------------------------------------------------------

#: Forced configurations per launch role (tests: multi-tile grids on small shapes); absent = autotune.
_FORCED: dict[str, triton.Config] = {}
#: A forced forward schedule (tests); None = the ``schedule=`` argument decides.
_FORCED_SCHEDULE: list[str | None] = [None]


class use_configs:
    """Context manager running the kernels with given configs instead of autotuning (tests, benchmarks).

    Keywords are launch roles: fused, shrink, expand (forward); grad_u, dx, wgrad_a, wgrad_b (backward).
    """

    def __init__(self, **configs: triton.Config | None):
        unknown = set(configs) - set(ROLE_CONFIGS)
        if unknown:
            raise ValueError(f"use_configs: unknown launch roles {sorted(unknown)}; roles are {sorted(ROLE_CONFIGS)}")
        self._new = configs

    def __enter__(self):
        self._old = dict(_FORCED)
        _FORCED.update({k: v for k, v in self._new.items() if v is not None})

    def __exit__(self, *exc):
        _FORCED.clear()
        _FORCED.update(self._old)


class use_schedule:
    """Context manager forcing the forward schedule ("fused" or "two_kernel") of every call inside it."""

    def __init__(self, schedule: str):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self._new = schedule

    def __enter__(self):
        self._old = _FORCED_SCHEDULE[0]
        _FORCED_SCHEDULE[0] = self._new

    def __exit__(self, *exc):
        _FORCED_SCHEDULE[0] = self._old


def forced_config(role: str) -> triton.Config | None:
    """The ``use_configs`` configuration of a launch role, None when it autotunes."""
    return _FORCED.get(role)


def _block_experts(num_experts: int, rank: int, routing_mode: int) -> tuple[int, int]:
    """(BLOCK_E, RANK_PAD): padded expert slots and rank, so BLOCK_E·RANK_PAD >= 16 and logits dots fit."""
    rank_pad = triton.next_power_of_2(rank)
    block_e = triton.next_power_of_2(num_experts)
    if routing_mode != NO_ROUTER:
        block_e = max(block_e, DOT_MIN)  # the logits / dlogits tiles are dot operands
    block_e = max(block_e, DOT_MIN // min(rank_pad, DOT_MIN))
    return block_e, rank_pad


def _routing_mode(router: Any, probs: Any) -> int:
    if probs is not None:
        return GIVEN_PROBS
    return NO_ROUTER if router is None else TOKEN_ROUTER


def _flags(dtype: Any, num_experts: int, rank: int, mode: int, top_k: int | None, renormalize: bool) -> dict:
    """The routing and precision constexprs; ``dtype``: the activation dtype (a name, or a torch / JAX dtype)."""
    block_e, rank_pad = _block_experts(num_experts, rank, mode)
    full = top_k is None or top_k >= num_experts  # all experts kept: p_soft renormalised is p_soft
    return dict(
        ROUTING=mode,
        TOP_K=0 if full else int(top_k),
        RENORMALIZE=bool(renormalize) and not full,
        DOT_PRECISION="ieee" if dtype_name(dtype) == "float32" else "tf32",
        BLOCK_E=block_e,
        RANK_PAD=rank_pad,
    )


def _bucket(t: int) -> int:
    return triton.next_power_of_2(t)


@dataclass(frozen=True)
class MoLoRAProblem:
    """One call's shapes and features: x [T, K] (activation dtype name ``dtype``), weight [N, K] (``has_weight``
    False: the adapter-only op, y = base + delta), lora_a [E, K, r], lora_b [E, r, N], routing ``mode``
    (NO_ROUTER, TOKEN_ROUTER, GIVEN_PROBS), top-k as the kernels take it (0: none)."""

    T: int
    K: int
    N: int
    E: int
    R: int
    dtype: str
    mode: int
    top_k: int | None = None
    renormalize: bool = False
    has_weight: bool = True
    has_bias: bool = False
    has_base: bool = False

    @property
    def flags(self) -> dict:
        return _flags(self.dtype, self.E, self.R, self.mode, self.top_k, self.renormalize)


def plan_problem(
    x_shape: tuple[int, int],
    lora_a_shape: tuple[int, int, int],
    lora_b_shape: tuple[int, int, int],
    dtype: Any,
    *,
    has_router: bool,
    has_probs: bool,
    top_k: int | None,
    renormalize: bool,
    has_weight: bool = True,
    has_bias: bool = False,
    has_base: bool = False,
) -> MoLoRAProblem:
    """The :class:`MoLoRAProblem` of a call, after the kernel limits that shapes and the dtype show (activation
    dtype, adapter width); the launchers check devices and the framework-specific rest."""
    name = dtype_name(dtype)
    if name not in ITEMSIZE:
        raise TypeError(f"molora_linear Triton kernels support x in float16, bfloat16 or float32, got {name}")
    t, k = x_shape
    e, _, r = lora_a_shape
    mode = GIVEN_PROBS if has_probs else TOKEN_ROUTER if has_router else NO_ROUTER
    block_e, rank_pad = _block_experts(e, r, mode)
    if block_e * rank_pad > MAX_ADAPTER_COLUMNS:
        raise ValueError(
            f"molora_linear Triton kernels: lora_a [E, K, r] with E = {e}, r = {r} needs "
            f"{block_e * rank_pad} padded adapter columns (E and r rounded up to powers of two); at most "
            f"{MAX_ADAPTER_COLUMNS} are supported"
        )
    return MoLoRAProblem(
        t, k, lora_b_shape[2], e, r, name, mode, top_k, bool(renormalize), has_weight, has_bias, has_base
    )


def _launch(role: str, kernel, inputs, outputs, scalars: dict, constexprs: dict, grid) -> Launch:
    """A :class:`.plan.Launch` with the role's configurations: the forced one, else what pruning keeps."""
    forced = forced_config(role)
    configs = [forced] if forced is not None else legal_configs(_problem_from_args(role, {**scalars, **constexprs}))
    return Launch(
        role, f"pemoe_molora_{role}", kernel, tuple(inputs), tuple(outputs), scalars, constexprs, grid, tuple(configs)
    )


def _two(strides: tuple[int, ...] | None) -> tuple[int, int]:
    return (strides[0], strides[1]) if strides is not None else (0, 0)


def _gemm_launch(
    role: str, m: int, n: int, k: int, inputs: tuple, b_strides, a_strides, tail_stride: int, adapter_strides,
    logits_stride: int, router_strides, residual_strides, flags: dict, has_bias: bool,
):  # fmt: skip
    """out [M, N] = a [M, K]·b + tail·adapter_cat (+ logits·router) (+ bias) (+ residual) with
    _molora_gemm_kernel; ``inputs``: (a, b, tail, adapter_cat, logits, router, bias, residual) names (None:
    absent; k = 0: no base GEMM, the adapter-only op, with ``b`` any array the empty K loop never reads);
    ``adapter_strides``: (padded column c, output column n) strides of the packed adapter_cat."""
    scalars = dict(
        M=m, N=n, K=k, E=flags["E"], R=flags["R"], tokens_bucket=_bucket(m),
        stride_am=a_strides[0], stride_ak=a_strides[1], stride_bk=b_strides[0], stride_bn=b_strides[1],
        stride_tm=tail_stride, stride_ac=adapter_strides[0], stride_an=adapter_strides[1],
        stride_lm=logits_stride, stride_re=router_strides[0],
        stride_rn=router_strides[1], stride_sm=residual_strides[0], stride_sn=residual_strides[1],
        stride_om=n, stride_on=1,
    )  # fmt: skip
    constexprs = dict(
        HAS_BIAS=has_bias,
        HAS_RESIDUAL=inputs[7] is not None,
        ROUTER_TAIL=inputs[4] is not None,
        DOT_PRECISION=flags["DOT_PRECISION"],
        BLOCK_E=flags["BLOCK_E"],
        RANK_PAD=flags["RANK_PAD"],
        TAIL_STEP=_tail_step(flags["BLOCK_E"] * flags["RANK_PAD"]),
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    output = "y" if role == "expand" else "dx"
    return _launch(role, _molora_gemm_kernel, inputs, (output,), scalars, constexprs, grid)


def _pack_launch(
    pb: MoLoRAProblem, strides: dict | None, pack_a: bool, pack_b: bool, split_b: bool
) -> tuple[dict[str, Buffer], Launch]:
    """The packing launch and its buffers: a_cat [K, BLOCK_J] (``pack_a``), b_cat [BLOCK_J, N] (``pack_b``) and
    b_lo [BLOCK_J, N] (``split_b``), in the activation dtype."""
    k, n, e, r = pb.K, pb.N, pb.E, pb.R
    flags = pb.flags
    bj = flags["BLOCK_E"] * flags["RANK_PAD"]
    buffers = {}
    if pack_a:
        buffers["a_cat"] = Buffer((k, bj), pb.dtype)
    if pack_b:
        buffers["b_cat"] = Buffer((bj, n), pb.dtype)
        if split_b:
            buffers["b_lo"] = Buffer((bj, n), pb.dtype)
    sa = strides_of(strides, "lora_a", (e, k, r))
    sb = strides_of(strides, "lora_b", (e, r, n))
    scalars = dict(
        K=k, N=n, E=e, R=r, stride_ae=sa[0], stride_ak=sa[1], stride_ar=sa[2],
        stride_be=sb[0], stride_br=sb[1], stride_bn=sb[2],
    )  # fmt: skip
    constexprs = dict(
        PACK_A=pack_a, PACK_B=pack_b, SPLIT_B=pack_b and split_b, BLOCK_E=flags["BLOCK_E"], RANK_PAD=flags["RANK_PAD"]
    )

    def grid(meta):
        return (
            (triton.cdiv(k, meta["BLOCK_C"]) if pack_a else 0) + (triton.cdiv(n, meta["BLOCK_C"]) if pack_b else 0),
        )

    outputs = (
        "a_cat" if pack_a else None,
        "b_cat" if pack_b else None,
        "b_lo" if pack_b and split_b else None,
    )
    inputs = ("lora_a" if pack_a else None, "lora_b" if pack_b else None)
    return buffers, _launch("pack", _molora_pack_kernel, inputs, outputs, scalars, constexprs, grid)


def forward_plan(
    pb: MoLoRAProblem,
    scale: float,
    save: bool,
    schedule: str,
    strides: dict[str, tuple[int, ...]] | None = None,
) -> Plan:
    """The launches of one forward ``schedule`` ("fused" or "two_kernel"; the adapter-only op: "two_kernel", the
    expand without a base GEMM, adding "base" when ``pb.has_base``) on the op inputs x, weight, bias, base,
    lora_a, lora_b, router, probs; ``strides`` of those not row-major (PyTorch). Buffers: a_cat and b_cat (the
    packing launch, first), y [T, N] (x's dtype), u [T, E·r] float32 and p_soft [T, E] float32 when ``save``
    (p_soft with token routing only), u_scaled [T, E·r] (two_kernel)."""
    t, k, n, e, r = pb.T, pb.K, pb.N, pb.E, pb.R
    flags = pb.flags
    token = pb.mode == TOKEN_ROUTER
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES} or 'auto', got {schedule!r}")
    buffers, pack = _pack_launch(pb, strides, True, True, False)
    buffers["y"] = Buffer((t, n), pb.dtype)
    if save:
        buffers["u"] = Buffer((t, e * r), "float32")
        if token:
            buffers["p_soft"] = Buffer((t, e), "float32")
    u, p_soft = ("u" if save else None), ("p_soft" if save and token else None)
    router = "router" if token else None
    probs = "probs" if pb.mode == GIVEN_PROBS else None
    sx = strides_of(strides, "x", (t, k))
    sr = _two(strides_of(strides, "router", (k, e)) if router else None)
    sp = _two(strides_of(strides, "probs", (t, e)) if probs else None)
    routing_flags = dict(flags, SAVE_FOR_BACKWARD=bool(save))
    if schedule == "fused":
        if not pb.has_weight:
            raise ValueError("molora_linear: the adapter-only op runs the two_kernel schedule")
        sw = strides_of(strides, "weight", (n, k))
        scalars = dict(
            T=t, N=n, K=k, E=e, R=r, tokens_bucket=_bucket(t),
            stride_xt=sx[0], stride_xk=sx[1], stride_wn=sw[0], stride_wk=sw[1],
            stride_rk=sr[0], stride_re=sr[1], stride_pt=sp[0], stride_pe=sp[1],
            stride_yt=n, stride_yn=1, stride_ut=e * r if u else 0, stride_st=e if p_soft else 0,
            scale=float(scale),
        )  # fmt: skip

        def grid(meta):
            return (triton.cdiv(t, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"] * meta["N_TILES"]),)

        inputs = ("x", "weight", "bias" if pb.has_bias else None, "a_cat", "b_cat", router, probs)
        constexprs = dict(routing_flags, HAS_BIAS=pb.has_bias)
        fused = _launch("fused", _molora_fused_forward_kernel, inputs, ("y", u, p_soft), scalars, constexprs, grid)
        return Plan(buffers, (pack, fused))

    buffers["u_scaled"] = Buffer((t, e * r), pb.dtype)
    scalars = dict(
        T=t, K=k, E=e, R=r, tokens_bucket=_bucket(t), stride_xt=sx[0], stride_xk=sx[1],
        stride_rk=sr[0], stride_re=sr[1], stride_pt=sp[0], stride_pe=sp[1],
        stride_vt=e * r, stride_ut=e * r if u else 0, stride_st=e if p_soft else 0,
        scale=float(scale),
    )  # fmt: skip

    def shrink_grid(meta):
        return (triton.cdiv(t, meta["BLOCK_M"]),)

    shrink = _launch(
        "shrink", _molora_shrink_kernel, ("x", "a_cat", router, probs), ("u_scaled", u, p_soft), scalars,
        routing_flags, shrink_grid,
    )  # fmt: skip
    if pb.has_weight:
        sw = strides_of(strides, "weight", (n, k))
        b, b_strides, kk = "weight", (sw[1], sw[0]), k
    else:
        b, b_strides, kk = "x", (0, 0), 0  # no base GEMM: the K loop runs no step, b is never read
    base = "base" if pb.has_base else None
    expand = _gemm_launch(
        "expand", t, n, kk, ("x", b, "u_scaled", "b_cat", None, None, "bias" if pb.has_bias else None, base),
        b_strides, sx, e * r, (n, 1), 0, (0, 0), _two(strides_of(strides, "base", (t, n)) if base else None),
        dict(flags, E=e, R=r), pb.has_bias,
    )  # fmt: skip
    return Plan(buffers, (pack, shrink, expand))


@functools.lru_cache(maxsize=512)
def _auto_schedule(t, k, n, e, r, dtype, mode, save) -> str:
    from pemoe.kernels.triton.molora_linear_analysis import choose_schedule  # the cost model, off the runtime

    schedule = choose_schedule(t, k, n, e, r, dtype, routing_mode=mode, save_for_backward=save)
    logger.info(
        "molora_linear Triton forward: %s schedule for T=%d K=%d N=%d E=%d r=%d (model)", schedule, t, k, n, e, r
    )
    return schedule


def resolve_schedule(schedule: str, pb: MoLoRAProblem, save: bool) -> str:
    """The forward schedule a call runs: a forced one (``use_schedule``), the argument, or the model's pick;
    always "two_kernel" for the adapter-only op (no base GEMM to fuse the shrink into)."""
    if not pb.has_weight:
        return "two_kernel"
    if _FORCED_SCHEDULE[0] is not None:
        return _FORCED_SCHEDULE[0]
    if schedule == "auto":
        return _auto_schedule(pb.T, pb.K, pb.N, pb.E, pb.R, pb.dtype, pb.mode, bool(save))
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be 'auto' or one of {SCHEDULES}, got {schedule!r}")
    return schedule


def backward_plan(
    pb: MoLoRAProblem,
    scale: float,
    needs: tuple[bool, bool, bool, bool, bool, bool],
    strides: dict[str, tuple[int, ...]] | None = None,
) -> Plan:
    """The backward launches on dy, x, weight (absent: the adapter-only op, no dy·W in dx), lora_a, lora_b,
    router, probs and the forward's u, p_soft, for ``needs`` = (dx, d bias, d lora_a, d lora_b, d router,
    d probs). Buffers: a_cat (for dx), b_cat (for G) and b_lo (G float32-grade: 16-bit dy with a probability
    gradient) from the packing launch, first; d_u, u_scaled [T, E·r] (x's dtype), d_route [T, E] float32
    (dlogits, or d probs), dx [T, K], and the per-chunk partial sums part_a [C, E, K, r], part_router
    [C, K, E], part_b [C, E, r, N], part_bias [C, N] (float32, C = ⌈T / REDUCE_ROWS⌉), each when needed;
    summing the partials over their first axis finishes the reduction."""
    t, k, n, e, r = pb.T, pb.K, pb.N, pb.E, pb.R
    mode = pb.mode
    need_dx, need_bias, need_a, need_b, need_router, need_probs = needs
    need_router = need_router and mode == TOKEN_ROUTER
    need_probs = need_probs and mode == GIVEN_PROBS
    flags = pb.flags
    sizes = dict(flags, E=e, R=r)
    er = e * r
    need_d_u = need_dx or need_a
    need_d_route = (mode == TOKEN_ROUTER and (need_dx or need_router)) or need_probs
    need_u_scaled = need_b
    need_g = need_d_u or need_d_route
    split_b = need_g and need_d_route and flags["DOT_PRECISION"] != "ieee"
    chunks = triton.cdiv(t, REDUCE_ROWS)
    bj = flags["BLOCK_E"] * flags["RANK_PAD"]
    launches = []
    buffers = {}
    if need_dx or need_g:
        buffers, pack = _pack_launch(pb, strides, need_dx, need_g, split_b)
        launches.append(pack)
    specs = dict(
        d_u=Buffer((t, er), pb.dtype) if need_d_u else None,
        u_scaled=Buffer((t, er), pb.dtype) if need_u_scaled else None,
        d_route=Buffer((t, e), "float32") if need_d_route else None,
        dx=Buffer((t, k), pb.dtype) if need_dx else None,
        part_a=Buffer((chunks, e, k, r), "float32") if need_a else None,
        part_router=Buffer((chunks, k, e), "float32") if need_router else None,
        part_b=Buffer((chunks, e, r, n), "float32") if need_b else None,
        part_bias=Buffer((chunks, n), "float32") if need_bias else None,
    )
    buffers |= {name: b for name, b in specs.items() if b is not None}

    def ptr(name):
        return name if name in buffers else None

    sdy = strides_of(strides, "dy", (t, n))
    sx = strides_of(strides, "x", (t, k))
    su = strides_of(strides, "u", (t, er))
    token, given = mode == TOKEN_ROUTER, mode == GIVEN_PROBS
    if need_g or need_u_scaled:
        sp = _two(strides_of(strides, "probs", (t, e)) if given else None)
        scalars = dict(
            T=t, N=n, E=e, R=r, tokens_bucket=_bucket(t),
            stride_dyt=sdy[0], stride_dyn=sdy[1], stride_ut=su[0],
            stride_st=strides_of(strides, "p_soft", (t, e))[0] if token else 0, stride_pt=sp[0], stride_pe=sp[1],
            stride_dut=er if need_d_u else 0, stride_vt=er if need_u_scaled else 0, stride_drt=e if need_d_route else 0,
            scale=float(scale),
        )  # fmt: skip
        constexprs = dict(
            flags, NEED_D_U=need_d_u, NEED_D_ROUTE=need_d_route, NEED_U_SCALED=need_u_scaled, SPLIT_B=split_b
        )

        def grad_u_grid(meta):
            return (triton.cdiv(t, meta["BLOCK_M"]),)

        inputs = (
            "dy", ptr("b_cat"), ptr("b_lo"), "u", "p_soft" if token else None, "probs" if given else None
        )  # fmt: skip
        outputs = (ptr("d_u"), ptr("u_scaled"), ptr("d_route"))
        launches.append(_launch("grad_u", _molora_grad_u_kernel, inputs, outputs, scalars, constexprs, grad_u_grid))
    if need_dx:
        if pb.has_weight:
            sw = strides_of(strides, "weight", (n, k))
            b, b_strides, kk = "weight", (sw[0], sw[1]), n
        else:
            b, b_strides, kk = "dy", (0, 0), 0
        sr = _two(strides_of(strides, "router", (k, e))) if token else (0, 0)
        launches.append(
            _gemm_launch(
                "dx",
                t,
                k,
                kk,
                ("dy", b, "d_u", "a_cat", "d_route" if token else None, "router" if token else None, None, None),
                b_strides,
                sdy,
                er,
                (1, bj),  # A_catᵀ: the packed a_cat [K, BLOCK_J] read transposed
                e if token else 0,
                (sr[1], sr[0]),
                (0, 0),
                sizes,
                False,
            )  # fmt: skip
        )
    for role, lhs, s_lhs, rhs, rhs2, out, out2, rowsum, cols in (
        ("wgrad_a", "x", sx, ptr("d_u") if need_a else None, ptr("d_route") if need_router else None,
         ptr("part_a"), ptr("part_router"), None, k),
        ("wgrad_b", "dy", sdy, ptr("u_scaled"), None, ptr("part_b"), None, ptr("part_bias"), n),
    ):  # fmt: skip
        if rhs is None and rhs2 is None and rowsum is None:
            continue
        if role == "wgrad_a":  # part_a [z, e, k, j]: c = k
            o_strides = (k * er, r, k * r, 1) if out is not None else (0, 0, 0, 0)
        else:  # part_b [z, e, j, n]: c = n
            o_strides = (er * n, 1, r * n, n) if out is not None else (0, 0, 0, 0)
        scalars = dict(
            T=t, C=cols, E=e, R=r, tokens_bucket=_bucket(t), rows_per_chunk=REDUCE_ROWS,
            stride_lt=s_lhs[0], stride_lc=s_lhs[1], stride_rt=er if rhs is not None else 0,
            stride_r2t=e if rhs2 is not None else 0,
            stride_oz=o_strides[0], stride_oc=o_strides[1], stride_oe=o_strides[2], stride_or=o_strides[3],
            stride_o2z=cols * e if out2 is not None else 0, stride_o2c=e, stride_sz=cols,
        )  # fmt: skip
        constexprs = dict(
            HAS_RHS=rhs is not None,
            HAS_RHS2=rhs2 is not None,
            ROW_SUM=rowsum is not None,
            DOT_PRECISION=flags["DOT_PRECISION"],
            BLOCK_E=flags["BLOCK_E"],
            RANK_PAD=flags["RANK_PAD"],
            J_STEP=_tail_step(flags["BLOCK_E"] * flags["RANK_PAD"]),
        )
        num_j = flags["BLOCK_E"] * flags["RANK_PAD"] // constexprs["J_STEP"]

        def wgrad_grid(meta, cols=cols, num_j=num_j):
            return (chunks * triton.cdiv(cols, meta["BLOCK_C"]) * num_j,)

        launches.append(
            _launch(role, _molora_wgrad_kernel, (lhs, rhs, rhs2), (out, out2, rowsum), scalars, constexprs, wgrad_grid)
        )
    return Plan(buffers, tuple(launches))


# ------------------------------------------------------------------------------------------------
# Launcher and autograd (PyTorch): molora_linear_torch.py, loaded with this module when torch is installed (its
# entry points molora_linear / molora_adapter / molora_forward / molora_backward and the custom ops are attributes
# of this module); without torch (JAX) this module holds the kernels and the launch plan alone.
# ------------------------------------------------------------------------------------------------

_torch_part = load_torch_part(__name__)


def __getattr__(name: str):
    return torch_attribute(_torch_part, __name__, name)
