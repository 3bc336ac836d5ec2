"""MoLoRA linear (SPEC §3 item 3) as fused Triton kernels: one forward kernel, one backward kernel.

Math (SPEC §1), x [T, K], W [N, K] frozen, b [N], lora_a [E, K, r], lora_b [E, r, N], router [K, E]
(None for LoRA, E = 1), scale = alpha / r:
    p  = softmax(x32 · router)  (top-k, renormalised on request; or given per token: sentence routing)
    U  = x · A_cat               [T, E·r]   A_cat[k, e·r + j] = lora_a[e, k, j]
    U′ = scale · U · p           (each expert's r columns scaled by its probability)
    y  = [x | U′] · [Wᵀ ; B_cat] + b          B_cat[e·r + j, n] = lora_b[e, j, n]
Never a [T, E, N] tensor.

Forward, one kernel (``_molora_forward_kernel``), one program per BLOCK_M rows and N_TILES
[BLOCK_M, BLOCK_N] tiles of y: the first tile's K loop, which feeds the base GEMM, loads each x tile
once and also feeds it to the shrink (x · A_cat) and router (x · router) dots; after it the float32
softmax (``routing.router_probs``) gives p and U′ is formed in registers; every tile then runs the
expand as E·r extra columns of K (``acc += U′ · B_cat``) before the bias and the single store of y.
The programs of the first column also store U (float32 [T, E·r]) and p_soft (float32 [T, E]) for the
backward pass.

Scheduling (issue 4: one kernel recomputing U per tile vs a shrink kernel + a [T, E·r] buffer),
decided by :func:`hbm_traffic` at T5-large (T = 2048, K = N = 1024, E = 10, r = 4, bf16, default tiles):
  * one kernel: x, W, y once (+ adapters, + U and p_soft saved): 1.074x a plain linear's HBM bytes
    (1.035x without saving for backward) — within the 1.1x target;
  * two kernels: the shrink kernel reads x a second time and U′ goes out and back in: 1.51x — misses it.
  The price of the one-kernel schedule is tensor-core work: every program recomputes its rows'
  shrink, BLOCK_J + 2·BLOCK_E extra dot columns per N_TILES·BLOCK_N output columns. At E = 10, r = 4
  the default tiles (128x128, N_TILES = 1) do 1.81x the plain GEMM's padded FLOPs, N_TILES = 4 1.25x
  (4x fewer programs); ``TrafficModel.forward_flops_ratio`` has the numbers for any shape / config.
  Autotuning picks N_TILES on a GPU. Where the GEMM is compute-bound and E·r wide, the two-kernel
  schedule (one extra read of x, +E·r/K FLOPs) would be faster; no GPU was lent to this session to
  time the two (issue 4 item 6), so the byte model decided.

Layouts and dtypes. Adapters are float32 parameters; each program loads its lora_a / lora_b tiles
in float32 and casts them to the activation dtype for the tensor-core dot, as the authors' code does.
U is kept in a per-expert padded column layout inside the kernels: column c = e·RANK_PAD + j
(RANK_PAD = next power of two ≥ r, BLOCK_E experts, BLOCK_J = BLOCK_E·RANK_PAD ≥ 16 columns), so
"scale expert e's columns by p_e" and "sum expert e's columns" are reshapes to [BLOCK_M, BLOCK_E,
RANK_PAD]. Router logits stay float32-accurate with 16-bit activations: x (exact in its dtype) is
multiplied by a hi/lo split of the float32 router (router = r_hi + r_lo, both 16-bit), two dots of
width BLOCK_E ≥ 16 accumulating in float32 (r_hi + r_lo carries 16 mantissa bits in bfloat16, 22 in
float16, against 8 / 11 for a plain cast). float32
activations use ``input_precision="ieee"`` dots throughout (no TF32: the tolerance rule is float32's).

Backward, one kernel (``_molora_backward_kernel``), one program per [BLOCK_M, BLOCK_K] tile of dx
(W frozen, no weight gradient), with G = dy · B_catᵀ ([T, E·r], one GEMM of width E·r):
    dU   = scale · G · p              dp[t, e] = scale · Σ_j G[t, e·r+j] · U[t, e·r+j]
    dlogits = softmax/top-k backward of dp (``routing.router_probs_backward``), or d probs = dp
    dx   = dy · W + dU · A_catᵀ + dlogits · routerᵀ         (the N loop, then extra reduction columns)
    d A_cat  += x_tileᵀ · dU,   d router += x_tileᵀ · dlogits         (float32 atomics, every program)
    d B_cat  += U′ᵀ · dy_tile,  d bias += Σ_t dy_tile                 (float32 atomics, pid_k == 0)
so dy, x, W are each read once per tile as a plain dgrad would read dy and W, and the adapter
gradients need no extra pass. The atomics make the adapter gradients' float32 summation order
(over token blocks) nondeterministic. Like the forward, each program recomputes its rows' G, once
per K_TILES dx tiles (``TrafficModel.backward_flops_ratio`` gives the padded tensor-core FLOPs against a
plain dgrad's for any shape and config; dA, dB and G themselves cost ~1.16x at T5-large, E = 10, r = 4),
and moves 1.51x its bytes (a plain frozen dgrad reads no x; d lora_a needs it).

Sentence routing (``probs`` given, float32 [T, E]) is supported: the router is not read and the
gradient flows to ``probs``. Supported dtypes: x and W float16, bfloat16 or float32 (one dtype),
adapters float32; anything else raises ``TypeError`` — there is no fallback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pemoe.kernels.triton import routing
from pemoe.kernels.triton.interpreter import INTERPRET, do_bench

# Routing modes (the ROUTING feature flag)
NO_ROUTER, TOKEN_ROUTER, GIVEN_PROBS = 0, 1, 2


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
def _dot_exact_a(a, b32, acc, DT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a · b32 with ``a`` exact in DT and b32 float32: b split into DT hi + lo (float32-grade)."""
    if DT == tl.float32:
        return tl.dot(a, b32, acc, input_precision=DOT_PRECISION)
    else:
        b_hi = b32.to(DT)
        acc = tl.dot(a, b_hi, acc)
        return tl.dot(a, (b32 - b_hi.to(tl.float32)).to(DT), acc)


@triton.jit
def _dot_fp32(a32, b32, acc, DT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a32 · b32 for float32 tiles: "ieee" for float32, else a_hi b_hi + a_hi b_lo + a_lo b_hi in DT."""
    if DT == tl.float32:
        return tl.dot(a32, b32, acc, input_precision=DOT_PRECISION)
    else:
        a_hi = a32.to(DT)
        a_lo = (a32 - a_hi.to(tl.float32)).to(DT)
        acc = _dot_exact_a(a_hi, b32, acc, DT, DOT_PRECISION)
        return tl.dot(a_lo, b32.to(DT), acc)


@triton.jit
def _tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row blocks sweep the columns together (L2 reuse)."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_size, (pid % width) // group_size


# ------------------------------------------------------------------------------------------------
# Autotune configurations (data) and pruning
# ------------------------------------------------------------------------------------------------


def _config(
    block_m: int,
    block_n: int,
    block_k: int,
    warps: int,
    stages: int,
    *,
    n_tiles: int | None = None,
    k_tiles: int | None = None,
    group_m: int = 8,
) -> triton.Config:
    """A tile configuration. ``n_tiles`` (forward): y column tiles per program sharing one shrink;
    ``k_tiles`` (backward): dx column tiles per program sharing one G = dy·B_catᵀ."""
    kwargs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m}
    if n_tiles is not None:
        kwargs["N_TILES"] = n_tiles
    if k_tiles is not None:
        kwargs["K_TILES"] = k_tiles
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


#: Forward tiles of y: BLOCK_M tokens x BLOCK_N outputs, BLOCK_K the reduction step. Ordered by
#: preference; the first that survives pruning is the default (and what the interpreter runs).
FORWARD_CONFIGS = [
    _config(128, 128, 32, 8, 3, n_tiles=1),
    _config(128, 128, 32, 8, 3, n_tiles=4),  # large T: the shrink recomputed for every 512 columns only
    _config(64, 128, 64, 8, 3, n_tiles=1),
    _config(64, 128, 64, 8, 3, n_tiles=4),
    _config(64, 32, 32, 8, 3, n_tiles=1),  # wide E·r (E = 15, r = 16): the float32 lora_a tile, U in registers
    _config(128, 256, 64, 8, 2, n_tiles=1),  # spills on sm_80 (STACK + LOCAL 152 bytes at E = 10, r = 4)
    _config(64, 64, 64, 4, 3, n_tiles=1),
    _config(32, 64, 64, 4, 2, n_tiles=1),
    _config(16, 64, 64, 4, 2, n_tiles=1),
    _config(16, 32, 32, 4, 2, n_tiles=1),
]
#: Backward tiles of dx: BLOCK_M tokens x BLOCK_K inputs, BLOCK_N the reduction step over N.
BACKWARD_CONFIGS = [
    _config(64, 64, 64, 8, 3, k_tiles=1),
    _config(64, 64, 64, 8, 3, k_tiles=4),  # large T: G recomputed for every 256 columns of dx only
    _config(64, 64, 128, 4, 3, k_tiles=1),  # spills (STACK + LOCAL 240-570 bytes at E = 10, r = 4)
    _config(128, 64, 128, 8, 3, k_tiles=1),  # spills (160-272 bytes)
    _config(128, 64, 128, 8, 3, k_tiles=4),
    _config(16, 32, 32, 8, 2, k_tiles=1),  # wide E·r: the least spilling tile found (48 / 112 bytes)
    _config(32, 64, 64, 4, 2, k_tiles=1),
    _config(16, 64, 64, 4, 2, k_tiles=1),
    _config(16, 32, 32, 4, 2, k_tiles=1),
]
#: Per-thread float32 accumulator budget (registers) and shared-memory budget (sm_80: 163 KiB usable).
REGISTER_BUDGET = 192
SHARED_MEMORY_BUDGET = 160 * 1024
DOT_MIN = 16  # tl.dot needs M, N, K >= 16


def _block_experts(num_experts: int, rank: int, routing_mode: int) -> tuple[int, int]:
    """(BLOCK_E, RANK_PAD): padded expert slots and rank, so BLOCK_E·RANK_PAD >= 16 and logits dots fit."""
    rank_pad = triton.next_power_of_2(rank)
    block_e = triton.next_power_of_2(num_experts)
    if routing_mode != NO_ROUTER:
        block_e = max(block_e, DOT_MIN)  # the logits / dlogits tiles are dot operands
    block_e = max(block_e, DOT_MIN // min(rank_pad, DOT_MIN))
    return block_e, rank_pad


def _fits(cfg: triton.Config, args: dict, backward: bool) -> bool:
    bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    if min(bm, bn, bk) < DOT_MIN:
        return False
    block_j = args["BLOCK_E"] * args["RANK_PAD"]
    block_e = args["BLOCK_E"]
    threads = 32 * cfg.num_warps
    elem = 4 if args["DOT_PRECISION"] == "ieee" else 2
    if backward:  # dx acc + G acc (float32) + U′ (activation dtype) live through the N loop
        regs = (bm * bk + bm * block_j) / threads + bm * block_j * elem / 4 / threads
        stage = bm * bn * elem + bn * bk * elem + bn * block_j * 4
    else:  # y acc + U acc + logits acc
        regs = (bm * bn + bm * block_j + bm * block_e) / threads
        stage = bm * bk * elem + bk * bn * elem + bk * (block_j + block_e) * 4
    return regs <= REGISTER_BUDGET and stage * cfg.num_stages <= SHARED_MEMORY_BUDGET


def _prune(configs: list[triton.Config], named_args: dict, *, backward: bool, **kwargs) -> list[triton.Config]:
    """Keep configs whose tiles are legal dot shapes, fit the register / shared-memory budgets and are
    not much larger than the problem (order kept, so the first survivor is the default)."""
    args = {**named_args, **kwargs}
    t, cols = args["T"], args["K"] if backward else args["N"]
    legal = [c for c in configs if _fits(c, args, backward)]
    if not legal:
        raise ValueError(
            f"molora_linear Triton kernels: lora_a [E, K, r] with E = {args['E']}, r = {args['R']} needs "
            f"{args['BLOCK_E'] * args['RANK_PAD']} padded adapter columns (E and r rounded up to powers of two), "
            "more than any tile configuration fits in registers and shared memory"
        )
    col_key = "BLOCK_K" if backward else "BLOCK_N"
    snug = [
        c
        for c in legal
        if c.kwargs["BLOCK_M"] <= max(DOT_MIN, triton.next_power_of_2(t))
        and c.kwargs[col_key] * c.kwargs.get("K_TILES" if backward else "N_TILES", 1)
        <= max(32, triton.next_power_of_2(cols))
    ]
    return snug or legal[-1:]


def _prune_forward(configs, named_args, **kwargs):
    return _prune(configs, named_args, backward=False, **kwargs)


def _prune_backward(configs, named_args, **kwargs):
    return _prune(configs, named_args, backward=True, **kwargs)


_AUTOTUNE_KEY = ["tokens_bucket", "N", "K", "E", "R"]


# ------------------------------------------------------------------------------------------------
# Forward kernel
# ------------------------------------------------------------------------------------------------


@triton.autotune(
    configs=FORWARD_CONFIGS,
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_forward},
    do_bench=do_bench,
)
@triton.jit
def _molora_forward_kernel(
    # inputs
    x_ptr, weight_ptr, bias_ptr, lora_a_ptr, lora_b_ptr, router_ptr, probs_ptr,
    # outputs: y, and (SAVE_FOR_BACKWARD) U float32 [T, E·R] and p_soft float32 [T, E]
    y_ptr, u_ptr, p_soft_ptr,
    # sizes (tokens_bucket: autotune key only)
    T, N, K, E, R, tokens_bucket,
    # strides
    stride_xt, stride_xk, stride_wn, stride_wk,
    stride_ae, stride_ak, stride_ar, stride_be, stride_br, stride_bn,
    stride_rk, stride_re, stride_pt, stride_pe,
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
    """y = x·Wᵀ + scale·(U·p)·B_cat + b for N_TILES [BLOCK_M, BLOCK_N] tiles side by side (module docstring).

    The shrink runs in the first tile's K loop only; the later tiles reuse U′ from registers, so the
    recomputed shrink costs (BLOCK_J + router columns) / (N_TILES·BLOCK_N) of the base GEMM's work.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    # ---- this program's rows and group of N_TILES column tiles
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(N, BLOCK_N * N_TILES), GROUP_M)
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
            x_tile = tl.load(
                x_ptr + rows[:, None] * stride_xt + kk[None, :] * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            w_tile = tl.load(
                weight_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(x_tile, w_tile, acc, input_precision=DOT_PRECISION)
            if tile == 0:
                a_tile = tl.load(
                    lora_a_ptr + expert[None, :] * stride_ae + kk[:, None] * stride_ak + rank[None, :] * stride_ar,
                    mask=k_mask[:, None] & col_real[None, :],
                    other=0.0,
                )
                acc_u = tl.dot(x_tile, a_tile.to(DT), acc_u, input_precision=DOT_PRECISION)
                if ROUTING == 1:
                    router_tile = tl.load(
                        router_ptr + kk[:, None] * stride_rk + offs_e[None, :] * stride_re,
                        mask=k_mask[:, None] & (offs_e[None, :] < E),
                        other=0.0,
                    )
                    logits = _dot_exact_a(x_tile, router_tile, logits, DT, DOT_PRECISION)

        if tile == 0:
            # ---- routing weights p [BLOCK_M, BLOCK_E] (float32; padded experts 0), U′ = scale·U·p
            if ROUTING == 1:
                p, p_soft = routing.router_probs(logits, offs_e, E, TOP_K, RENORMALIZE)
            elif ROUTING == 2:
                p = tl.load(
                    probs_ptr + rows[:, None] * stride_pt + offs_e[None, :] * stride_pe,
                    mask=m_mask[:, None] & (offs_e[None, :] < E),
                    other=0.0,
                )
            else:
                p = tl.where(offs_e[None, :] < E, 1.0, 0.0) + tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
            u_scaled = (_scale_per_expert(acc_u, p, BLOCK_M, BLOCK_E, RANK_PAD) * scale).to(DT)
            # the first program of each row block saves U and p_soft for backward
            if SAVE_FOR_BACKWARD:
                if pid_n == 0:
                    tl.store(
                        u_ptr + rows[:, None] * stride_ut + (expert * R + rank)[None, :],
                        acc_u,
                        mask=m_mask[:, None] & col_real[None, :],
                    )
                    if ROUTING == 1:
                        tl.store(
                            p_soft_ptr + rows[:, None] * stride_st + offs_e[None, :],
                            p_soft,
                            mask=m_mask[:, None] & (offs_e[None, :] < E),
                        )

        # ---- expand: E·r extra columns of K, acc += U′ · B_cat
        b_tile = tl.load(
            lora_b_ptr + expert[:, None] * stride_be + rank[:, None] * stride_br + offs_n[None, :] * stride_bn,
            mask=col_real[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(u_scaled, b_tile.to(DT), acc, input_precision=DOT_PRECISION)

        # ---- epilogue: bias, one store of the y tile
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + rows[:, None] * stride_yt + offs_n[None, :] * stride_yn,
            acc.to(y_ptr.dtype.element_ty),
            mask=m_mask[:, None] & n_mask[None, :],
        )


# ------------------------------------------------------------------------------------------------
# Backward kernel
# ------------------------------------------------------------------------------------------------


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


@triton.autotune(
    configs=BACKWARD_CONFIGS,
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_backward},
    do_bench=do_bench,
    reset_to_zero=["d_lora_a_ptr", "d_lora_b_ptr", "d_router_ptr", "d_bias_ptr"],
)
@triton.jit
def _molora_backward_kernel(
    # inputs
    dy_ptr, x_ptr, weight_ptr, lora_a_ptr, lora_b_ptr, router_ptr, probs_ptr, u_ptr, p_soft_ptr,
    # outputs: dx (activation dtype); float32 gradients, accumulated atomically (zero-initialised)
    dx_ptr, d_lora_a_ptr, d_lora_b_ptr, d_router_ptr, d_probs_ptr, d_bias_ptr,
    # sizes (tokens_bucket: autotune key only)
    T, N, K, E, R, tokens_bucket,
    # strides (the float32 gradient buffers are contiguous, in their parameter's layout)
    stride_dyt, stride_dyn, stride_xt, stride_xk, stride_wn, stride_wk,
    stride_ae, stride_ak, stride_ar, stride_be, stride_br, stride_bn,
    stride_rk, stride_re, stride_pt, stride_pe, stride_ut, stride_st,
    stride_dxt, stride_dxk,
    # scalars
    scale,
    # feature flags
    ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_D_LORA_A: tl.constexpr, NEED_D_LORA_B: tl.constexpr,
    NEED_D_ROUTER: tl.constexpr, NEED_D_PROBS: tl.constexpr, NEED_D_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_E: tl.constexpr, RANK_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    K_TILES: tl.constexpr,
):  # fmt: skip
    """K_TILES [BLOCK_M, BLOCK_K] tiles of dx, and their share of every adapter gradient.

    G = dy·B_catᵀ and the router backward run in the first tile only; later tiles reuse dU and dlogits.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    # ---- this program's rows and K tiles; without dx / d lora_a / d router one column of programs suffices
    if NEED_DX or NEED_D_LORA_A or NEED_D_ROUTER:
        num_k = tl.cdiv(K, BLOCK_K * K_TILES)
    else:
        num_k = 1
    pid_m, pid_k = _tile_ids(tl.program_id(0), tl.cdiv(T, BLOCK_M), num_k, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.int64)  # pointer arithmetic in int64: T·K may exceed 2^31
    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    m_mask = offs_m < T
    expert, rank, col_real = _expert_columns(E, R, BLOCK_E, RANK_PAD)
    first = pid_k == 0
    u_ptrs = u_ptr + rows[:, None] * stride_ut + (expert * R + rank)[None, :]
    u_mask = m_mask[:, None] & col_real[None, :]

    # ---- U′ = scale·U·p for the d lora_b share (activation dtype, as the forward expand used it)
    if NEED_D_LORA_B:
        p, _ = _routing_weights(
            p_soft_ptr, probs_ptr, offs_m, m_mask, offs_e, E, stride_st, stride_pt, stride_pe,
            ROUTING, TOP_K, RENORMALIZE, BLOCK_M, BLOCK_E,
        )  # fmt: skip
        u = tl.load(u_ptrs, mask=u_mask, other=0.0)
        u_scaled = (_scale_per_expert(u, p, BLOCK_M, BLOCK_E, RANK_PAD) * scale).to(DT)

    for tile in tl.static_range(K_TILES):
        offs_k = (pid_k * K_TILES + tile) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        # ---- N loop: dx = dy·W and (first tile) G = dy·B_catᵀ share every dy tile; pid_k == 0 adds
        # U′ᵀ·dy and Σ dy to d lora_b and d bias
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if tile == 0:
            acc_g = tl.zeros((BLOCK_M, BLOCK_E * RANK_PAD), dtype=tl.float32)
        if NEED_DX or tile == 0:
            for n0 in range(0, N, BLOCK_N):
                nn = n0 + offs_n
                n_mask = nn < N
                dy_tile = tl.load(
                    dy_ptr + rows[:, None] * stride_dyt + nn[None, :] * stride_dyn,
                    mask=m_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                if NEED_DX:
                    w_tile = tl.load(
                        weight_ptr + nn[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0,
                    )
                    acc = tl.dot(dy_tile, w_tile, acc, input_precision=DOT_PRECISION)
                if tile == 0:
                    b_t_tile = tl.load(
                        lora_b_ptr + nn[:, None] * stride_bn + expert[None, :] * stride_be + rank[None, :] * stride_br,
                        mask=n_mask[:, None] & col_real[None, :],
                        other=0.0,
                    )
                    acc_g = tl.dot(dy_tile, b_t_tile.to(DT), acc_g, input_precision=DOT_PRECISION)
                    if first:
                        if NEED_D_LORA_B:
                            d_b = tl.dot(tl.trans(u_scaled), dy_tile, input_precision=DOT_PRECISION)
                            d_b_offs = expert[:, None] * (R * N) + rank[:, None] * N + nn[None, :]
                            tl.atomic_add(d_lora_b_ptr + d_b_offs, d_b, mask=col_real[:, None] & n_mask[None, :])
                        if NEED_D_BIAS:
                            tl.atomic_add(d_bias_ptr + nn, tl.sum(dy_tile.to(tl.float32), axis=0), mask=n_mask)

        if tile == 0:
            # ---- router backward: dU = scale·G·p, dp = scale·Σ_j G·U, dlogits (or d probs = dp)
            g = acc_g * scale
            p, p_soft = _routing_weights(
                p_soft_ptr, probs_ptr, offs_m, m_mask, offs_e, E, stride_st, stride_pt, stride_pe,
                ROUTING, TOP_K, RENORMALIZE, BLOCK_M, BLOCK_E,
            )  # fmt: skip
            d_u = _scale_per_expert(g, p, BLOCK_M, BLOCK_E, RANK_PAD).to(DT)
            if ROUTING != 0:
                u = tl.load(u_ptrs, mask=u_mask, other=0.0)
                dp = _sum_per_expert(g * u, BLOCK_M, BLOCK_E, RANK_PAD)
                if ROUTING == 1:
                    d_logits = routing.router_probs_backward(dp, p_soft, offs_e, E, TOP_K, RENORMALIZE)
                    d_logits = tl.where(m_mask[:, None], d_logits, 0.0)
                elif NEED_D_PROBS:
                    if first:
                        tl.store(
                            d_probs_ptr + rows[:, None] * E + offs_e[None, :],
                            dp,
                            mask=m_mask[:, None] & (offs_e[None, :] < E),
                        )

        # ---- dx = dy·W + dU·A_catᵀ + dlogits·routerᵀ (extra reduction columns), one store
        if NEED_DX:
            a_t_tile = tl.load(
                lora_a_ptr + expert[:, None] * stride_ae + offs_k[None, :] * stride_ak + rank[:, None] * stride_ar,
                mask=col_real[:, None] & k_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(d_u, a_t_tile.to(DT), acc, input_precision=DOT_PRECISION)
            if ROUTING == 1:
                router_t_tile = tl.load(
                    router_ptr + offs_k[None, :] * stride_rk + offs_e[:, None] * stride_re,
                    mask=k_mask[None, :] & (offs_e[:, None] < E),
                    other=0.0,
                )
                acc = _dot_fp32(d_logits, router_t_tile, acc, DT, DOT_PRECISION)
            tl.store(
                dx_ptr + rows[:, None] * stride_dxt + offs_k[None, :] * stride_dxk,
                acc.to(dx_ptr.dtype.element_ty),
                mask=m_mask[:, None] & k_mask[None, :],
            )

        # ---- this tile's share of d A_cat = xᵀ·dU and d router = xᵀ·dlogits (float32 atomics)
        if NEED_D_LORA_A or NEED_D_ROUTER:
            x_t_tile = tl.load(
                x_ptr + offs_k[:, None] * stride_xk + rows[None, :] * stride_xt,
                mask=k_mask[:, None] & m_mask[None, :],
                other=0.0,
            )
            if NEED_D_LORA_A:
                d_a = tl.dot(x_t_tile, d_u, input_precision=DOT_PRECISION)
                d_a_offs = expert[None, :] * (K * R) + offs_k[:, None] * R + rank[None, :]
                tl.atomic_add(d_lora_a_ptr + d_a_offs, d_a, mask=k_mask[:, None] & col_real[None, :])
            if NEED_D_ROUTER:
                d_r = _dot_exact_a(
                    x_t_tile, d_logits, tl.zeros((BLOCK_K, BLOCK_E), dtype=tl.float32), DT, DOT_PRECISION
                )
                tl.atomic_add(
                    d_router_ptr + offs_k[:, None] * E + offs_e[None, :],
                    d_r,
                    mask=k_mask[:, None] & (offs_e[None, :] < E),
                )


# ------------------------------------------------------------------------------------------------
# Launchers: validate, allocate, grid, launch
# ------------------------------------------------------------------------------------------------

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Forced configurations (tests: multi-tile grids on small shapes); None = autotune.
_FORCED: dict[str, triton.Config | None] = {"forward": None, "backward": None}


class use_configs:
    """Context manager running the kernels with the given configs instead of autotuning (tests, benchmarks)."""

    def __init__(self, forward: triton.Config | None = None, backward: triton.Config | None = None):
        self._new = {"forward": forward, "backward": backward}

    def __enter__(self):
        self._old = dict(_FORCED)
        _FORCED.update(self._new)

    def __exit__(self, *exc):
        _FORCED.update(self._old)


def _launch(kernel, which: str, grid, args: tuple, constexprs: dict) -> None:
    forced = _FORCED[which]
    if forced is None:
        kernel[grid](*args, **constexprs)
        return
    meta = {**constexprs, **forced.kwargs}
    kernel.fn[grid(meta)](*args, **meta, num_warps=forced.num_warps, num_stages=forced.num_stages)


def _check_kernel_inputs(x, weight, bias, lora_a, lora_b, router, probs) -> None:
    """What the kernels support beyond pemoe's argument checks: dtypes, devices, non-empty x."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, K] (flattened tokens), got shape {list(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one token (shape [T, K] with T >= 1), got T = 0")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"molora_linear Triton kernels support x in float16, bfloat16 or float32, got {x.dtype}")
    if weight.dtype != x.dtype:
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


def _routing_mode(router, probs) -> int:
    if probs is not None:
        return GIVEN_PROBS
    return NO_ROUTER if router is None else TOKEN_ROUTER


def _flags(x: torch.Tensor, num_experts: int, rank: int, mode: int, top_k: int | None, renormalize: bool) -> dict:
    block_e, rank_pad = _block_experts(num_experts, rank, mode)
    full = top_k is None or top_k >= num_experts  # all experts kept: p_soft renormalised is p_soft
    return dict(
        ROUTING=mode,
        TOP_K=0 if full else int(top_k),
        RENORMALIZE=bool(renormalize) and not full,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_E=block_e,
        RANK_PAD=rank_pad,
    )


def _forward_launch(x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize, save_for_backward):
    """Allocates the outputs; returns (outputs (y, U, p_soft), kernel args, constexprs, grid)."""
    t, k = x.shape
    n = weight.shape[0]
    num_experts, _, rank = lora_a.shape
    mode = _routing_mode(router, probs)
    y = torch.empty((t, n), dtype=x.dtype, device=x.device)
    u = torch.empty((t, num_experts * rank), dtype=torch.float32, device=x.device) if save_for_backward else None
    save_p = save_for_backward and mode == TOKEN_ROUTER
    p_soft = torch.empty((t, num_experts), dtype=torch.float32, device=x.device) if save_p else None
    router_ = router if router is not None else lora_a  # unused pointers: any tensor
    probs_ = probs if probs is not None else lora_a
    u_ = u if u is not None else y
    p_soft_ = p_soft if p_soft is not None else y
    args = (
        x, weight, bias if bias is not None else y, lora_a, lora_b, router_, probs_,
        y, u_, p_soft_,
        t, n, k, num_experts, rank, triton.next_power_of_2(t),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        *lora_a.stride(), *lora_b.stride(),
        router_.stride(0), router_.stride(1), probs_.stride(0), probs_.stride(1),
        y.stride(0), y.stride(1), u_.stride(0), p_soft_.stride(0),
        float(scale),
    )  # fmt: skip
    constexprs = dict(
        _flags(x, num_experts, rank, mode, top_k, renormalize),
        HAS_BIAS=bias is not None,
        SAVE_FOR_BACKWARD=bool(save_for_backward),
    )

    def grid(meta):
        return (triton.cdiv(t, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"] * meta["N_TILES"]),)

    return (y, u, p_soft), args, constexprs, grid


def molora_forward(x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize, save_for_backward):
    """Launches the forward kernel; returns (y [T, N], U float32 [T, E·r] | None, p_soft float32 [T, E] | None)."""
    outputs, args, constexprs, grid = _forward_launch(
        x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize, save_for_backward
    )
    _launch(_molora_forward_kernel, "forward", grid, args, constexprs)
    return outputs


def _backward_launch(dy, x, weight, lora_a, lora_b, router, probs, u, p_soft, scale, top_k, renormalize, needs):
    """Allocates the gradients; returns (gradients, kernel args, constexprs, grid)."""
    t, k = x.shape
    n = weight.shape[0]
    num_experts, _, rank = lora_a.shape
    mode = _routing_mode(router, probs)
    need_dx, need_bias, need_a, need_b, need_router, need_probs = needs
    need_router = need_router and mode == TOKEN_ROUTER
    need_probs = need_probs and mode == GIVEN_PROBS
    f32 = dict(dtype=torch.float32, device=x.device)
    grads = (
        torch.empty_like(x) if need_dx else None,
        torch.zeros((n,), **f32) if need_bias else None,
        torch.zeros(lora_a.shape, **f32) if need_a else None,
        torch.zeros(lora_b.shape, **f32) if need_b else None,
        torch.zeros((k, num_experts), **f32) if need_router else None,
        torch.empty((t, num_experts), **f32) if need_probs else None,
    )
    # outputs not computed get their own 1-element placeholders (the autotuner zeroes the gradient buffers)
    dx = grads[0] if need_dx else torch.empty((1, 1), dtype=x.dtype, device=x.device)
    d_bias, d_a, d_b, d_router, d_probs = (g if g is not None else torch.zeros((1,), **f32) for g in grads[1:])
    router_ = router if router is not None else lora_a  # unused pointers: any tensor
    probs_ = probs if probs is not None else lora_a
    p_soft_ = p_soft if p_soft is not None else u
    args = (
        dy, x, weight, lora_a, lora_b, router_, probs_, u, p_soft_,
        dx, d_a, d_b, d_router, d_probs, d_bias,
        t, n, k, num_experts, rank, triton.next_power_of_2(t),
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        *lora_a.stride(), *lora_b.stride(),
        router_.stride(0), router_.stride(1), probs_.stride(0), probs_.stride(1), u.stride(0), p_soft_.stride(0),
        dx.stride(0), dx.stride(1),
        float(scale),
    )  # fmt: skip
    constexprs = dict(
        _flags(x, num_experts, rank, mode, top_k, renormalize),
        NEED_DX=need_dx,
        NEED_D_LORA_A=need_a,
        NEED_D_LORA_B=need_b,
        NEED_D_ROUTER=need_router,
        NEED_D_PROBS=need_probs,
        NEED_D_BIAS=need_bias,
    )
    k_tiled = need_dx or need_a or need_router

    def grid(meta):
        return (
            triton.cdiv(t, meta["BLOCK_M"]) * (triton.cdiv(k, meta["BLOCK_K"] * meta["K_TILES"]) if k_tiled else 1),
        )

    return grads, args, constexprs, grid


def molora_backward(dy, x, weight, lora_a, lora_b, router, probs, u, p_soft, scale, top_k, renormalize, needs):
    """Launches the backward kernel. ``needs`` = (dx, d bias, d lora_a, d lora_b, d router, d probs) booleans.

    Returns those gradients (None where not needed): dx in x's dtype, the others float32.
    """
    grads, args, constexprs, grid = _backward_launch(
        dy, x, weight, lora_a, lora_b, router, probs, u, p_soft, scale, top_k, renormalize, needs
    )
    _launch(_molora_backward_kernel, "backward", grid, args, constexprs)
    return grads


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------


class MoLoRALinearFunction(torch.autograd.Function):
    """y = molora(x, W, b, lora_a, lora_b, router | probs) on x [T, K]; W frozen. Saves x, U and p_soft."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize, save):
        y, u, p_soft = molora_forward(x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize, save)
        if save:
            ctx.save_for_backward(x, weight, lora_a, lora_b, router, probs, u, p_soft)
            ctx.args = (scale, top_k, renormalize, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, router, probs, u, p_soft = ctx.saved_tensors
        scale, top_k, renormalize, bias_dtype = ctx.args
        need_x, _, need_bias, need_a, need_b, need_router, need_probs = ctx.needs_input_grad[:7]
        needs = (need_x, need_bias, need_a, need_b, need_router and router is not None, need_probs)
        dx, d_bias, d_a, d_b, d_router, d_probs = molora_backward(
            dy, x, weight, lora_a, lora_b, router, probs, u, p_soft, scale, top_k, renormalize, needs
        )
        if d_bias is not None:
            d_bias = d_bias.to(bias_dtype)
        return dx, None, d_bias, d_a, d_b, d_router, d_probs, None, None, None, None


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
) -> torch.Tensor:
    """Fused MoLoRA linear on x2d [T, K] -> [T, N] in x's dtype (autograd-aware; see the module docstring).

    ``probs`` (sentence routing): float32 [T, E] per-token probabilities, ``router`` then unused.
    The base weight is frozen: a ``weight`` that requires grad raises ``NotImplementedError``.
    """
    _check_kernel_inputs(x2d, weight, bias, lora_a, lora_b, router, probs)
    if weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "molora_linear Triton kernels treat the base weight as frozen: weight.requires_grad must be False"
        )
    tensors = (x2d, bias, lora_a, lora_b, router if probs is None else None, probs)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return MoLoRALinearFunction.apply(
        x2d, weight, bias, lora_a, lora_b, router if probs is None else None, probs, scale, top_k, renormalize, save
    )


# ------------------------------------------------------------------------------------------------
# HBM-traffic model
# ------------------------------------------------------------------------------------------------


@dataclass
class KernelTraffic:
    """Bytes one kernel launch moves. ``loaded`` / ``stored``: every tile load and store of every program
    (what ``interpreter.count_traffic`` counts, masked lanes excluded); ``atomic``: float32 atomic adds
    (4 bytes per element per add; not seen by the interpreter counter); ``unique``: each tensor once
    (re-read tiles served by L2); ``flops``: tensor-core FLOPs of the padded tiles."""

    loaded: int
    stored: int
    atomic: int
    unique: int
    flops: int


@dataclass
class TrafficModel:
    """:func:`hbm_traffic`'s answer; byte counts, and ``*_ratio`` against a plain linear of the same shape."""

    forward: KernelTraffic
    backward: KernelTraffic
    linear_forward: int  # x, W, b in; y out
    linear_backward: int  # frozen linear: dy, W in; dx out
    linear_forward_flops: int  # same tiles as the forward kernel, no adapter columns
    linear_backward_flops: int  # a plain dgrad, 2·T·N·K
    minimum_forward: int  # x, W, b, adapters in; y out (nothing saved for backward)
    minimum_backward: int  # dy, x, W, adapters in; dx and adapter gradients out
    two_kernel_forward: int  # the rejected schedule: a shrink kernel (reads x again) + the base GEMM
    authors_forward: int  # the authors' unfused formulation, eager ops ([T, E, N] written and read)
    authors_backward: int

    @property
    def forward_ratio(self) -> float:
        return self.forward.unique / self.linear_forward

    @property
    def backward_ratio(self) -> float:
        return self.backward.unique / self.linear_backward

    @property
    def forward_flops_ratio(self) -> float:
        return self.forward.flops / self.linear_forward_flops

    @property
    def backward_flops_ratio(self) -> float:
        return self.backward.flops / self.linear_backward_flops


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_config(kernel: str, tokens: int, in_features: int, out_features: int, flags: dict) -> triton.Config:
    """The configuration the kernel runs by default (the first one surviving pruning)."""
    configs = FORWARD_CONFIGS if kernel == "forward" else BACKWARD_CONFIGS
    args = dict(flags, T=tokens, K=in_features, N=out_features)
    return _prune(configs, args, backward=kernel == "backward")[0]


def hbm_traffic(
    tokens: int,
    in_features: int,
    out_features: int,
    num_experts: int,
    rank: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    routing_mode: int | None = None,
    bias: bool = True,
    save_for_backward: bool = True,
    needs: tuple[bool, bool, bool, bool, bool, bool] = (True, True, True, True, True, True),
    forward_config: triton.Config | None = None,
    backward_config: triton.Config | None = None,
) -> TrafficModel:
    """Modelled bytes (and FLOPs) of the forward and backward kernels at one shape.

    ``routing_mode``: TOKEN_ROUTER (default for E > 1), NO_ROUTER (LoRA, default for E = 1) or
    GIVEN_PROBS (sentence routing). ``needs``: which gradients the backward computes, in the order
    (dx, d bias, d lora_a, d lora_b, d router, d probs). Configs default to the kernels' defaults.
    """
    t, k, n, e, r = tokens, in_features, out_features, num_experts, rank
    if routing_mode is None:
        routing_mode = NO_ROUTER if e == 1 else TOKEN_ROUTER
    es = torch.empty((), dtype=dtype).element_size()
    bes = es if bias else 0
    token, given = routing_mode == TOKEN_ROUTER, routing_mode == GIVEN_PROBS
    flags = _flags(torch.empty((), dtype=dtype), e, r, routing_mode, None, False)
    block_j, block_e = flags["BLOCK_E"] * flags["RANK_PAD"], flags["BLOCK_E"]
    router_cols = (block_e * (1 if dtype == torch.float32 else 2)) if token else 0
    a_bytes, b_bytes, router_bytes, probs_bytes = 4 * e * k * r, 4 * e * r * n, 4 * k * e, 4 * t * e
    u_bytes, p_bytes = 4 * t * e * r, 4 * t * e

    # ---- forward: tiles of y
    fc = forward_config or default_config("forward", t, k, n, flags)
    bm, bn, tiles = fc.kwargs["BLOCK_M"], fc.kwargs["BLOCK_N"], fc.kwargs["N_TILES"]
    nm, nn = _cdiv(t, bm), _cdiv(n, bn * tiles)  # programs per column / per row
    loaded = (
        t * k * es * nn * tiles  # x, once per column tile (masked-off tiles past N included)
        + n * k * es * nm  # W, once per row of programs
        + a_bytes * nm * nn  # lora_a: every program, in its first tile
        + (router_bytes * nm * nn if token else 0)
        + (probs_bytes * nn if given else 0)
        + b_bytes * nm  # lora_b: each program its columns
        + n * bes * nm
    )
    stored = t * n * es + (u_bytes if save_for_backward else 0) + (p_bytes if save_for_backward and token else 0)
    unique = (
        t * k * es
        + n * k * es
        + n * bes
        + a_bytes
        + b_bytes
        + (router_bytes if token else 0)
        + (probs_bytes if given else 0)
        + stored
    )
    padded_t, padded_n = nm * bm, nn * bn * tiles
    linear_flops = 2 * padded_t * padded_n * k
    flops = linear_flops + 2 * padded_t * k * (block_j + router_cols) * nn + 2 * padded_t * block_j * padded_n
    forward = KernelTraffic(loaded, stored, 0, unique, flops)

    # ---- backward: tiles of dx
    need_dx, need_bias, need_a, need_b, need_router, need_probs = needs
    need_router, need_probs = need_router and token, need_probs and given
    k_tiled = need_dx or need_a or need_router
    bc = backward_config or default_config("backward", t, k, n, flags)
    bm, bk, tiles = bc.kwargs["BLOCK_M"], bc.kwargs["BLOCK_K"], bc.kwargs["K_TILES"]
    nm, nk = _cdiv(t, bm), (_cdiv(k, bk * tiles) if k_tiled else 1)  # programs per column / per row
    p_in = p_bytes if (token or given) else 0
    loaded = (
        (u_bytes + p_in) * nk * need_b  # U and p for U′ (d lora_b), every program
        + (p_in + (u_bytes if routing_mode != NO_ROUTER else 0)) * nk  # p (and U for dp) after the first N loop
        + t * n * es * nk * (1 + (tiles - 1) * need_dx)  # dy: every tile's N loop (the first only without dx)
        + (n * k * es * nm if need_dx else 0)
        + b_bytes * nm * nk
        + ((a_bytes + (router_bytes if token else 0)) * nm if need_dx else 0)
        + (t * k * es if (need_a or need_router) else 0)
    )
    stored = (t * k * es if need_dx else 0) + (p_bytes if need_probs else 0)
    atomic = 4 * (e * r * n * nm * need_b + n * nm * need_bias + e * r * k * nm * need_a + k * e * nm * need_router)
    unique = (
        t * n * es
        + (n * k * es if need_dx else 0)
        + (t * k * es if (need_a or need_router) else 0)
        + b_bytes
        + ((a_bytes + (router_bytes if token else 0)) if need_dx else 0)
        + u_bytes
        + p_in
        + stored
        + 4 * (e * r * n * need_b + n * need_bias + e * r * k * need_a + k * e * need_router)
    )
    padded_t, padded_k = nm * bm, nk * bk * tiles
    n_steps = _cdiv(n, bc.kwargs["BLOCK_N"]) * bc.kwargs["BLOCK_N"]
    flops = (
        2 * padded_t * padded_k * n_steps * need_dx
        + 2 * padded_t * block_j * n_steps * nk  # G = dy·B_catᵀ per K tile
        + 2 * padded_t * block_j * n_steps * need_b  # d lora_b (pid_k == 0)
        + 2 * padded_t * padded_k * (block_j + router_cols) * (need_dx + need_a)
    )
    backward = KernelTraffic(loaded, stored, atomic, unique, flops)

    # ---- references
    x_b, w_b, y_b = t * k * es, n * k * es, t * n * es
    adapters = a_bytes + b_bytes + (router_bytes if token else 0) + (probs_bytes if given else 0)
    grads = 4 * (e * r * n + e * r * k + (k * e if token else 0)) + (4 * n if bias else 0)
    ten = t * e * n * es  # the authors' [T, E, N] per-expert outputs
    authors_forward = (
        (a_bytes + b_bytes) * (1 + es / 4)  # adapters cast to the activation dtype
        + (x_b + router_bytes + 3 * p_bytes if token else 0)  # logits from x, softmax read / write
        + x_b + e * k * r * es + t * e * r * es  # shrink: x·A_e for every expert
        + t * e * r * es + e * r * n * es + ten  # expand: writes [T, E, N]
        + ten + p_bytes + y_b  # mix with p: reads [T, E, N]
        + x_b + w_b + n * bes + y_b  # base linear
        + 3 * y_b  # base + scale·delta
    )  # fmt: skip
    authors_backward = (
        2 * y_b + ten  # d[T, E, N] = dy ⊗ p (reads dy) and dp = Σ_n dy·[T, E, N] (reads dy)
        + ten  # dp reads [T, E, N]
        + 2 * ten + t * e * r * es * 2 + e * r * n * es  # d B = Uᵀ d[T,E,N], dU = d[T,E,N] Bᵀ
        + 2 * t * e * r * es + e * k * r * es + x_b  # dx_lora = dU Aᵀ (writes [T, K]), dA = xᵀ dU
        + (2 * x_b + router_bytes if token else 0)  # dx_router (writes [T, K]), d router = xᵀ dlogits
        + y_b + w_b + x_b  # dx_base = dy W
        + 6 * x_b  # dx accumulation of three [T, K] terms
        + grads
    )  # fmt: skip
    shrink_kernel = x_b + a_bytes + (router_bytes if token else 0) + t * e * r * es + (p_bytes if token else 0)
    return TrafficModel(
        forward=forward,
        backward=backward,
        linear_forward=x_b + w_b + n * bes + y_b,
        linear_backward=y_b + w_b + x_b,
        linear_forward_flops=linear_flops,
        linear_backward_flops=2 * t * n * k,
        minimum_forward=x_b + w_b + n * bes + adapters + y_b,
        minimum_backward=y_b + w_b + x_b + adapters + x_b + grads,
        two_kernel_forward=shrink_kernel + forward.unique + t * e * r * es - (router_bytes if token else 0) - a_bytes,
        authors_forward=int(authors_forward),
        authors_backward=int(authors_backward),
    )


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases
# ------------------------------------------------------------------------------------------------

#: T5-large attention projections (T = 2048 tokens, K = N = 1024) at the paper's MoLoRA settings.
AOT_SHAPES = ((2048, 1024, 1024, 1, 4), (2048, 1024, 1024, 10, 4), (2048, 1024, 1024, 15, 16))
AOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def aot_cases() -> list:
    """Every configuration autotuning may choose, both kernels, fp16 / bf16 / fp32, the AOT_SHAPES.

    ``PEMOE_AOT_DEFAULTS_ONLY=1`` keeps only the default configurations and ``PEMOE_AOT_SELECT=<regex>``
    only the cases whose name matches (the quick test run compiles a subset; ``-m slow`` all of them).
    """
    import re

    from pemoe.kernels.triton.aot import AotCase

    defaults_only = os.environ.get("PEMOE_AOT_DEFAULTS_ONLY", "0") == "1"
    select = re.compile(os.environ.get("PEMOE_AOT_SELECT", ""))
    cases = []
    for dtype in AOT_DTYPES:
        for t, k, n, e, r in AOT_SHAPES:
            x = torch.empty((t, k), dtype=dtype)
            weight = torch.empty((n, k), dtype=dtype)
            bias = torch.empty((n,), dtype=dtype)
            lora_a, lora_b = torch.empty((e, k, r)), torch.empty((e, r, n))
            router = None if e == 1 else torch.empty((k, e))
            name = f"{str(dtype).removeprefix('torch.')} E={e} r={r}"
            (y, u, p_soft), f_args, f_flags, _ = _forward_launch(
                x, weight, bias, lora_a, lora_b, router, None, 4.0, None, False, True
            )
            needs = (True, True, True, True, True, False)
            _, b_args, b_flags, _ = _backward_launch(
                y, x, weight, lora_a, lora_b, router, None, u, p_soft, 4.0, None, False, needs
            )
            for kernel, args, flags, configs, backward in (
                (_molora_forward_kernel, f_args, f_flags, FORWARD_CONFIGS, False),
                (_molora_backward_kernel, b_args, b_flags, BACKWARD_CONFIGS, True),
            ):
                names = [a for a in kernel.fn.arg_names if a not in flags and a not in configs[0].kwargs]
                named = dict(zip(names, args, strict=True))
                chosen = _prune(configs, dict(named, **flags), backward=backward)
                for i, cfg in enumerate(chosen[:1] if defaults_only else chosen):
                    kw = cfg.kwargs
                    tiles = kw.get("K_TILES" if backward else "N_TILES", 1)
                    tile = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}" + (f"x{tiles}tiles" if tiles > 1 else "")
                    cases.append(
                        AotCase(
                            name=f"{name} {'bwd' if backward else 'fwd'} {tile}",
                            kernel=kernel,
                            args=named,
                            constexprs={**flags, **kw},
                            num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages,
                            default=i == 0,
                        )
                    )
    return [c for c in cases if select.search(c.name)]
