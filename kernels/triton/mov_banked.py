"""MoV over an adapter bank (forward only): every token scales by its own adapter's routed experts.

Token t names adapter a = ids[t] of a bank of A adapters stacked along a leading axis (router [A, D, E],
experts [A, G, E, D]; the FFN site: router [A, F, E], experts [A, 1, E, F]); a = -1 is no adapter (the
row passes through unscaled). Per token t with a = ids[t] ≥ 0, and head g (h seen as [T, G, D]):

    logits   = h[t, g, :] · router[a]                      # token routing (float32)
    p        = routing.router_probs(logits)                # softmax (+ top-k, renormalised on request)
    s        = Σ_e p[t, g, e] · experts[a, g, e, :]        # (IA)3, E = 1, no router: s = experts[a, g, 0, :]
    y        = h ⊙ s                                       # a = -1: y = h
Sentence routing: p = probs[t, :] ([T, E], computed on the torch side from each token's own adapter's router)
for every head. Three uses:

* ``mov``: h given ([T, N], N = G·D): one kernel, no GEMM;
* ``mov_linear``: h = x·Wᵀ + b in float32 from the GEMM's main loop, the MoV scaling in its epilogue (one
  kernel, h never written);
* ``mov_ffn``: (a) the dual up GEMM writes u = act(x·wi_0ᵀ) [⊙ x·wi_1ᵀ] and the router-logit partials
  act(x·wi_0ᵀ)[:, f-slice] · router[a][f-slice] (the router of the FFN site reads all F columns, so the
  softmax needs every F column first). Each program owns a row tile and a chunk of F_CHUNK columns (a
  runtime scalar from the plan, :func:`up_f_chunk`: :mod:`.mov_ffn`'s :func:`.mov_ffn.f_chunk`), loops over
  the chunk's F tiles, adds each tile's share to a [BLOCK_M, BLOCK_E] float32 register accumulator in F
  order and writes the chunk's sum to one slot of ``logits_part [cdiv(F, F_CHUNK), T, E]`` float32 (no
  atomics: each slot entry is written by one program, so the result is deterministic). The slots are
  counted from the plan, not from the tile autotune picks, and stay few: at T = 8192, F = 10240, E = 60
  9 slots (17.7 MB), where one slot per F tile of the narrowest BLOCK_F would be 320 (629 MB); SPEC §3 allows
  [T, E] float32 beyond a plain FFN. (b) one pass over u [T, F] sums the cdiv(F, F_CHUNK) partials in slot
  order, routes, and scales u in place by s; the down projection is ``F.linear(u, wo)`` (the vendor GEMM:
  the banked scaling sits before it, not in it).

Per-row adapters in a tile. The launcher sorts the tokens by adapter (a stable argsort on the device, no
host sync) and the kernels walk their row tiles in that order through the permutation (x rows are read
and y rows written at the token's own position), so a row tile names few adapters: one for a batch of one
adapter, a few at segment boundaries, at most BLOCK_M when decoding many adapters. The epilogue loops over
the adapters its tile names (``while``: the next larger id present), runs the single-adapter epilogue of
:mod:`.mov_linear` with that adapter's router and experts (tensor-core dots: the router logits, the
block-diagonal expert merge) and keeps the result on that adapter's rows. The work is that of the
single-adapter kernel times the number of adapters in the tile; any id order is correct, the sort only
makes it cheap.

Numerics as the single-adapter kernels (:mod:`.mov_linear`): every dot accumulates in float32; GEMM operands
are read in their dtype (``"ieee"`` for float32 activations); the epilogue products are float32-grade
through :mod:`.split_dot` (16-bit activations: hi/lo splits on 16-bit tensor cores; float32: ``"ieee"``);
the router of ``mov`` / ``mov_linear`` reads h rounded to the activation dtype (as the reference does), the
FFN router reads act(x·wi_0ᵀ) in float32 (as :mod:`.mov_ffn` does); element-wise math is float32, the
output is cast at the store. Row offsets are 64-bit (T·K, T·N, T·F pass 2^31 at long contexts); in the FFN's
up kernel the row tile's and slot's offsets go into scalar base pointers in 64 bits and the offsets within
the tile stay 32-bit, except the gathered token rows of x and u.

Limits (NotImplementedError naming what is supported): as the single-adapter kernels — ``mov`` /
``mov_linear``: D ∈ {16, 32, 64, 128}; E ≤ 64; float16 / bfloat16 / float32 activations with float32
adapters; CUDA tensors (CPU tensors under TRITON_INTERPRET=1); no autograd (forward only: the launchers
refuse inputs that require grad under grad mode).

Tiles are data: ``mov`` / ``mov_linear`` autotune over :data:`MOV_CONFIGS` (pruned by the single-adapter
forward's legality rules, :func:`mov_candidates`) keyed on (T bucket, N, K, D, BLOCK_E, routing, GEMM or not);
the FFN kernels over :data:`UP_CONFIGS` / :data:`SCALE_CONFIGS` (:func:`ffn_candidates`) keyed on (T bucket,
M, F, E). The first legal configuration is the default, compiled spill-free for sm_80 and sm_90 at the shapes
of :mod:`.mov_banked_analysis` (the AOT checks); the interpreter runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pemoe.kernels.triton import mov_linear, routing, split_dot, tiles
from pemoe.kernels.triton.autograd import launch_device, refuse_grad
from pemoe.kernels.triton.interpreter import INTERPRET, do_bench
from pemoe.kernels.triton.mov_ffn import _up_tile, f_chunk
from pemoe.kernels.triton.mov_linear import _expert_block, _linear_tile, _sentence_probs_tile

ACTIVATIONS = ("gelu_new", "gelu", "relu", "silu")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROUTING_NONE, ROUTING_TOKEN, ROUTING_SENTENCE = (
    mov_linear.ROUTING_NONE,
    mov_linear.ROUTING_TOKEN,
    mov_linear.ROUTING_SENTENCE,
)


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------


@triton.jit
def _first_adapter(aid, A):
    """The smallest adapter id ≥ 0 among a tile's rows (A when every row is -1)."""
    return tl.min(tl.where(aid >= 0, aid, A))


@triton.jit
def _next_adapter(aid, a, A):
    """The smallest adapter id > a among a tile's rows (A when none)."""
    return tl.min(tl.where(aid > a, aid, A))


# ---- mov / mov_linear: tile configurations (data)


def _mov_cfg(m: int, n: int, k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


#: Tiles [BLOCK_M, BLOCK_N] (BLOCK_K for the GEMM), in tuning order; the first that
#: :func:`mov_candidates` keeps is the default. Calibrated spill-free on sm_80 and sm_90 by the AOT reports
#: (:mod:`.mov_banked_analysis`): the loop over a tile's adapters keeps s, h and an adapter's epilogue
#: operands live together, one tile size below the single-adapter kernel's defaults.
MOV_CONFIGS = [
    _mov_cfg(64, 64, 64, 8, 3),  # 16-bit, D ≤ 64, E ≤ 16 (wgmma on sm_90)
    _mov_cfg(32, 128, 64, 8, 3),  # 16-bit, D = 128; decode-sized T
    _mov_cfg(32, 64, 32, 8, 3),  # 16-bit with E > 16; float32, D = 64, E ≤ 16
    _mov_cfg(16, 128, 32, 8, 3),  # float32, D = 128
    _mov_cfg(16, 64, 16, 8, 2),  # float32 with E > 16
    _mov_cfg(16, 64, 64, 4, 3),  # decode-sized T
    _mov_cfg(64, 128, 64, 8, 3),  # tuning only (spills on sm_80)
]


def mov_candidates(head_dim: int, block_e: int, m_bucket: int, itemsize: int, routing_mode: int) -> list[triton.Config]:
    """The legal :data:`MOV_CONFIGS` in tuning order (the first is the default): the single-adapter forward's
    rules (:func:`.mov_linear.legal_config`: whole heads per tile, tl.dot minimums, shared memory, row bucket),
    and with 16-bit activations BLOCK_M ≤ 32 for E > 16 (64-row tiles spill there)."""
    kept = [
        c
        for c in MOV_CONFIGS
        if mov_linear.legal_config(c, head_dim, block_e, m_bucket, itemsize, False, routing_mode)
        and not (itemsize < 4 and block_e > 16 and c.kwargs["BLOCK_M"] > 32)
    ]
    if not kept:
        raise ValueError(f"mov (triton, bank): no tile configuration for D={head_dim}, BLOCK_E={block_e}")
    return kept


def _prune_mov(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    itemsize = args["x_ptr"].element_size()
    return mov_candidates(args["HEAD_DIM"], args["BLOCK_E"], args["M_BUCKET"], itemsize, args["ROUTING"])


@triton.autotune(
    configs=MOV_CONFIGS,
    key=["M_BUCKET", "N", "K", "HEAD_DIM", "BLOCK_E", "ROUTING", "LINEAR"],
    prune_configs_by={"early_config_prune": _prune_mov},
    do_bench=do_bench,
)
@triton.jit
def mov_banked_kernel(
    # inputs: x [T, K] (LINEAR) or h [T, N]; W [N, K]; bias [N]; router [A, D, E]; experts [A, G, E, D];
    # probs [T, E] (sentence routing); ids [T] int32 in sorted order; rows [T] int64: the token of each
    # sorted position
    x_ptr, w_ptr, bias_ptr, router_ptr, experts_ptr, probs_ptr, ids_ptr, rows_ptr,
    # output: y [T, N] in token order
    y_ptr,
    # sizes
    T, N, K, G, E, A, M_BUCKET,
    # strides (router, experts, probs, ids, rows and y are contiguous)
    stride_xm, stride_xk, stride_wn, stride_wk,
    # features
    LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, ROUTING: tl.constexpr, TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr, MAIN_PRECISION: tl.constexpr, EPILOGUE_PRECISION: tl.constexpr,
    # blocks
    HEAD_DIM: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """y[t] = h[t] ⊙ s[t] with s from adapter ids[t]'s router and experts (1 for id -1); h = x·Wᵀ + b when
    LINEAR, else the input."""
    HEADS: tl.constexpr = BLOCK_N // HEAD_DIM
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid_m, pid_n = tiles.grouped_ids(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    # sorted positions of the tile's rows, the tokens they hold (T for padding: masked) and their adapters;
    # 64-bit: T·K and T·N elements pass 2^31 at long contexts
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = offs_m < T
    tok = tl.load(rows_ptr + offs_m, mask=in_rows, other=T)
    aid = tl.load(ids_ptr + offs_m, mask=in_rows, other=-1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    head0 = pid_n * HEADS
    tile_ok = in_rows[:, None] & (offs_n[None, :] < N)

    # ---- h [BLOCK_M, BLOCK_N] float32: the GEMM (x·Wᵀ + b), or the input
    if LINEAR:
        h = _linear_tile(
            x_ptr, w_ptr, bias_ptr, tok, offs_n, T, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
            HAS_BIAS, MAIN_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    else:
        h_ptrs = x_ptr + tok[:, None] * stride_xm + offs_n[None, :] * stride_xk
        h = tl.load(h_ptrs, mask=tile_ok, other=0.0).to(tl.float32)

    # ---- epilogue: s per row from the row's adapter (1 for id -1)
    if ROUTING == 0:  # (IA)3: s = experts[a, g, 0, :], one gathered row per token
        s_ptrs = experts_ptr + aid.to(tl.int64)[:, None] * N + offs_n[None, :]
        s = tl.load(s_ptrs, mask=tile_ok & (aid[:, None] >= 0), other=1.0)
    else:
        s = tl.full((BLOCK_M, BLOCK_N), 1.0, dtype=tl.float32)
        offs_e = tl.arange(0, BLOCK_E)
        offs_d = tl.arange(0, HEAD_DIM)
        if ROUTING == 1:
            # the router reads h in the activation dtype, as the reference does (see mov_linear)
            h_rows = tl.reshape(h.to(DT), (BLOCK_M * HEADS, HEAD_DIM))
        else:  # sentence routing: the given probs of each row's token, the same for every head
            p_heads = _sentence_probs_tile(probs_ptr, tok, head0, T, G, E, BLOCK_E, HEADS)
        a = _first_adapter(aid, A)
        while a < A:
            a64 = a.to(tl.int64)
            experts = _expert_block(experts_ptr + a64 * G * E * HEAD_DIM, head0, G, E, HEAD_DIM, BLOCK_E, BLOCK_N)
            if ROUTING == 1:
                r_ptrs = router_ptr + a64 * HEAD_DIM * E + offs_d[:, None] * E + offs_e[None, :]
                router = tl.load(r_ptrs, mask=offs_e[None, :] < E, other=0.0)
                logits = tl.zeros((BLOCK_M * HEADS, BLOCK_E), dtype=tl.float32)
                logits = split_dot.dot_exact_a(h_rows, router, logits, DT, EPILOGUE_PRECISION)
                p, _ = routing.router_probs(logits, offs_e, E, TOP_K, RENORMALIZE)
                p_heads = tl.reshape(p, (BLOCK_M, HEADS * BLOCK_E))
            s_a = split_dot.dot_split(
                p_heads, experts, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DT, EPILOGUE_PRECISION
            )
            s = tl.where((aid == a)[:, None], s_a, s)
            a = _next_adapter(aid, a, A)

    # ---- store y = h ⊙ s at the tokens' own rows, in the activation dtype
    y = h * s
    tl.store(y_ptr + tok[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=tile_ok)


# ---- the FFN site: tile configurations (data)


def _cfg(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


#: Bytes of one K-row of the up GEMM's operand tiles: BLOCK_K = 64 for 16-bit operands, 32 for float32, so the
#: pipelined shared-memory buffers fit sm_80's 163 KiB whatever the dtype.
K_ROW_BYTES = 128
#: (a) dual GEMM tiles [BLOCK_M, BLOCK_F] (K = M) and (b) scaling tiles [BLOCK_M, BLOCK_F] (no GEMM: the merge
#: dot p·experts[a] per adapter in the tile), in tuning order; :func:`ffn_candidates` keeps the legal ones, the
#: first is the default. Calibrated spill-free on sm_80 and sm_90 by the AOT reports.
UP_CONFIGS = [
    _cfg(8, 3, BLOCK_M=64, BLOCK_F=64, BLOCK_K=64, GROUP_M=8),  # 16-bit, E ≤ 16 (wgmma on sm_90)
    _cfg(8, 4, BLOCK_M=32, BLOCK_F=64, BLOCK_K=64, GROUP_M=8),  # 16-bit, E > 16; decode-sized T (4 warps spill)
    _cfg(4, 4, BLOCK_M=16, BLOCK_F=64, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 3, BLOCK_M=128, BLOCK_F=128, BLOCK_K=64, GROUP_M=8),  # tuning only (larger tiles)
    _cfg(4, 4, BLOCK_M=64, BLOCK_F=128, BLOCK_K=64, GROUP_M=8),
    _cfg(8, 2, BLOCK_M=32, BLOCK_F=32, BLOCK_K=32, GROUP_M=8),  # float32 (3 stages spill on sm_90 with E > 16)
    _cfg(8, 3, BLOCK_M=64, BLOCK_F=32, BLOCK_K=32, GROUP_M=8),
    _cfg(4, 3, BLOCK_M=16, BLOCK_F=32, BLOCK_K=32, GROUP_M=8),
]
SCALE_CONFIGS = [
    _cfg(4, 1, BLOCK_M=32, BLOCK_F=128),  # E ≤ 16
    _cfg(4, 1, BLOCK_M=16, BLOCK_F=128),  # 16-bit, E > 16
    _cfg(4, 1, BLOCK_M=32, BLOCK_F=64),
    _cfg(4, 1, BLOCK_M=16, BLOCK_F=64),
    _cfg(4, 1, BLOCK_M=16, BLOCK_F=32),  # float32, E > 16
]


def _fits(block: int, size: int) -> bool:
    """A block no larger than the dimension rounded up to a power of two (≥ 16)."""
    return block <= max(16, triton.next_power_of_2(size))


def ffn_candidates(
    configs: list[triton.Config], T: int, F: int, M: int | None, itemsize: int, block_e: int
) -> list[triton.Config]:
    """The legal FFN configurations in tuning order (the first is the default): blocks that fit T and F (the
    smallest tile if none does); for the up GEMM (``M`` given) K-rows of K_ROW_BYTES, and with E > 16
    BLOCK_M ≤ 32; for the scaling (``M`` None) with E > 16, BLOCK_M·BLOCK_F ≤ 2048 (16-bit) or ≤ 512
    (float32), whose merge dots otherwise spill."""
    legal = configs
    if M is not None:
        legal = [c for c in legal if c.kwargs["BLOCK_K"] * itemsize == K_ROW_BYTES]
        if block_e > 16:
            legal = [c for c in legal if c.kwargs["BLOCK_M"] <= 32]
    elif block_e > 16:
        limit = 512 if itemsize == 4 else 2048
        legal = [c for c in legal if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_F"] <= limit]
    kept = [c for c in legal if _fits(c.kwargs["BLOCK_M"], T) and _fits(c.kwargs["BLOCK_F"], F)]
    return kept or [min(legal, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_F"])]


def _prune_up(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    return ffn_candidates(configs, args["T"], args["F"], args["M"], args["x_ptr"].element_size(), args["BLOCK_E"])


def _prune_scale(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    return ffn_candidates(configs, args["T"], args["F"], None, args["u_ptr"].element_size(), args["BLOCK_E"])


_FFN_KEY = ["T_BUCKET", "M", "F", "E"]


@triton.autotune(
    configs=UP_CONFIGS, key=_FFN_KEY, prune_configs_by={"early_config_prune": _prune_up}, do_bench=do_bench
)
@triton.jit
def mov_ffn_banked_up_kernel(
    # inputs: x [T, M], wi_0/wi_1 [F, M], router [A, F, E]; ids [T] int32 sorted, rows [T] int64
    x_ptr, wi_0_ptr, wi_1_ptr, router_ptr, ids_ptr, rows_ptr,
    # outputs: u [T, F] in token order; logit partials [F_SLOTS, T, E] float32 in sorted order
    u_ptr, logits_part_ptr,
    T, M, F, E, A, T_BUCKET, F_CHUNK,
    stride_xt, stride_xm, stride_w0f, stride_w0m, stride_w1f, stride_w1m, stride_lj,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, ROUTE_LOGITS: tl.constexpr,
    MAIN_PRECISION: tl.constexpr, EPILOGUE_PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """For one row tile (sorted positions) and the columns [j·F_CHUNK, (j + 1)·F_CHUNK) ∩ [0, F) of F chunk j: per
    F tile, u = act(x·wi_0ᵀ) [⊙ x·wi_1ᵀ] at the tokens' rows; the chunk's logit partial
    Σ_tiles act(x·wi_0ᵀ)[row i, f-slice]·router[ids[i]][f-slice] accumulates in registers, in F order, into
    slot j."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid_m, pid_j = tiles.grouped_ids(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(F, F_CHUNK), GROUP_M)
    # the row tile's and slot's offsets go into the base pointers in 64 bits (slots·T·E passes 2^31 at long T);
    # sorted positions within the tile stay 32-bit. The tokens' rows (x, u) are a gather: 64-bit per row.
    row0 = pid_m.to(tl.int64) * BLOCK_M
    ids_ptr += row0
    rows_ptr += row0
    offs_m = tl.arange(0, BLOCK_M)
    in_rows = offs_m < T - row0
    tok = tl.load(rows_ptr + offs_m, mask=in_rows, other=T)
    offs_e = tl.arange(0, BLOCK_E)
    f_start = pid_j * F_CHUNK
    f_end = tl.minimum(f_start + F_CHUNK, F)
    logits = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    if ROUTE_LOGITS:
        aid = tl.load(ids_ptr + offs_m, mask=in_rows, other=-1)
        first = _first_adapter(aid, A)
    for f0 in range(f_start, f_end, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        # ---- main loop and activation: act = act(x·wi_0ᵀ), u = act [⊙ x·wi_1ᵀ] (the token's own rows of x);
        # columns past the chunk's end read as 0, so act = act(0) = 0 there
        act, _, g = _up_tile(
            x_ptr, wi_0_ptr, wi_1_ptr, tok, offs_f, T, f_end, M,
            stride_xt, stride_xm, stride_w0f, stride_w0m, stride_w1f, stride_w1m,
            ACTIVATION, GATED, False, MAIN_PRECISION, BLOCK_M, BLOCK_F, BLOCK_K,
        )  # fmt: skip
        u = act * g if GATED else act
        # ---- epilogue: u at the tokens' rows
        tile_ok = in_rows[:, None] & (offs_f[None, :] < f_end)
        tl.store(u_ptr + tok[:, None] * F + offs_f[None, :], u.to(u_ptr.dtype.element_ty), mask=tile_ok)
        if ROUTE_LOGITS:  # this F tile's share of every row's logits, with the row's own router
            r_mask = (offs_f[:, None] < f_end) & (offs_e[None, :] < E)
            a = first
            while a < A:
                r_ptrs = router_ptr + a.to(tl.int64) * F * E + offs_f[:, None] * E + offs_e[None, :]
                router = tl.load(r_ptrs, mask=r_mask, other=0.0)
                logits_a = split_dot.dot_split(
                    act, router, tl.zeros((BLOCK_M, BLOCK_E), tl.float32), DT, EPILOGUE_PRECISION
                )
                logits = tl.where((aid == a)[:, None], logits + logits_a, logits)
                a = _next_adapter(aid, a, A)
    # ---- the chunk's logit partial: one slot per F chunk, written by this program alone
    if ROUTE_LOGITS:
        part = logits_part_ptr + (pid_j.to(tl.int64) * stride_lj + row0 * E) + offs_m[:, None] * E + offs_e[None, :]
        tl.store(part, logits, mask=in_rows[:, None] & (offs_e[None, :] < E))


@triton.autotune(
    configs=SCALE_CONFIGS,
    key=_FFN_KEY,
    prune_configs_by={"early_config_prune": _prune_scale},
    # u is scaled in place: autotuning runs every candidate on the same buffer, so u is restored before each
    # candidate and before the winner
    restore_value=["u_ptr"],
    do_bench=do_bench,
)
@triton.jit
def mov_ffn_banked_scale_kernel(
    # inputs: logit partials [F_SLOTS, T, E] (sorted order), probs [T, E] (token order), experts [A, 1, E, F];
    # ids [T] int32 sorted, rows [T] int64
    logits_part_ptr, probs_ptr, experts_ptr, ids_ptr, rows_ptr,
    # in/out: u [T, F] in token order, scaled in place
    u_ptr,
    T, M, F, E, A, T_BUCKET, F_SLOTS, stride_lj,
    ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    EPILOGUE_PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """u[t, f-slice] *= s[t, f-slice], s = p·experts[ids[t], 0] (p from the summed logit partials, or given);
    rows of id -1 unchanged. ``M`` only keys the tuning (the launch's FFN)."""
    DT: tl.constexpr = u_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_f = tl.cdiv(F, BLOCK_F)
    pid_m, pid_f = pid // num_f, pid % num_f
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = offs_m < T
    tok = tl.load(rows_ptr + offs_m, mask=in_rows, other=T)
    aid = tl.load(ids_ptr + offs_m, mask=in_rows, other=-1)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_e = tl.arange(0, BLOCK_E)
    tile_ok = in_rows[:, None] & (offs_f[None, :] < F)
    row_e = in_rows[:, None] & (offs_e[None, :] < E)
    if ROUTING == 0:  # (IA)3: s = experts[a, 0, 0, f-slice]
        s_ptrs = experts_ptr + aid.to(tl.int64)[:, None] * F + offs_f[None, :]
        s = tl.load(s_ptrs, mask=tile_ok & (aid[:, None] >= 0), other=1.0)
    else:
        if ROUTING == 1:  # the logit partials in a fixed order (deterministic), then the routing
            logits = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
            part_ptr = logits_part_ptr + offs_m[:, None] * E + offs_e[None, :]
            for _ in range(0, F_SLOTS):
                logits += tl.load(part_ptr, mask=row_e, other=0.0)
                part_ptr += stride_lj  # T·E, a 64-bit argument where it passes 2^31
            p, _ = routing.router_probs(logits, offs_e, E, TOP_K, RENORMALIZE)
            p = tl.where(row_e, p, 0.0)
        else:
            p = tl.load(probs_ptr + tok[:, None] * E + offs_e[None, :], mask=row_e, other=0.0)
        s = tl.full((BLOCK_M, BLOCK_F), 1.0, dtype=tl.float32)
        ex_mask = (offs_e[:, None] < E) & (offs_f[None, :] < F)
        a = _first_adapter(aid, A)
        while a < A:
            ex_ptrs = experts_ptr + a.to(tl.int64) * E * F + offs_e[:, None] * F + offs_f[None, :]
            experts = tl.load(ex_ptrs, mask=ex_mask, other=0.0)
            s_a = split_dot.dot_split(p, experts, tl.zeros((BLOCK_M, BLOCK_F), tl.float32), DT, EPILOGUE_PRECISION)
            s = tl.where((aid == a)[:, None], s_a, s)
            a = _next_adapter(aid, a, A)
    u_ptrs = u_ptr + tok[:, None] * F + offs_f[None, :]
    u = tl.load(u_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(u_ptrs, (u * s).to(DT), mask=tile_ok)


# ------------------------------------------------------------------------------------------
# Launch plan
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    T: int
    A: int
    G: int
    E: int
    D: int
    routing: int
    top_k: int
    renormalize: bool
    block_e: int
    m_bucket: int
    main_precision: str
    epilogue_precision: str = "ieee"


def _routing_mode(router, probs) -> int:
    if probs is not None:
        return ROUTING_SENTENCE
    return ROUTING_NONE if router is None else ROUTING_TOKEN


def _check(op: str, x, ids, router, experts, probs, tensors: dict) -> None:
    """The kernels' own limits (pemoe.ops has checked shapes and ids): device, dtypes, no autograd."""
    runs_on = "cpu" if INTERPRET else "cuda"
    if x.device.type != runs_on:
        raise NotImplementedError(
            f"{op} (triton, adapter bank) runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); "
            f"TRITON_INTERPRET={int(INTERPRET)} and x is on {x.device}"
        )
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op} (triton): {name} is on {t.device}, x on {x.device}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise NotImplementedError(f"{op} (triton) supports float16, bfloat16 and float32 activations, got {x.dtype}")
    for name, t in (("router", router), ("experts", experts), ("probs", probs)):
        if t is not None and t.dtype != torch.float32:
            raise NotImplementedError(f"{op} (triton): {name} must be float32 (adapter parameters), got {t.dtype}")
    if ids.dim() != 1 or ids.shape[0] != x.shape[0] or ids.dtype.is_floating_point:
        raise ValueError(f"{op} (triton): ids must be an integer tensor [T] = [{x.shape[0]}], got {list(ids.shape)}")
    refuse_grad(
        f"{op} (triton, adapter bank)", "use implementation='torch', or call under torch.no_grad()", x=x, **tensors
    )


def _plan(op: str, T: int, N: int, router, experts, probs, top_k, renormalize, itemsize: int) -> _Plan:
    A, G, E, D = experts.shape
    if op != "mov_ffn" and D not in mov_linear.SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(
            f"{op} (triton): head width D = N / G = {D} is not supported; supported D: {mov_linear.SUPPORTED_HEAD_DIMS}"
        )
    if E > mov_linear.MAX_EXPERTS:
        raise NotImplementedError(f"{op} (triton): at most {mov_linear.MAX_EXPERTS} experts are supported, got E = {E}")
    if G * D != N:
        raise ValueError(f"{op} (triton): experts [A, G, E, D] = {list(experts.shape)} needs width G·D, got {N}")
    mode = _routing_mode(router, probs)
    if mode == ROUTING_NONE and E != 1:
        raise ValueError(f"{op} (triton): router is required when E > 1 (E = {E})")
    if mode == ROUTING_TOKEN and tuple(router.shape) != (A, D, E):
        raise ValueError(f"{op} (triton): router must have shape [A, D, E] = [{A}, {D}, {E}], got {list(router.shape)}")
    if mode == ROUTING_SENTENCE and tuple(probs.shape) != (T, E):
        raise ValueError(f"{op} (triton): probs must have shape [T, E] = [{T}, {E}], got {list(probs.shape)}")
    # top_k = E keeps every expert: the plain softmax (renormalising by Σp = 1 changes nothing)
    k = 0 if (top_k is None or top_k == E or mode != ROUTING_TOKEN) else int(top_k)
    return _Plan(
        T=T, A=A, G=G, E=E, D=D, routing=mode, top_k=k, renormalize=bool(renormalize and k),
        block_e=max(16, triton.next_power_of_2(E)), m_bucket=max(16, triton.next_power_of_2(T)),
        main_precision="ieee" if itemsize == 4 else "tf32",
    )  # fmt: skip


def up_f_chunk(T: int, F: int, E: int, dtype: torch.dtype) -> int:
    """F_CHUNK of the FFN's up kernel: the columns of F each program owns, so the logit partials have
    cdiv(F, F_CHUNK) slots whatever tile autotune picks. The plan of :mod:`.mov_ffn`'s up kernel
    (:func:`.mov_ffn.f_chunk`: a multiple of every BLOCK_F of :data:`UP_CONFIGS`, enough chunks for several waves
    of programs with the row tiles of the largest BLOCK_M, the partials capped near 1/8 of a [T, F] activation's
    bytes)."""
    programs = triton.cdiv(T, max(c.kwargs["BLOCK_M"] for c in UP_CONFIGS))
    return f_chunk(F, E, dtype.itemsize, UP_CONFIGS, programs)


def sort_by_adapter(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids in sorted order as int32, the token of each sorted position as int64): a stable argsort on the
    device (no host sync), so row tiles name few adapters."""
    rows = torch.argsort(ids, stable=True)
    return ids.index_select(0, rows).to(torch.int32).contiguous(), rows.contiguous()


def _launch(kernel, grid, args: list, constexprs: dict, config: dict | None):
    """Launches through the autotuner, or with an explicit tile configuration (tests, benchmarks)."""
    if config is None:
        kernel[grid](*args, **constexprs)
    else:
        blocks = {k: v for k, v in config.items() if k in kernel.fn.arg_names}
        launch = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
        kernel.fn[grid](*args, **constexprs, **blocks, **launch)


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def _mov_launch(op, x2d, weight, bias, ids, router, experts, probs, top_k, renormalize, config):
    linear = weight is not None
    _check(
        op,
        x2d,
        ids,
        router,
        experts,
        probs,
        dict(weight=weight, bias=bias, router=router, experts=experts, probs=probs),
    )
    T = x2d.shape[0]
    N = weight.shape[0] if linear else x2d.shape[1]
    K = x2d.shape[1] if linear else N
    pl = _plan(op, T, N, router, experts, probs, top_k, renormalize, x2d.element_size())
    if linear and (weight.dtype != x2d.dtype or (bias is not None and bias.dtype != x2d.dtype)):
        raise TypeError(f"{op} (triton): x, weight and bias must share one dtype")
    bias, router, experts, probs = _contiguous(bias, router, experts, probs)
    y = torch.empty((T, N), dtype=x2d.dtype, device=x2d.device)
    if T == 0:
        return y
    sorted_ids, rows = sort_by_adapter(ids)
    w = weight if linear else x2d  # an unused pointer argument when there is no GEMM
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    args = [
        x2d, w, bias, router, experts, probs, sorted_ids, rows,
        y,
        T, N, K, pl.G, pl.E, pl.A, pl.m_bucket,
        x2d.stride(0), x2d.stride(1), w.stride(0), w.stride(1),
    ]  # fmt: skip
    constexprs = dict(
        LINEAR=linear, HAS_BIAS=bias is not None, ROUTING=pl.routing, TOP_K=pl.top_k, RENORMALIZE=pl.renormalize,
        MAIN_PRECISION=pl.main_precision, EPILOGUE_PRECISION=pl.epilogue_precision,
        HEAD_DIM=pl.D, BLOCK_E=pl.block_e,
    )  # fmt: skip
    with launch_device(x2d.device):
        _launch(mov_banked_kernel, grid, args, constexprs, config)
    return y


# ------------------------------------------------------------------------------------------
# Launchers (forward only)
# ------------------------------------------------------------------------------------------


def mov(
    h2d: torch.Tensor,
    ids: torch.Tensor,
    router: torch.Tensor | None,
    experts: torch.Tensor,
    probs: torch.Tensor | None,
    top_k: int | None,
    renormalize: bool,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """y [T, N] = h2d ⊙ s with s from adapter ids[t]'s router [A, D, E] (None: (IA)3) and experts [A, G, E, D]
    (float32), or from probs [T, E] (sentence routing); ids [T] integer, -1 leaves the row unchanged.
    ``config`` (tests) forces one tile configuration of :data:`MOV_CONFIGS`' form."""
    return _mov_launch("mov", h2d, None, None, ids, router, experts, probs, top_k, renormalize, config)


def mov_linear_banked(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    router: torch.Tensor | None,
    experts: torch.Tensor,
    probs: torch.Tensor | None,
    top_k: int | None,
    renormalize: bool,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """y [T, N] = mov(x2d [T, K] · weight [N, K]ᵀ + bias) with token t's adapter ids[t] (see :func:`mov`), in
    one kernel: the MoV scaling is the GEMM's epilogue. x2d and weight may be strided."""
    return _mov_launch("mov_linear", x2d, weight, bias, ids, router, experts, probs, top_k, renormalize, config)


def mov_ffn_banked(
    x2d: torch.Tensor,
    wi_0: torch.Tensor,
    wi_1: torch.Tensor | None,
    wo: torch.Tensor,
    ids: torch.Tensor,
    router: torch.Tensor | None,
    experts: torch.Tensor,
    probs: torch.Tensor | None,
    activation: str,
    top_k: int | None,
    renormalize: bool,
    *,
    up_config: dict | None = None,
    scale_config: dict | None = None,
) -> torch.Tensor:
    """y [T, M] = (mov(act(x wi_0ᵀ)) [⊙ x wi_1ᵀ]) woᵀ with token t's adapter ids[t]: router [A, F, E] (None:
    (IA)3), experts [A, 1, E, F] float32, probs [T, E] (sentence routing). Two kernels (the up GEMM with u and
    the logit partials, the scaling of u), then ``F.linear(u, wo)``."""
    op = "mov_ffn"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op} (triton): activation must be one of {ACTIVATIONS}, got {activation!r}")
    tensors = dict(wi_0=wi_0, wi_1=wi_1, wo=wo, router=router, experts=experts, probs=probs)
    _check(op, x2d, ids, router, experts, probs, tensors)
    if any(t is not None and t.dtype != x2d.dtype for t in (wi_0, wi_1, wo)):
        raise TypeError(f"{op} (triton): x, wi_0, wi_1 and wo must share one dtype")
    T, M = x2d.shape
    F = wi_0.shape[0]
    pl = _plan(op, T, F, router, experts, probs, top_k, renormalize, x2d.element_size())
    router, experts, probs = _contiguous(router, experts, probs)
    u = torch.empty((T, F), dtype=x2d.dtype, device=x2d.device)
    if T == 0:
        return torch.nn.functional.linear(u, wo)
    sorted_ids, rows = sort_by_adapter(ids)
    route = pl.routing == ROUTING_TOKEN
    t_bucket = pl.m_bucket
    # one logit partial slot per F chunk (the plan's, whatever tile autotune picks); the scaling sums them all
    chunk = up_f_chunk(T, F, pl.E, x2d.dtype)
    slots = triton.cdiv(F, chunk)
    logits_part = torch.empty((slots, T, pl.E), dtype=torch.float32, device=x2d.device) if route else None
    w1 = wi_1 if wi_1 is not None else wi_0
    with launch_device(x2d.device):
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * slots,)  # noqa: E731
        args = [
            x2d, wi_0, w1, router, sorted_ids, rows,
            u, logits_part,
            T, M, F, pl.E, pl.A, t_bucket, chunk,
            x2d.stride(0), x2d.stride(1), wi_0.stride(0), wi_0.stride(1), w1.stride(0), w1.stride(1), T * pl.E,
        ]  # fmt: skip
        constexprs = dict(
            ACTIVATION=activation, GATED=wi_1 is not None, ROUTE_LOGITS=route,
            MAIN_PRECISION=pl.main_precision, EPILOGUE_PRECISION=pl.epilogue_precision, BLOCK_E=pl.block_e,
        )  # fmt: skip
        _launch(mov_ffn_banked_up_kernel, grid, args, constexprs, up_config)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(F, meta["BLOCK_F"]),)  # noqa: E731
        args = [logits_part, probs, experts, sorted_ids, rows, u, T, M, F, pl.E, pl.A, t_bucket, slots, T * pl.E]
        constexprs = dict(
            ROUTING=pl.routing, TOP_K=pl.top_k, RENORMALIZE=pl.renormalize,
            EPILOGUE_PRECISION=pl.epilogue_precision, BLOCK_E=pl.block_e,
        )  # fmt: skip
        _launch(mov_ffn_banked_scale_kernel, grid, args, constexprs, scale_config)
    return torch.nn.functional.linear(u, wo)


__all__ = ["mov", "mov_linear_banked", "mov_ffn_banked", "sort_by_adapter"]
