"""Fused MoV linear (SPEC §3.1): y = mov(x·Wᵀ + b) in one GEMM with a MoV epilogue.

Math, per token t and head g (N = G·D, h seen as [T, G, D]; router [D, E] and experts [G, E, D] float32):
    h        = x·Wᵀ + b                                   # float32 accumulator, never written to HBM
    logits   = h[t, g, :] (float32) · router              # [T, G, E]
    p, p_sft = routing.router_probs(logits)               # softmax (+ top-k, renormalised on request)
    s        = Σ_e p[t, g, e] · experts[g, e, :]          # [T, G, D]
    y        = h ⊙ s                                      # stored in x's dtype
(IA)3 (E = 1, router None): s = experts[g, 0, :]. Sentence routing: p = probs[t, :] ([T, E], given) for
every head, and the gradient flows back to ``probs``.

Tiling. A program owns a [BLOCK_M, BLOCK_N] output tile; BLOCK_N is a multiple of D, so the tile holds
HEADS = BLOCK_N / D whole heads. In the epilogue the float32 accumulator is viewed as [BLOCK_M·HEADS, D]
rows (one per token and head) and multiplied by the router on the tensor cores; the merge is one dot
of the probabilities [BLOCK_M, HEADS·BLOCK_E] with a block-diagonal expert tile [HEADS·BLOCK_E, BLOCK_N]
(zeros off the diagonal blocks: HEADS-fold redundant work on a K of HEADS·BLOCK_E, a few percent of the
GEMM's K at T5 shapes, instead of a per-expert loop on the CUDA cores).

Backward (W is frozen: no weight gradient). With dyh = dy ⊙ h:
    dp[t, g, e]     = Σ_d dyh[t, g, d] · experts[g, e, d]
    dlogits         = routing.router_probs_backward(dp, p_soft)            (token routing)
    d experts       = Σ_t p[t, g, e] · dyh[t, g, :]
    d router        = Σ_{t,g} h[t, g, :]ᵀ · dlogits[t, g, :]
    d probs[t, e]   = Σ_g dp[t, g, e]                                       (sentence routing)
    dh              = dy ⊙ s + dlogits · routerᵀ,   dx = dh · W,   d bias = Σ_t dh
The backward launcher first recomputes h = x·Wᵀ + b [T, N] with one torch GEMM in the activation dtype
(cuBLAS: large tensor-core tiles; freed when the backward returns); one kernel reads it and produces dh
plus partial sums of d experts, d router and d probs; dx = dh · W is a plain GEMM (torch.matmul). The
kernel can instead recompute each h tile itself (H_FROM_GEMM off, ``plan_problem(h_from_gemm=False)``):
its reductions need 16-32-row tiles for token routing, so that recompute runs at mma.sync speed and
requests x and W from L2 once per tile; the traffic/FLOP model (``mov_linear_analysis.backward_strategies``,
docs/backward-h.md) puts the one GEMM ahead at every shape it reports, so it is the default wherever the
h-reading kernel's default tile compiles spill-free (:func:`backward_reads_h`: not for sentence routing
or BLOCK_E > 16, which recompute). With token routing and D = 128 (one head a tile) the
h-reading kernel runs in two passes over its rows, the second in column halves (:func:`_bwd_token_halves`):
its one-pass loop spills there.

What the forward saves: x (the op's input), and p_soft [T, G, E] float32 (only when a gradient is
needed and routing is per token). h [T, N] is NOT saved, it is recomputed: saving it would hold T·N
activation elements per MoV site from the forward to the backward (SPEC §3 asks to keep activation
memory low) and put the forward further from its minimum HBM traffic. p_soft is saved rather than
recomputed so that the backward uses the forward's top-k choices exactly (a recomputed h may round
differently and flip a near-tie). The backward's router gradient reads h rounded to the activation
dtype, as the forward's router does; dyh = dy ⊙ h uses the h the kernel has (rounded when read, the
float32 accumulator when recomputed).

Cross-program reductions are two-stage and deterministic: the backward grid is (row chunk of
REDUCE_ROWS tokens) × (column tile); each program loops over its chunk's BLOCK_M row tiles, keeps its
partial sums in registers and writes them once to a float32 workspace indexed by chunk (and head),
which torch sums afterwards. The workspace layout does not depend on the tile configuration, so the
backward kernel can be autotuned, and it runs bit-identically twice (no atomics).

Limits (checked by the launcher, NotImplementedError naming what is supported): D ∈ {16, 32, 64, 128},
E ≤ 64, float16 / bfloat16 / float32 activations with float32 adapters, a frozen weight, CUDA tensors (CPU
tensors under TRITON_INTERPRET=1). x and W may be strided; the small adapter tensors are made contiguous.

Autotuning, keyed on (T bucket, N, K, D, BLOCK_E, routing, dtypes; the backward also on where h comes
from): FORWARD_CONFIGS / BACKWARD_CONFIGS are data; ``legal_config`` prunes them per problem (whole heads per
tile, tl.dot's 16×16×16 minimum for every E including E = 1, shared-memory budget, row bucket) and
``candidate_configs`` orders the survivors, spill-free defaults first (``default_safe``): the first is the
default. ``mov_linear_analysis.aot_cases()`` lists every candidate for T5-shaped problems, for the
ahead-of-time compile checks.

Numerics: every tl.dot accumulates in float32. The main GEMM reads x and W in their dtype. The epilogue
products (router logits, merge and their backward) must be float32-grade: with float32 activations they are
``"ieee"`` dots (a correctness path, not a fast one); with 16-bit activations they run on 16-bit tensor
cores through :mod:`.split_dot` — the router reads h rounded to the activation dtype (as the reference's
router does) times a hi/lo split of the float32 router, and the other float32 operands are split into
16-bit hi/lo parts (three dots; float16 scales them by powers of two first). Not TF32: the PTX feeds
float32 registers to ``mma.tf32`` without a rounding ``cvt``, so the hardware truncates each operand to 10
mantissa bits, a bias that breaks the tolerance rule (the interpreter emulates it: :mod:`.interpreter`);
``tf32x3`` fixes that but spills on sm_80 at the default tiles (two float32 copies of h). Element-wise math is
float32; the output is cast to x's dtype at the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from pemoe.kernels.triton import routing, split_dot, tiles
from pemoe.kernels.triton.interpreter import do_bench
from pemoe.kernels.triton.plan import load_torch_part, torch_attribute

#: Head widths (D) the kernels support: tiles hold whole heads and tl.dot needs D ≥ 16, a power of two.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
#: Most experts supported (BLOCK_E = 64 register tiles); the paper uses at most 60.
MAX_EXPERTS = 64
#: Rows of tokens whose partial sums one backward program reduces (≥ every backward BLOCK_M).
REDUCE_ROWS = 128
#: Shared memory the main loop's pipelined x and W tiles may take (sm_80 allows 163 KiB per block;
#: the rest is left to the epilogue's layout conversions).
MAIN_LOOP_SMEM = 144 * 1024
#: Estimated shared memory of the backward kernel (main loop + float32 epilogue operands), within sm_80's.
BACKWARD_SMEM = 160 * 1024
#: Routing modes (the ROUTING constexpr).
ROUTING_NONE, ROUTING_TOKEN, ROUTING_SENTENCE = 0, 1, 2
#: Where the backward gets h, unless plan_problem is told otherwise: True, one full-size GEMM in the backward
#: launcher (large tensor-core tiles) writes h [T, N] in the activation dtype and the backward kernel reads it
#: (H_FROM_GEMM) wherever :func:`backward_reads_h` allows it; False, each backward program recomputes its h
#: tile from x and W in its own small tiles, for every problem.
BACKWARD_H_FROM_GEMM = True


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _linear_tile(
    x_ptr, w_ptr, bias_ptr,
    offs_m, offs_n, T, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk,
    HAS_BIAS: tl.constexpr, MAIN_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """h tile = x[offs_m, :] · W[offs_n, :]ᵀ (+ bias) as a float32 [BLOCK_M, BLOCK_N] accumulator.

    offs_m is int64 (row offsets T·K pass 2^31 at long contexts); W's row offsets are widened here."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk
    row_ok = offs_m[:, None] < T
    col_ok = offs_n[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x_tile = tl.load(x_ptrs, mask=row_ok & (offs_k[None, :] < k_left), other=0.0)
        w_tile = tl.load(w_ptrs, mask=col_ok & (offs_k[:, None] < k_left), other=0.0)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=MAIN_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _expert_block(experts_ptr, head0, G, E, HEAD_DIM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """Block-diagonal float32 [HEADS·BLOCK_E, BLOCK_N]: row h·BLOCK_E + e, column h·D + d holds
    experts[head0 + h, e, d]; zero off the diagonal blocks, for padded experts and for heads ≥ G."""
    HEADS: tl.constexpr = BLOCK_N // HEAD_DIM
    rows = tl.arange(0, HEADS * BLOCK_E)
    cols = tl.arange(0, BLOCK_N)
    row_head, row_e = rows // BLOCK_E, rows % BLOCK_E
    col_head, col_d = cols // HEAD_DIM, cols % HEAD_DIM
    mask = (row_head[:, None] == col_head[None, :]) & (row_e[:, None] < E) & (head0 + row_head[:, None] < G)
    ptrs = experts_ptr + ((head0 + row_head[:, None]) * E + row_e[:, None]) * HEAD_DIM + col_d[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _head_rows(offs_m, head0, T, G, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the [BLOCK_M·HEADS] (token, head) rows of a tile: token index, head index, validity."""
    HEADS: tl.constexpr = BLOCK_N // HEAD_DIM
    rows = tl.arange(0, BLOCK_M * HEADS)
    row_m = tl.min(offs_m) + rows // HEADS
    row_g = head0 + rows % HEADS
    return row_m, row_g, (row_m < T) & (row_g < G)


@triton.jit
def _sentence_probs_tile(probs_ptr, offs_m, head0, T, G, E, BLOCK_E: tl.constexpr, HEADS: tl.constexpr):
    """probs[t, e] repeated per head as [BLOCK_M, HEADS·BLOCK_E] (column h·BLOCK_E + e), 0 where padded."""
    cols = tl.arange(0, HEADS * BLOCK_E)
    col_e = cols % BLOCK_E
    mask = (offs_m[:, None] < T) & (col_e[None, :] < E) & (head0 + cols[None, :] // BLOCK_E < G)
    return tl.load(probs_ptr + offs_m[:, None] * E + col_e[None, :], mask=mask, other=0.0)


@triton.jit
def _token_probs_rows(p_soft_rows, offs_m, head, rows, G, E, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                      BLOCK_E: tl.constexpr):  # fmt: skip
    """The saved p_soft [BLOCK_M, BLOCK_E] of one head for rows offs_m (< ``rows`` valid) and the routing weights
    p used (top-k, renormalised on request); padded rows get a finite stand-in p_soft (no 0/0) and p = 0."""
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_m[:, None] < rows
    p_soft = tl.load(
        p_soft_rows + (offs_m[:, None] * G + head) * E + offs_e[None, :], mask=row_ok & (offs_e[None, :] < E), other=0.0
    )
    p_soft = tl.where(row_ok | (offs_e[None, :] >= E), p_soft, 1.0 / E)
    return p_soft, tl.where(row_ok, routing.select(p_soft, offs_e, E, TOP_K, RENORMALIZE), 0.0)


@triton.jit
def _h_dy_columns(h_rows, dy_rows, offs_m, offs_n, rows, N, stride_dym, stride_dyn):
    """h (activation dtype) and dy (float32) at rows offs_m (< ``rows`` valid) and columns offs_n."""
    ok = offs_m[:, None] < rows
    h = tl.load(h_rows + offs_m[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
    dy = tl.load(dy_rows + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=ok, other=0.0)
    return h, dy.to(tl.float32)


@triton.jit
def _dh_columns(dh_rows, offs_m, offs_n, rows, N, p, dlogits, dy, experts, router, DT: tl.constexpr,
                PRECISION: tl.constexpr):  # fmt: skip
    """dh = dy ⊙ (p·experts) + dlogits·routerᵀ at rows offs_m and columns offs_n of one head, stored in dh's dtype."""
    dh = split_dot.dot_split(p, experts, tl.zeros(dy.shape, tl.float32), DT, PRECISION) * dy
    dh = split_dot.dot_split(dlogits, tl.trans(router), dh, DT, PRECISION)
    tl.store(
        dh_rows + offs_m[:, None] * N + offs_n[None, :], dh.to(dh_rows.dtype.element_ty), mask=offs_m[:, None] < rows
    )


@triton.jit
def _bwd_token_halves(
    h_ptr, router_ptr, experts_ptr, p_soft_ptr, dy_ptr,
    dh_ptr, d_experts_part_ptr, d_router_part_ptr,
    chunk, head0, T, N, G, E, stride_dym, stride_dyn,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_D_EXPERTS: tl.constexpr, NEED_D_ROUTING: tl.constexpr,
    EPILOGUE_PRECISION: tl.constexpr, DT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_E: tl.constexpr, REDUCE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """The token-routing backward that reads h, for one head a tile (BLOCK_N = D = 128): the math of
    :func:`mov_linear_bwd_kernel`'s loop, arranged so that it compiles without register spills.

    * Two passes over the chunk's row tiles: the first accumulates d experts = Σ pᵀ·dyh; the second dh and
      d router. Each pass holds only its own partial sums (the second re-reads p_soft, h and dy from L1/L2).
    * The second pass holds every [BLOCK_M, D] tile as two [BLOCK_M, D / 2] column halves (lo, hi): the sum over
      d of dp = dyh·expertsᵀ adds the halves' products; s, dh and d router are per half.
    Per row tile of the second pass: dp → dlogits (routing.router_probs_backward), then per half
    dh = dy ⊙ (p·experts) + dlogits·routerᵀ and d router += hᵀ·dlogits (h in the activation dtype, as the
    forward's router reads it)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_e = tl.arange(0, BLOCK_E)
    offs_c = tl.arange(0, HALF)
    # the chunk's first row moves the row pointers once (64-bit: T·N passes 2^31 at long contexts); offsets
    # within the chunk (fewer than REDUCE_ROWS rows) are 32-bit
    row0 = chunk.to(tl.int64) * REDUCE_ROWS
    h_rows = h_ptr + row0 * N
    dy_rows = dy_ptr + row0 * stride_dym
    if NEED_DH:  # absent otherwise
        dh_rows = dh_ptr + row0 * N
    p_soft_rows = p_soft_ptr + row0 * G * E
    head = head0.to(tl.int32)
    cols_lo = head * HEAD_DIM + offs_c
    cols_hi = cols_lo + HALF
    rows = min(REDUCE_ROWS, T - chunk * REDUCE_ROWS)

    # ---- first pass: d experts
    if NEED_D_EXPERTS:
        d_experts_lo = tl.zeros((BLOCK_E, HALF), dtype=tl.float32)
        d_experts_hi = tl.zeros((BLOCK_E, HALF), dtype=tl.float32)
        for sub in range(0, tl.cdiv(rows, BLOCK_M)):
            offs_m = sub * BLOCK_M + tl.arange(0, BLOCK_M)
            _, p = _token_probs_rows(p_soft_rows, offs_m, head, rows, G, E, TOP_K, RENORMALIZE, BLOCK_E)
            h, dy = _h_dy_columns(h_rows, dy_rows, offs_m, cols_lo, rows, N, stride_dym, stride_dyn)
            d_experts_lo = split_dot.dot_split(tl.trans(p), dy * h, d_experts_lo, DT, EPILOGUE_PRECISION)
            h, dy = _h_dy_columns(h_rows, dy_rows, offs_m, cols_hi, rows, N, stride_dym, stride_dyn)
            d_experts_hi = split_dot.dot_split(tl.trans(p), dy * h, d_experts_hi, DT, EPILOGUE_PRECISION)
        ptrs = d_experts_part_ptr + ((chunk * G + head0) * E + offs_e[:, None]) * HEAD_DIM + offs_c[None, :]
        tl.store(ptrs, d_experts_lo, mask=offs_e[:, None] < E)
        tl.store(ptrs + HALF, d_experts_hi, mask=offs_e[:, None] < E)

    # ---- second pass: dh and d router
    if NEED_DH or NEED_D_ROUTING:
        e_ok = offs_e < E
        experts_lo = tl.load(
            experts_ptr + (head * E + offs_e[:, None]) * HEAD_DIM + offs_c[None, :], mask=e_ok[:, None], other=0.0
        )
        experts_hi = tl.load(
            experts_ptr + (head * E + offs_e[:, None]) * HEAD_DIM + HALF + offs_c[None, :],
            mask=e_ok[:, None],
            other=0.0,
        )
        router_lo = tl.load(router_ptr + offs_c[:, None] * E + offs_e[None, :], mask=e_ok[None, :], other=0.0)
        router_hi = tl.load(router_ptr + (HALF + offs_c[:, None]) * E + offs_e[None, :], mask=e_ok[None, :], other=0.0)
        d_router_lo = tl.zeros((HALF, BLOCK_E), dtype=tl.float32)
        d_router_hi = tl.zeros((HALF, BLOCK_E), dtype=tl.float32)
        for sub in range(0, tl.cdiv(rows, BLOCK_M)):
            offs_m = sub * BLOCK_M + tl.arange(0, BLOCK_M)
            p_soft, p = _token_probs_rows(p_soft_rows, offs_m, head, rows, G, E, TOP_K, RENORMALIZE, BLOCK_E)
            h_lo, dy_lo = _h_dy_columns(h_rows, dy_rows, offs_m, cols_lo, rows, N, stride_dym, stride_dyn)
            h_hi, dy_hi = _h_dy_columns(h_rows, dy_rows, offs_m, cols_hi, rows, N, stride_dym, stride_dyn)
            dp = split_dot.dot_split(
                dy_lo * h_lo, tl.trans(experts_lo), tl.zeros((BLOCK_M, BLOCK_E), tl.float32), DT, EPILOGUE_PRECISION
            )
            dp = split_dot.dot_split(dy_hi * h_hi, tl.trans(experts_hi), dp, DT, EPILOGUE_PRECISION)
            dlogits = routing.router_probs_backward(dp, p_soft, offs_e, E, TOP_K, RENORMALIZE)
            dlogits = tl.where((offs_m < rows)[:, None], dlogits, 0.0)
            if NEED_D_ROUTING:
                d_router_lo = split_dot.dot_exact_a_scaled_b(
                    tl.trans(h_lo.to(DT)), dlogits, d_router_lo, DT, EPILOGUE_PRECISION
                )
                d_router_hi = split_dot.dot_exact_a_scaled_b(
                    tl.trans(h_hi.to(DT)), dlogits, d_router_hi, DT, EPILOGUE_PRECISION
                )
            if NEED_DH:
                _dh_columns(dh_rows, offs_m, cols_lo, rows, N, p, dlogits, dy_lo, experts_lo, router_lo, DT,
                            EPILOGUE_PRECISION)  # fmt: skip
                _dh_columns(dh_rows, offs_m, cols_hi, rows, N, p, dlogits, dy_hi, experts_hi, router_hi, DT,
                            EPILOGUE_PRECISION)  # fmt: skip
        if NEED_D_ROUTING:
            ptrs = d_router_part_ptr + ((chunk * G + head0) * HEAD_DIM + offs_c[:, None]) * E + offs_e[None, :]
            tl.store(ptrs, d_router_lo, mask=e_ok[None, :])
            tl.store(ptrs + HALF * E, d_router_hi, mask=e_ok[None, :])


def _fwd_configs() -> list[triton.Config]:
    """Forward tile configurations, best first for T5 shapes (the first legal one is the default)."""
    table = [
        # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
        (64, 128, 64, 8, 3),  # 16-bit activations (spill-free on sm_80 with the split epilogue, wgmma on sm_90)
        (32, 64, 32, 8, 3),  # float32 activations (no tensor cores: accumulators in registers); E > 16
        (128, 128, 64, 8, 3),
        (128, 64, 64, 8, 3),  # many experts: one head a tile (wgmma on sm_90 with E = 60)
        (64, 64, 64, 8, 3),
        (64, 64, 32, 8, 3),
        (16, 128, 32, 8, 3),  # float32 activations, D = 128
        (16, 64, 32, 8, 3),  # float32 activations, many experts
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (16, 128, 128, 4, 3),  # decode-sized T
        (16, 64, 128, 4, 3),
        # float32 activations with D = 128 (within the shared-memory budget)
        (64, 128, 32, 4, 3),
        (16, 128, 64, 4, 3),
        # narrow tiles, legal only for D ≤ 32 (with many experts: HEADS·BLOCK_E ≤ 128)
        (64, 32, 64, 4, 3),
        (16, 32, 64, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in table
    ]


def _bwd_configs() -> list[triton.Config]:
    """Backward tile configurations (BLOCK_M divides REDUCE_ROWS), best first for T5 shapes."""
    table = [
        # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
        # the defaults (first legal per shape), chosen spill-free on sm_80 and sm_90 by the AOT reports:
        (64, 64, 64, 8, 3),  # (IA)3 (64 rows: wgmma on sm_90)
        (32, 64, 32, 8, 3),  # token routing, D = 64, E ≤ 16
        (16, 64, 32, 8, 3),  # many experts (BLOCK_E > 16): 16-row tiles; float32 (IA)3 and sentence routing
        (16, 64, 64, 8, 3),
        (32, 128, 32, 8, 3),  # D = 128
        (16, 128, 16, 8, 3),  # 16-bit sentence routing; D = 128 token routing
        (16, 64, 16, 8, 3),  # float32 activations, many experts
        (16, 128, 32, 8, 3),
        (64, 64, 16, 8, 3),  # wgmma on sm_90 for 16-bit sentence routing
        (64, 64, 64, 4, 3),
        (128, 64, 64, 8, 3),
        (64, 128, 64, 8, 3),
        (16, 64, 128, 4, 3),  # decode-sized T
        (16, 128, 64, 4, 3),
        # narrow tiles, legal only for D ≤ 32
        (64, 32, 64, 4, 3),
        (16, 32, 64, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, n, k, w, s in table
    ]


#: The tile configurations autotuning chooses from (data, not code).
FORWARD_CONFIGS = _fwd_configs()
BACKWARD_CONFIGS = _bwd_configs()


def legal_config(
    config: triton.Config,
    head_dim: int,
    block_e: int,
    m_bucket: int,
    itemsize: int,
    backward: bool = False,
    routing: int = ROUTING_TOKEN,  # the most demanding mode
    h_from_gemm: bool = False,
) -> bool:
    """Whether a tile configuration is legal for head width D, padded experts BLOCK_E, T ≤ m_bucket and
    activations of ``itemsize`` bytes, for the forward (or the ``backward``) kernel. A backward that reads h
    (``h_from_gemm``) has no K loop: BLOCK_K is unused and the main-loop rules below do not apply to it.

    * BLOCK_N is a multiple of D (tiles hold whole heads);
    * every tl.dot has M, N, K ≥ 16: BLOCK_M, BLOCK_K, D and BLOCK_E ≥ 16 (the launcher pads E);
    * the block-diagonal merge stays small: HEADS·BLOCK_E ≤ 64 for D ≥ 64 (E = 60 → one head a tile; two
      spill registers on sm_80), ≤ 128 for the narrow heads D ≤ 32;
    * float32 activations (FMA dots, accumulators in registers), D ≥ 64, calibrated on the AOT reports so
      that the defaults do not spill: BLOCK_M·BLOCK_N ≤ 2048 and BLOCK_K ≤ 32; forward with E > 16:
      BLOCK_M ≤ 16; backward: BLOCK_M ≤ 32 for token routing with E ≤ 16, else ≤ 16, and BLOCK_K ≤ 16
      with E > 16 or D = 128. For the narrow heads D ≤ 32: BLOCK_M·BLOCK_N ≤ 4096;
    * BLOCK_M is no taller than the problem's row bucket (no tile mostly padding for decode-sized T);
    * the main loop's pipelined tiles fit sm_80's shared memory: (BLOCK_M + BLOCK_N)·BLOCK_K·itemsize·stages
      ≤ MAIN_LOOP_SMEM (float32 activations get smaller tiles);
    * BLOCK_M divides REDUCE_ROWS (the backward's row chunk; every forward BLOCK_M does too);
    * backward, D ≥ 64: BLOCK_M·HEADS·BLOCK_E ≤ 1024 (register pressure of the p / dlogits tiles: with
      E = 60 only 16-row tiles compile without spills), and with token routing BLOCK_M ≤ 32 (its softmax
      backward spills 64-row tiles, whether it recomputes h or reads it; (IA)3 and sentence routing keep
      64-row tiles, and so wgmma on sm_90);
    * backward: its float32 epilogue operands (the expert block and its transpose, dyh, p) plus the main
      loop stay within BACKWARD_SMEM (calibrated on the AOT reports: with E = 60 only 64×64 tiles fit sm_80).
    """
    kw = config.kwargs
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    reads_h = backward and h_from_gemm
    if reads_h:
        bk = 16  # unused: no K loop, no main-loop tiles
    main_loop = 0 if reads_h else (bm + bn) * bk * itemsize * config.num_stages
    if bn % head_dim or min(bm, bk, head_dim, block_e) < 16:
        return False
    if main_loop > MAIN_LOOP_SMEM:
        return False
    heads_e = (bn // head_dim) * block_e
    if heads_e > (64 if head_dim >= 64 else 128):
        return False
    if itemsize == 4 and head_dim < 64 and bm * bn > 4096:  # narrow heads: uncalibrated, the old bound
        return False
    if itemsize == 4 and head_dim >= 64:
        if bm * bn > 2048 or bk > 32:
            return False
        if not backward and block_e > 16 and bm > 16:
            return False
        if backward and bm > (32 if routing == ROUTING_TOKEN and block_e <= 16 else 16):
            return False
        if backward and (block_e > 16 or head_dim >= 128) and bk > 16:
            return False
    if bm > max(16, m_bucket):
        return False
    if backward:
        if head_dim >= 64 and (bm * heads_e > 1024 or (routing == ROUTING_TOKEN and bm > 32)):
            return False
        epilogue = 4 * (2 * heads_e * bn + bm * bn + bm * heads_e)
        if epilogue + main_loop > BACKWARD_SMEM:
            return False
    return REDUCE_ROWS % bm == 0


def default_safe(
    config: triton.Config,
    head_dim: int,
    block_e: int,
    itemsize: int,
    backward: bool,
    routing: int,
    h_from_gemm: bool = False,
) -> bool:
    """Whether a legal configuration may be a default: no register spills on sm_80 nor sm_90 (calibrated on
    the AOT reports). Some legal configurations spill on sm_80 only and stay autotuning candidates: on sm_90
    they are the wgmma tiles. With 16-bit activations (the split epilogue of :mod:`.split_dot`):

    * forward with BLOCK_E > 16 (E = 60): BLOCK_M ≤ 32 (64-row tiles spill on sm_80);
    * backward with sentence routing: BLOCK_M, BLOCK_K ≤ 16 (only 16 × 128 × 16 stays in sm_80's registers;
      BLOCK_K is unused when the backward reads h);
    * backward with token routing and D = 128: BLOCK_M ≤ 16;
    * backward with token routing that reads h (``h_from_gemm``): BLOCK_M ≤ 16 (its 32-row tiles spill on
      sm_90, 64-row ones on both).
    """
    if itemsize == 4:
        return True  # legal_config's float32 rules are calibrated for spill-free tiles already
    bm, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]
    if not backward:
        return block_e <= 16 or bm <= 32
    if routing == ROUTING_SENTENCE:
        return bm <= 16 and (bk <= 16 or h_from_gemm)
    if routing == ROUTING_TOKEN and h_from_gemm:
        return bm <= 16
    return not (routing == ROUTING_TOKEN and head_dim >= 128 and bm > 16)


def candidate_configs(
    configs: list[triton.Config],
    head_dim: int,
    block_e: int,
    m_bucket: int,
    itemsize: int,
    backward: bool,
    routing: int,
    h_from_gemm: bool = False,
) -> list[triton.Config]:
    """The legal configurations in tuning order: the :func:`default_safe` ones first (in table order), so
    the first is the default (what the interpreter and the AOT defaults run), then the others. A backward that
    reads h (``h_from_gemm``) does not use BLOCK_K: of the configurations that differ only there, the first
    is kept."""
    legal = [
        c for c in configs if legal_config(c, head_dim, block_e, m_bucket, itemsize, backward, routing, h_from_gemm)
    ]
    if backward and h_from_gemm:
        seen, unique = set(), []
        for c in legal:
            key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            if key not in seen:
                seen.add(key)
                unique.append(c)
        legal = unique
    safe = [c for c in legal if default_safe(c, head_dim, block_e, itemsize, backward, routing, h_from_gemm)]
    if not safe:
        raise ValueError(f"mov_linear: no tile configuration for D={head_dim}, BLOCK_E={block_e}, M_BUCKET={m_bucket}")
    return safe + [c for c in legal if c not in safe]


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    itemsize, backward = args["x_ptr"].element_size(), "REDUCE_ROWS" in args
    return candidate_configs(
        configs, args["HEAD_DIM"], args["BLOCK_E"], args["M_BUCKET"], itemsize, backward, args["ROUTING"],
        backward and args["H_FROM_GEMM"],
    )  # fmt: skip


_TUNING_KEY = ["M_BUCKET", "N", "K", "HEAD_DIM", "BLOCK_E", "ROUTING"]


@triton.autotune(
    configs=FORWARD_CONFIGS, key=_TUNING_KEY, prune_configs_by={"early_config_prune": _prune}, do_bench=do_bench
)
@triton.jit
def mov_linear_fwd_kernel(
    # inputs
    x_ptr, w_ptr, bias_ptr, router_ptr, experts_ptr, probs_ptr,
    # outputs
    y_ptr, p_soft_ptr,
    # sizes
    T, N, K, G, E, M_BUCKET,
    # strides (router, experts, probs, p_soft and y are contiguous)
    stride_xm, stride_xk, stride_wn, stride_wk,
    # rows of x one group of programs shares (see plan_problem: its [rows, K] slab fits half the L2)
    GROUP_ROWS,
    # features
    HAS_BIAS: tl.constexpr, ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    SAVE_P_SOFT: tl.constexpr, MAIN_PRECISION: tl.constexpr, EPILOGUE_PRECISION: tl.constexpr,
    # blocks
    HEAD_DIM: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y [T, N] = mov(x [T, K] · W [N, K]ᵀ + b); p_soft [T, G, E] float32 written when SAVE_P_SOFT."""
    HEADS: tl.constexpr = BLOCK_N // HEAD_DIM
    DT: tl.constexpr = x_ptr.dtype.element_ty
    # ---- tile: grouped ordering: the row tiles of GROUP_ROWS rows sweep the column tiles together, so W is
    # read from DRAM once per group while the group's rows of x stay in L2
    group_m = tl.maximum(GROUP_ROWS // BLOCK_M, 1)
    pid_m, pid_n = tiles.grouped_ids(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(N, BLOCK_N), group_m)
    # 64-bit row offsets: T·K, T·N and T·G·E elements pass 2^31 at long contexts (x, y, p_soft addresses)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    head0 = pid_n * HEADS

    # ---- GEMM: h = x·Wᵀ + b in float32
    h = _linear_tile(
        x_ptr, w_ptr, bias_ptr, offs_m, offs_n, T, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
        HAS_BIAS, MAIN_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip

    # ---- epilogue: routing weights and expert merge s [BLOCK_M, BLOCK_N]
    if ROUTING == 0:  # (IA)3: s = experts[g, 0, :]
        s = tl.load(experts_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    else:
        experts = _expert_block(experts_ptr, head0, G, E, HEAD_DIM, BLOCK_E, BLOCK_N)
        if ROUTING == 1:  # token routing: logits of every (token, head) row
            offs_e = tl.arange(0, BLOCK_E)
            offs_d = tl.arange(0, HEAD_DIM)
            router = tl.load(router_ptr + offs_d[:, None] * E + offs_e[None, :], mask=offs_e[None, :] < E, other=0.0)
            # the router reads h in the activation dtype, as the reference does (h = x·Wᵀ + b, rounded),
            # times a hi/lo split of the float32 router: float32-grade logits on 16-bit tensor cores
            h_rows = tl.reshape(h.to(DT), (BLOCK_M * HEADS, HEAD_DIM))
            logits = tl.zeros((BLOCK_M * HEADS, BLOCK_E), dtype=tl.float32)
            logits = split_dot.dot_exact_a(h_rows, router, logits, DT, EPILOGUE_PRECISION)
            p, p_soft = routing.router_probs(logits, offs_e, E, TOP_K, RENORMALIZE)
            if SAVE_P_SOFT:
                row_m, row_g, row_ok = _head_rows(offs_m, head0, T, G, HEAD_DIM, BLOCK_M, BLOCK_N)
                ptrs = p_soft_ptr + (row_m[:, None] * G + row_g[:, None]) * E + offs_e[None, :]
                tl.store(ptrs, p_soft, mask=row_ok[:, None] & (offs_e[None, :] < E))
            p_heads = tl.reshape(p, (BLOCK_M, HEADS * BLOCK_E))
        else:  # sentence routing: the given probs, the same for every head
            p_heads = _sentence_probs_tile(probs_ptr, offs_m, head0, T, G, E, BLOCK_E, HEADS)
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s = split_dot.dot_split(p_heads, experts, s, DT, EPILOGUE_PRECISION)

    # ---- store y = h ⊙ s in the activation dtype
    y = h * s
    y_ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < T) & (offs_n[None, :] < N))


@triton.autotune(
    configs=BACKWARD_CONFIGS,
    key=_TUNING_KEY + ["H_FROM_GEMM"],  # its legal tiles differ
    prune_configs_by={"early_config_prune": _prune},
    # a tile writes only its first head's slots of these (the others stay zero): autotuning runs every
    # candidate on the same buffers, so they are zeroed before each candidate and before the winner
    reset_to_zero=["d_router_part_ptr", "d_probs_part_ptr"],
    do_bench=do_bench,
)
@triton.jit
def mov_linear_bwd_kernel(
    # inputs (h [T, N] in the activation dtype, contiguous: read when H_FROM_GEMM, else x, W and bias)
    x_ptr, w_ptr, bias_ptr, router_ptr, experts_ptr, probs_ptr, p_soft_ptr, dy_ptr, h_ptr,
    # outputs: dh [T, N]; float32 partial sums per row chunk c (and head g of a tile's first head)
    dh_ptr, d_experts_part_ptr, d_router_part_ptr, d_probs_part_ptr,
    # sizes
    T, N, K, G, E, M_BUCKET,
    # strides (router, experts, probs, p_soft, dh and the partials are contiguous)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_dym, stride_dyn,
    # features
    HAS_BIAS: tl.constexpr, ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_D_EXPERTS: tl.constexpr, NEED_D_ROUTING: tl.constexpr,
    H_FROM_GEMM: tl.constexpr, MAIN_PRECISION: tl.constexpr, EPILOGUE_PRECISION: tl.constexpr,
    # blocks
    HEAD_DIM: tl.constexpr, BLOCK_E: tl.constexpr, REDUCE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dh [T, N] and the partial sums of d experts, d router / d probs for REDUCE_ROWS tokens, from h read
    from h_ptr (H_FROM_GEMM: the launcher's GEMM wrote it) or recomputed per tile from x, W and bias.

    d_experts_part [C, G, E, D]      Σ over the chunk's tokens of p·dyh            (C = ⌈T / REDUCE_ROWS⌉)
    d_router_part  [C, G, D, E]      Σ over the chunk and the tile's heads of hᵀ·dlogits, at the tile's
                                     first head (the launcher zero-fills the other heads' slots)
    d_probs_part   [G, T, E]         Σ over the tile's heads of dp, at the tile's first head (zero-filled)
    """
    HEADS: tl.constexpr = BLOCK_N // HEAD_DIM
    DT: tl.constexpr = x_ptr.dtype.element_ty
    # ---- program: one column tile × one chunk of REDUCE_ROWS tokens; consecutive programs share the
    # column tile, so the programs in flight stream one W column tile while x stays in L2
    pid = tl.program_id(0)
    num_chunks = tl.cdiv(T, REDUCE_ROWS)
    chunk = pid % num_chunks
    pid_n = pid // num_chunks
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    head0 = pid_n.to(tl.int64) * HEADS  # 64-bit: d_probs_part's head0·T·E passes 2^31 at long contexts
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n[None, :] < N

    if H_FROM_GEMM and ROUTING == 1 and HEAD_DIM > 64:
        # one D = 128 head a tile: two passes, the second in column halves (this loop spills there)
        tl.static_assert(HEADS == 1)
        _bwd_token_halves(
            h_ptr, router_ptr, experts_ptr, p_soft_ptr, dy_ptr, dh_ptr, d_experts_part_ptr, d_router_part_ptr,
            chunk, head0, T, N, G, E, stride_dym, stride_dyn, TOP_K, RENORMALIZE, NEED_DH, NEED_D_EXPERTS,
            NEED_D_ROUTING, EPILOGUE_PRECISION, DT, HEAD_DIM, BLOCK_E, REDUCE_ROWS, BLOCK_M,
        )  # fmt: skip
    else:
        # ---- loop-invariant adapter tiles and the partial-sum accumulators
        if ROUTING == 0:
            s = tl.load(experts_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
            d_experts_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            experts = _expert_block(experts_ptr, head0, G, E, HEAD_DIM, BLOCK_E, BLOCK_N)
            d_experts_acc = tl.zeros((HEADS * BLOCK_E, BLOCK_N), dtype=tl.float32)
        if ROUTING == 1:
            router = tl.load(router_ptr + offs_d[:, None] * E + offs_e[None, :], mask=offs_e[None, :] < E, other=0.0)
            d_router_acc = tl.zeros((HEAD_DIM, BLOCK_E), dtype=tl.float32)

        chunk_rows = min(REDUCE_ROWS, T - chunk * REDUCE_ROWS)
        for sub in range(0, tl.cdiv(chunk_rows, BLOCK_M)):
            offs_m = chunk.to(tl.int64) * REDUCE_ROWS + sub * BLOCK_M + tl.arange(0, BLOCK_M)  # 64-bit rows
            row_ok = offs_m[:, None] < T
            # ---- h (read, or recomputed), dy
            if H_FROM_GEMM:
                # kept in the activation dtype: dyh = dy ⊙ h promotes it, the router's h rows are it
                h = tl.load(h_ptr + offs_m[:, None] * N + offs_n[None, :], mask=row_ok & col_ok, other=0.0)
            else:
                h = _linear_tile(
                    x_ptr, w_ptr, bias_ptr, offs_m, offs_n, T, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                    HAS_BIAS, MAIN_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                )  # fmt: skip
            dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
            dy = tl.load(dy_ptrs, mask=row_ok & col_ok, other=0.0).to(tl.float32)
            dyh = dy * h
            if ROUTING == 0:
                dh = dy * s
                if NEED_D_EXPERTS:
                    d_experts_acc += tl.sum(dyh, axis=0)
            else:
                # ---- routing weights p [BLOCK_M, HEADS·BLOCK_E] and the merge s
                if ROUTING == 1:
                    row_m, row_g, row_valid = _head_rows(offs_m, head0, T, G, HEAD_DIM, BLOCK_M, BLOCK_N)
                    p_ptrs = p_soft_ptr + (row_m[:, None] * G + row_g[:, None]) * E + offs_e[None, :]
                    p_soft = tl.load(p_ptrs, mask=row_valid[:, None] & (offs_e[None, :] < E), other=0.0)
                    # padded (token, head) rows: a finite stand-in (no 0/0 when renormalising), then p = 0
                    p_soft = tl.where(row_valid[:, None] | (offs_e[None, :] >= E), p_soft, 1.0 / E)
                    p = tl.where(row_valid[:, None], routing.select(p_soft, offs_e, E, TOP_K, RENORMALIZE), 0.0)
                    p_heads = tl.reshape(p, (BLOCK_M, HEADS * BLOCK_E))
                else:
                    p_heads = _sentence_probs_tile(probs_ptr, offs_m, head0, T, G, E, BLOCK_E, HEADS)
                s = split_dot.dot_split(
                    p_heads, experts, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DT, EPILOGUE_PRECISION
                )
                dh = dy * s
                # ---- d experts: the diagonal blocks of pᵀ·dyh
                if NEED_D_EXPERTS:
                    d_experts_acc = split_dot.dot_split(tl.trans(p_heads), dyh, d_experts_acc, DT, EPILOGUE_PRECISION)
                # ---- dp = dyh · expertsᵀ, then d probs (sentence) or d logits (token)
                if NEED_D_ROUTING or (ROUTING == 1 and NEED_DH):
                    dp_heads = tl.zeros((BLOCK_M, HEADS * BLOCK_E), dtype=tl.float32)
                    dp_heads = split_dot.dot_split(dyh, tl.trans(experts), dp_heads, DT, EPILOGUE_PRECISION)
                    if ROUTING == 2:
                        d_probs = tl.sum(tl.reshape(dp_heads, (BLOCK_M, HEADS, BLOCK_E)), axis=1)
                        ptrs = d_probs_part_ptr + (head0 * T + offs_m[:, None]) * E + offs_e[None, :]
                        tl.store(ptrs, d_probs, mask=row_ok & (offs_e[None, :] < E))
                    else:
                        dp = tl.reshape(dp_heads, (BLOCK_M * HEADS, BLOCK_E))
                        dlogits = routing.router_probs_backward(dp, p_soft, offs_e, E, TOP_K, RENORMALIZE)
                        dlogits = tl.where(row_valid[:, None], dlogits, 0.0)
                        if NEED_D_ROUTING:
                            h_rows = tl.reshape(h.to(DT), (BLOCK_M * HEADS, HEAD_DIM))  # as the forward's router
                            d_router_acc = split_dot.dot_exact_a_scaled_b(
                                tl.trans(h_rows), dlogits, d_router_acc, DT, EPILOGUE_PRECISION
                            )
                        if NEED_DH:
                            dh_router = tl.zeros((BLOCK_M * HEADS, HEAD_DIM), dtype=tl.float32)
                            dh_router = split_dot.dot_split(
                                dlogits, tl.trans(router), dh_router, DT, EPILOGUE_PRECISION
                            )
                            dh += tl.reshape(dh_router, (BLOCK_M, BLOCK_N))
            # ---- store dh in the activation dtype
            if NEED_DH:
                tl.store(
                    dh_ptr + offs_m[:, None] * N + offs_n[None, :], dh.to(dh_ptr.dtype.element_ty), mask=row_ok & col_ok
                )

        # ---- write the chunk's partial sums once
        if NEED_D_EXPERTS:
            if ROUTING == 0:  # [C, G, 1, D] is [C, N]
                tl.store(d_experts_part_ptr + chunk * N + offs_n, d_experts_acc, mask=offs_n < N)
            else:
                rows = tl.arange(0, HEADS * BLOCK_E)
                row_head, row_e = rows // BLOCK_E, rows % BLOCK_E
                col_head, col_d = tl.arange(0, BLOCK_N) // HEAD_DIM, tl.arange(0, BLOCK_N) % HEAD_DIM
                g = head0 + row_head[:, None]
                mask = (row_head[:, None] == col_head[None, :]) & (row_e[:, None] < E) & (g < G)
                ptrs = d_experts_part_ptr + ((chunk * G + g) * E + row_e[:, None]) * HEAD_DIM + col_d[None, :]
                tl.store(ptrs, d_experts_acc, mask=mask)
        if ROUTING == 1:
            if NEED_D_ROUTING:
                ptrs = d_router_part_ptr + ((chunk * G + head0) * HEAD_DIM + offs_d[:, None]) * E + offs_e[None, :]
                tl.store(ptrs, d_router_acc, mask=offs_e[None, :] < E)


# ------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    T: int
    K: int
    N: int
    G: int
    E: int
    D: int
    routing: int
    top_k: int
    renormalize: bool
    block_e: int
    m_bucket: int
    main_precision: str
    epilogue_precision: str
    itemsize: int = 2  # bytes per activation element (4: float32)
    group_rows: int = 1  # rows of x one forward program group shares (GROUP_ROWS)
    h_from_gemm: bool = True  # the backward reads h from one GEMM (H_FROM_GEMM) instead of recomputing tiles


# ------------------------------------------------------------------------------------------
# Launch plan: framework-neutral (shapes and ints only), shared by the torch launcher
# (mov_linear_torch.py) and by pemoe.jax.triton (the same kernels called from JAX through jax-triton)
# ------------------------------------------------------------------------------------------


#: L2 size assumed where the device's is unknown (the interpreter; jax-triton, which does not report it):
#: A100's 40 MiB, the smaller of the two targets (H100: 50 MiB).
DEFAULT_L2_BYTES = 40 * 2**20


def group_rows(K: int, itemsize: int, l2_bytes: int) -> int:
    """Rows of x that one group of forward programs shares: the most whose [rows, K] slab fits half the L2.

    The forward's programs run in grouped order (:func:`.tiles.grouped_ids`): the row tiles of one group sweep
    every column tile of W together, so W streams from DRAM once per group while the group's rows of x are
    re-read from L2, once per column tile. DRAM traffic is then ``x + W · ⌈T / rows⌉``: the larger the group
    the better, as long as its rows of x stay in L2 beside the W tiles in flight (half the L2 for x leaves
    the other half to them). A fixed group of 8 row tiles reads a Llama-7B-like W (4096 × 4096, bf16, T = 2048,
    64-row tiles) four times: 2.4× the forward's minimum traffic; a group of every row reads it once.
    """
    return max(1, (l2_bytes // 2) // (K * itemsize))


def plan_problem(
    T: int,
    K: int,
    N: int,
    experts_shape: tuple[int, int, int],
    *,
    router_shape: tuple[int, int] | None,
    probs_shape: tuple[int, int] | None,
    top_k: int | None,
    renormalize: bool,
    itemsize: int,
    l2_bytes: int = DEFAULT_L2_BYTES,
    h_from_gemm: bool | None = None,
) -> _Problem:
    """The kernels' limits checked on shapes alone, and the launch description: x [T, K], weight [N, K],
    experts [G, E, D], router [D, E] (None: (IA)3), probs [T, E] (sentence routing), activations of
    ``itemsize`` bytes (4: float32, ieee dots; 2: float16/bfloat16, split 16-bit epilogue dots), on a device
    with ``l2_bytes`` of L2 (it sizes the forward's program groups, :func:`group_rows`). ``h_from_gemm``: where
    the backward gets h (None: :func:`backward_reads_h`, the spill-free choice for the shape): from one
    full-size GEMM that the backward launcher runs first and the backward kernel reads, or recomputed per tile
    inside the backward kernel."""
    G, E, D = experts_shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(
            f"mov_linear (triton): head width D = N / G = {D} is not supported; supported D: {SUPPORTED_HEAD_DIMS}"
        )
    if E > MAX_EXPERTS:
        raise NotImplementedError(f"mov_linear (triton): at most {MAX_EXPERTS} experts are supported, got E = {E}")
    if G * D != N:
        raise ValueError(f"mov_linear (triton): experts [G, E, D] = {list(experts_shape)} needs N = G·D, got N = {N}")
    if probs_shape is not None:
        routing_mode = ROUTING_SENTENCE
        if tuple(probs_shape) != (T, E):
            raise ValueError(f"mov_linear (triton): probs must have shape [T, E] = [{T}, {E}], got {list(probs_shape)}")
    elif router_shape is None:
        if E != 1:
            raise ValueError(f"mov_linear (triton): router is required when E > 1 (E = {E})")
        routing_mode = ROUTING_NONE
    else:
        routing_mode = ROUTING_TOKEN
        if tuple(router_shape) != (D, E):
            raise ValueError(f"mov_linear (triton): router must have shape [D, E] = [{D}, {E}]")
    # top_k = E keeps every expert: the plain softmax (renormalising by Σp = 1 changes nothing)
    k = 0 if (top_k is None or top_k == E or routing_mode != ROUTING_TOKEN) else int(top_k)
    fp32 = itemsize == 4
    block_e = max(16, triton.next_power_of_2(E))
    h_from_gemm = backward_reads_h(routing_mode, D, block_e) if h_from_gemm is None else bool(h_from_gemm)
    return _Problem(
        T=T, K=K, N=N, G=G, E=E, D=D, routing=routing_mode, top_k=k, renormalize=bool(renormalize and k),
        block_e=block_e, m_bucket=max(16, triton.next_power_of_2(T)),
        main_precision="ieee" if fp32 else "tf32", epilogue_precision="ieee",
        itemsize=itemsize, group_rows=group_rows(K, itemsize, l2_bytes), h_from_gemm=h_from_gemm,
    )  # fmt: skip


def backward_reads_h(routing: int, head_dim: int, block_e: int) -> bool:
    """Whether the backward of a problem reads h from one GEMM (H_FROM_GEMM) by default, rather than recompute
    each h tile inside the backward kernel: :data:`BACKWARD_H_FROM_GEMM`, and a problem whose h-reading default
    tile compiles without register spills — BLOCK_E = 16 (E ≤ 16), token routing or (IA)3, head width D ≤ 64
    or D = 128.

    The reason is registers, not speed (the one GEMM is faster at every shape the traffic/FLOP model reports,
    docs/backward-h.md). The h-reading kernel's epilogue is fed by loaded h tiles instead of the recompute's
    float32 accumulator and needs more registers at the same tile, and its default is already the shortest
    (16 rows; BLOCK_K unused). In the AOT reports (triton 3.9) its one-pass loop spills for sentence routing
    (bf16: 32 B on sm_80, 48 B on sm_90) and for BLOCK_E = 64 (E = 60: 48 B on sm_90), where the fused
    recompute's defaults are spill-free, so those problems keep the fused recompute. At D = 128 with token
    routing the one-pass loop spilled too (144 B on sm_90); the kernel runs those problems in two passes
    instead (:func:`_bwd_token_halves`), whose default 16 × 128 tile compiles spill-free on sm_80 and sm_90 in
    bf16, fp16 and fp32, soft, top-2 and top-2 renormalised. (IA)3 (no router) at D = 128 runs the one-pass
    loop spill-free (32 × 128 tile in 16-bit, 16 × 128 in float32: at most 80 registers). The rule is by shape
    alone, the same for every activation dtype, and conservative between the measured points (BLOCK_E = 32
    recomputes). ``plan_problem(h_from_gemm=True)`` still selects the h-reading kernel for any problem
    (autotuning and tests)."""
    if not BACKWARD_H_FROM_GEMM or block_e > 16:
        return False
    return routing != ROUTING_SENTENCE and (head_dim <= 64 or head_dim == 128)


def default_config(pb: _Problem, backward: bool = False) -> triton.Config:
    """The configuration the kernel runs unless tuning picks another: the first legal one of
    FORWARD_CONFIGS (BACKWARD_CONFIGS), as the autotuner's pruning leaves them (AOT-checked spill-free)."""
    configs = BACKWARD_CONFIGS if backward else FORWARD_CONFIGS
    return candidate_configs(
        configs, pb.D, pb.block_e, pb.m_bucket, pb.itemsize, backward, pb.routing, backward and pb.h_from_gemm
    )[0]


def forward_grid(pb: _Problem, meta: dict) -> tuple[int]:
    """Forward programs: one per [BLOCK_M, BLOCK_N] output tile (grouped order inside the kernel)."""
    return (triton.cdiv(pb.T, meta["BLOCK_M"]) * triton.cdiv(pb.N, meta["BLOCK_N"]),)


def backward_grid(pb: _Problem, meta: dict) -> tuple[int]:
    """Backward programs: one per (chunk of REDUCE_ROWS tokens, BLOCK_N column tile)."""
    return (triton.cdiv(pb.T, REDUCE_ROWS) * triton.cdiv(pb.N, meta["BLOCK_N"]),)


def forward_constexprs(pb: _Problem, has_bias: bool, save_p_soft: bool) -> dict:
    """Feature constexprs of the forward kernel (tiles come from the configuration)."""
    return _common_constexprs(pb, has_bias) | dict(SAVE_P_SOFT=save_p_soft and pb.routing == ROUTING_TOKEN)


def backward_needs(pb: _Problem, needs: tuple[bool, bool, bool]) -> tuple[bool, bool, bool]:
    """(dh, d experts, d routing) the backward kernel computes; (IA)3 has no routing gradient."""
    need_dh, need_experts, need_routing = needs
    return need_dh, need_experts, need_routing and pb.routing != ROUTING_NONE


def backward_constexprs(pb: _Problem, has_bias: bool, needs: tuple[bool, bool, bool]) -> dict:
    """Feature constexprs of the backward kernel for needs = (dh, d experts, d routing)."""
    need_dh, need_experts, need_routing = backward_needs(pb, needs)
    return _common_constexprs(pb, has_bias) | dict(
        NEED_DH=need_dh,
        NEED_D_EXPERTS=need_experts,
        NEED_D_ROUTING=need_routing,
        REDUCE_ROWS=REDUCE_ROWS,
        H_FROM_GEMM=pb.h_from_gemm,
    )


def backward_outputs(pb: _Problem, needs: tuple[bool, bool, bool]) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """The backward kernel's outputs in its argument order: name -> (shape, dtype, zero-filled), dtype
    "act" (x's) or "float32"; None-valued entries are not needed (the kernel gets no pointer for them).

    dh [T, N]; d_experts_part [C, G, E, D]; d_router_part [C, G, D, E] (token routing; zero-filled: only
    each tile's first head slot is written); d_probs_part [G, T, E] (sentence routing; zero-filled).
    Summing the partials over their first axis (and the head axis of d_router_part) finishes the reduction.
    """
    need_dh, need_experts, need_routing = backward_needs(pb, needs)
    C = triton.cdiv(pb.T, REDUCE_ROWS)
    token, sentence = need_routing and pb.routing == ROUTING_TOKEN, need_routing and pb.routing == ROUTING_SENTENCE
    return {
        "dh": ((pb.T, pb.N), "act", False) if need_dh else None,
        "d_experts_part": ((C, pb.G, pb.E, pb.D), "float32", False) if need_experts else None,
        "d_router_part": ((C, pb.G, pb.D, pb.E), "float32", True) if token else None,
        "d_probs_part": ((pb.G, pb.T, pb.E), "float32", True) if sentence else None,
    }


def forward_group_rows(pb: _Problem, config: dict | None = None) -> int:
    """The forward's GROUP_ROWS argument: the plan's, or ``config["GROUP_M"]`` row tiles when a forced
    configuration names a group (tests exercise several groups on small problems)."""
    if config is not None and "GROUP_M" in config:
        return config["GROUP_M"] * config["BLOCK_M"]
    return pb.group_rows


def _common_constexprs(pb: _Problem, has_bias: bool) -> dict:
    return dict(
        HAS_BIAS=has_bias, ROUTING=pb.routing, TOP_K=pb.top_k, RENORMALIZE=pb.renormalize,
        MAIN_PRECISION=pb.main_precision, EPILOGUE_PRECISION=pb.epilogue_precision,
        HEAD_DIM=pb.D, BLOCK_E=pb.block_e,
    )  # fmt: skip


#: The launch description (public name).
Problem = _Problem


# ------------------------------------------------------------------------------------------
# Launcher and autograd (PyTorch): mov_linear_torch.py, loaded with this module when torch is installed (its entry
# point mov_linear, the launchers and the custom ops are attributes of this module); without torch (JAX) this
# module holds the kernels and the launch plan alone.
# ------------------------------------------------------------------------------------------

_torch_part = load_torch_part(__name__)


def __getattr__(name: str):
    return torch_attribute(_torch_part, __name__, name)
