"""Fused MoV T5 feed-forward block (SPEC §3 item 2): two forward kernels, two backward kernels.

Shapes: x [T, M]; wi_0, wi_1 [F, M] (frozen, torch Linear layout); wo [M, F] (frozen);
router [F, E] float32 (None when E = 1, (IA)3); experts [1, E, F] float32; probs [T, E] float32
(sentence routing: per-token probabilities computed outside, gradient flows back to them).

Forward math (gated = T5 v1.1, wi_1 given; T5 v1.0 drops the ``⊙ g`` factor):
    h0 = x·wi_0ᵀ, a = act(h0), g = x·wi_1ᵀ                 [T, F]  (act: gelu_new | gelu | relu | silu)
    logits = a32·router; p = router_probs(logits)          [T, E]  float32 (top-k / renormalise)
    s = p·experts[0]                                        [T, F]  the merged scaling (never stored)
    u = a ⊙ g (a for v1.0); y = (u ⊙ s)·woᵀ                [T, M]  x's dtype
Kernels:
  (a) ``_ffn_up_kernel``: dual GEMM over [BLOCK_M, BLOCK_F] tiles; epilogue: act, writes u, and
      the tile's share of the router logits a_tile·router[f-slice] (tl.dot) into a split buffer
      ``logits_part [NUM_F_TILES, T, E]`` float32 — no atomics: every slot is written by one
      program, so the result is bitwise deterministic and autotune re-runs are idempotent.
  (b) ``_ffn_down_kernel``: y = (u ⊙ s)·woᵀ. Prologue, once per row block: sum the logit
      partials in a fixed order, softmax/top-k (``routing.router_probs``), keep p in registers
      (and write p_soft [T, E] float32 from the first column block when backward needs it);
      per K-slice of F: s = p·experts[:, slice] (tl.dot) scales the A tile before the GEMM.
Backward (base weights frozen; dy [T, M]):
    dz = dy·wo; ds = dz ⊙ u; du = dz ⊙ s
    d experts = pᵀ·ds;  dp = ds·experts[0]ᵀ;  dlogits = router_probs_backward(dp, p_soft)
    da = du ⊙ g + dlogits·routerᵀ (du + ... for v1.0); dg = du ⊙ a; dh0 = da ⊙ act'(h0)
    d router = a32ᵀ·dlogits;  dx = dh0·wi_0 + dg·wi_1;  d probs = dp (sentence routing)
  (c) ``_ffn_down_backward_kernel``: the dz GEMM (K = M); epilogue recomputes s from p, writes
      du, and the split partials of dp [NUM_F_TILES, T, E] and d experts [NUM_M_TILES, E, F].
  (r) ``_router_backward_kernel``: sums the dp partials, applies the softmax/top-k backward
      (``routing.router_probs_backward``) -> dlogits [T, E] (or d probs for sentence routing).
  (d) ``_ffn_up_backward_kernel``: recomputes h0, g with the dual GEMM of (a) (cheaper in memory
      than keeping two [T, F] tensors alive); epilogue forms dh0, dg and the split partials of
      d router [NUM_M_TILES, F, E].
  dx = dh0·wi_0 + dg·wi_1 are two plain GEMMs (torch.matmul: the vendor GEMM is the right tool).
Saved for backward: u [T, F] (the intermediate (a) writes anyway; a plain frozen FFN's autograd
keeps h0, a and g) and p_soft [T, E] float32. s is recomputed from p (rank-E, cheap), h0 and g
by the dual GEMM, because the router gradient needs a full pass over F before da exists.

Numerics: every accumulation is float32; element-wise math in float32. GEMM operands are in the
activation dtype; the router dots (logits, dp, d experts, d router, dlogits·routerᵀ) take float32
operands with ``input_precision="tf32x3"`` (16-bit activations; ~float32 accuracy at 3 tf32 MMAs)
or "ieee" (float32 activations, where every dot is "ieee" to match torch's float32 matmul). The
merge s = p·experts runs in the activation dtype with float32 accumulation (as the "torch"
implementation does): s is rounded once, to the precision u ⊙ s is rounded to anyway.

Costs beyond a plain FFN: (a) one [BLOCK_M, BLOCK_F]×[BLOCK_F, BLOCK_E] tf32x3 dot per tile
(~BLOCK_E·6 / (2·M) of its MMA work: ~5 % at M = 1024); (b) the merge dot per K step,
BLOCK_E / BLOCK_N of its MMA work (12.5 % for E ≤ 16 at BLOCK_N = 128), recomputed by each of
the M / BLOCK_N column blocks; bytes: see :func:`.mov_ffn_analysis.hbm_traffic`. The interpreter cannot time, so
the defaults (first config of each list) are chosen for the AOT register/spill/smem report, not
measured; on a GPU autotune benchmarks every config that survives pruning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pemoe.kernels.triton import routing, tiles
from pemoe.kernels.triton.autograd import absent, launch_device
from pemoe.kernels.triton.interpreter import INTERPRET, do_bench

ACTIVATIONS = ("gelu_new", "gelu", "relu", "silu")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Routing modes (tl.constexpr strings): no router ((IA)3, p ≡ 1), self-routing (logits from a), given probs.
ROUTE_NONE, ROUTE_SELF, ROUTE_GIVEN = "none", "self", "given"


# ------------------------------------------------------------------------------------------
# Element-wise helpers (float32 in, float32 out)
# ------------------------------------------------------------------------------------------


@triton.jit
def _tanh(z):
    # tanh(z) = 1 - 2 / (1 + e^{2z}); |z| > 20 is ±1 in float32, so clamp e^{2z} away from overflow
    return 1.0 - 2.0 / (1.0 + tl.exp(2.0 * tl.minimum(z, 20.0)))


@triton.jit
def _activation(h, ACTIVATION: tl.constexpr, WITH_GRAD: tl.constexpr):
    """(act(h), act'(h)) for float32 h; act'(h) is 0 (unused) unless WITH_GRAD."""
    if ACTIVATION == "relu":
        a = tl.maximum(h, 0.0)
        grad = tl.where(h > 0.0, 1.0, 0.0)
    elif ACTIVATION == "gelu":  # erf form, torch.nn.functional.gelu
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        a = h * cdf
        grad = cdf
        if WITH_GRAD:
            grad = cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    elif ACTIVATION == "silu":  # h·σ(h) (Llama); e^{-h} → inf for h < -88 gives σ = 0, a = -0, act' = 0
        sig = 1.0 / (1.0 + tl.exp(-h))
        a = h * sig
        grad = sig
        if WITH_GRAD:
            grad = sig * (1.0 + h * (1.0 - sig))
    else:  # "gelu_new": tanh approximation (T5 v1.1)
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        a = 0.5 * h * (1.0 + t)
        if WITH_GRAD:
            grad = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)
        else:
            grad = t
    return a, grad


@triton.jit
def _dual_gemm(
    x_ptr, w0_ptr, w1_ptr,  # x [T, K]; w0, w1 [F, K]
    offs_m, offs_f, T, F, K,
    stride_xt, stride_xk, stride_w0f, stride_w0k, stride_w1f, stride_w1k,
    GATED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """(x·w0ᵀ, x·w1ᵀ) float32 [BLOCK_M, BLOCK_F] tiles (the second is zeros unless GATED); x is loaded once."""
    acc0 = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    row_ok = offs_m[:, None] < T
    col_ok = offs_f[None, :] < F
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xt + offs_k[None, :] * stride_xk,
            mask=row_ok & (offs_k[None, :] < K),
            other=0.0,
        )
        w_mask = (offs_k[:, None] < K) & col_ok
        w0 = tl.load(w0_ptr + offs_k[:, None] * stride_w0k + offs_f[None, :] * stride_w0f, mask=w_mask, other=0.0)
        acc0 = tl.dot(x, w0, acc0, input_precision=DOT_PRECISION)
        if GATED:
            w1 = tl.load(w1_ptr + offs_k[:, None] * stride_w1k + offs_f[None, :] * stride_w1f, mask=w_mask, other=0.0)
            acc1 = tl.dot(x, w1, acc1, input_precision=DOT_PRECISION)
    return acc0, acc1


@triton.jit
def _load_probs(p_ptr, offs_m, offs_e, T, E, stride_pt, stride_pe):
    """[BLOCK_M, BLOCK_E] float32 probabilities; padded rows read as 1 on the E real columns (so a
    renormalising top-k never divides 0 by 0 there), padded columns as 0."""
    row_ok = offs_m[:, None] < T
    col_ok = offs_e[None, :] < E
    p = tl.load(p_ptr + offs_m[:, None] * stride_pt + offs_e[None, :] * stride_pe, mask=row_ok & col_ok, other=0.0)
    return tl.where(row_ok, p, tl.where(col_ok, 1.0, 0.0))


@triton.jit
def _routing_weights(
    p_ptr, offs_m, offs_e, T, E, stride_pt, stride_pe,
    ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
):  # fmt: skip
    """p [BLOCK_M, BLOCK_E] float32 from saved p_soft (self-routing: top-k recomputed) or given probs;
    padded rows and columns are 0 (they feed the d experts dot)."""
    p = _load_probs(p_ptr, offs_m, offs_e, T, E, stride_pt, stride_pe)
    if ROUTING == "self":
        p = routing.select(p, offs_e, E, TOP_K, RENORMALIZE)
    return tl.where(offs_m[:, None] < T, p, 0.0)


@triton.jit
def _merge(p, experts_ptr, offs_e, offs_f, E, F, stride_ee, stride_ef, dtype, ROUTING: tl.constexpr):
    """s = p·experts[0][:, f-slice] as float32 [BLOCK_M, BLOCK_F] (a row [1, BLOCK_F] when ROUTING == "none").

    The dot runs in the activation ``dtype`` (float32 accumulation); "ieee" when that is float32.
    """
    if ROUTING == "none":
        s = tl.load(experts_ptr + offs_f * stride_ef, mask=offs_f < F, other=0.0)[None, :]
    else:
        mask = (offs_e[:, None] < E) & (offs_f[None, :] < F)
        ex = tl.load(experts_ptr + offs_e[:, None] * stride_ee + offs_f[None, :] * stride_ef, mask=mask, other=0.0)
        s = tl.dot(p.to(dtype), ex.to(dtype), input_precision="ieee" if dtype == tl.float32 else "tf32")
    return s


# ------------------------------------------------------------------------------------------
# Tile configurations (data). Order matters: the interpreter runs the first one that survives
# pruning, and a GPU benchmarks all survivors. BLOCK_* are ≥ 16 everywhere (tl.dot minimum).
# ------------------------------------------------------------------------------------------


#: Row tiles that sweep the column tiles together (grouped program order, :func:`.tiles.grouped_ids`).
GROUP_M = 8


def _cfg(num_warps: int, num_stages: int, grouped: bool = True, **blocks: int) -> triton.Config:
    group = {"GROUP_M": GROUP_M} if grouped else {}
    return triton.Config({**blocks, **group}, num_warps=num_warps, num_stages=num_stages)


#: Defaults (first of each list) are the largest tiles measured to compile without spilling
#: (registers <= 255 and a zero ptxas stack frame) on sm_80 and sm_90 for 16-bit operands; the
#: bigger tiles stay in the lists for autotune, several of them spill (see the AOT report).
#: Bytes of one K-row of an operand tile: BLOCK_K = 64 for 16-bit operands, 32 for float32, so the
#: pipelined shared-memory buffers of a config fit sm_80's 163 KiB whatever the dtype.
K_ROW_BYTES = 128


def _for_every_dtype(configs16: list[triton.Config], fp32_default: triton.Config) -> list[triton.Config]:
    """The 16-bit configs (BLOCK_K = 64), then the float32 default (BLOCK_K = 32; float32 dots run
    without tensor cores, so their accumulators need smaller tiles: chosen spill-free on sm_80/sm_90
    by the AOT reports), then the 16-bit tiles with BLOCK_K = 32 for float32 autotuning."""
    halved = [
        triton.Config({**c.kwargs, "BLOCK_K": c.kwargs["BLOCK_K"] // 2}, num_warps=c.num_warps, num_stages=c.num_stages)
        for c in configs16
    ]
    return configs16 + [fp32_default] + halved


#: (a) and (d): dual GEMM tiles [BLOCK_M, BLOCK_F], K = M.
UP_CONFIGS = _for_every_dtype(
    [
        _cfg(4, 4, BLOCK_M=64, BLOCK_F=64, BLOCK_K=64),  # default: no spill (ptxas stack 0) for E <= 32
        _cfg(8, 3, BLOCK_M=128, BLOCK_F=128, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=128, BLOCK_F=64, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=64, BLOCK_F=128, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=16, BLOCK_F=128, BLOCK_K=64),  # decode-sized T
    ],
    _cfg(4, 3, BLOCK_M=64, BLOCK_F=32, BLOCK_K=32),
)
#: (b): output tiles [BLOCK_M, BLOCK_N] over M, K = F.
DOWN_CONFIGS = _for_every_dtype(
    [
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),  # default
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64),
    ],
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
)
#: (c): dz tiles [BLOCK_M, BLOCK_F], K = M.
DOWN_BACKWARD_CONFIGS = _for_every_dtype(
    [
        _cfg(8, 3, BLOCK_M=64, BLOCK_F=64, BLOCK_K=64),  # default: no spill for E <= 32
        _cfg(8, 3, BLOCK_M=128, BLOCK_F=128, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=128, BLOCK_F=64, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=64, BLOCK_F=128, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=64, BLOCK_F=64, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=16, BLOCK_F=128, BLOCK_K=64),
    ],
    _cfg(8, 3, BLOCK_M=64, BLOCK_F=32, BLOCK_K=32),
)
#: (d): as (a), but the epilogue also holds du, dlogits and act'(h0): a narrower default tile.
UP_BACKWARD_CONFIGS = _for_every_dtype(
    [
        _cfg(4, 3, False, BLOCK_M=64, BLOCK_F=32, BLOCK_K=64),  # default: no spill (ptxas stack 0) for E <= 32
        _cfg(8, 3, False, BLOCK_M=128, BLOCK_F=64, BLOCK_K=64),
        _cfg(4, 4, False, BLOCK_M=64, BLOCK_F=128, BLOCK_K=64),
        _cfg(4, 4, False, BLOCK_M=64, BLOCK_F=64, BLOCK_K=64),
        _cfg(4, 4, False, BLOCK_M=16, BLOCK_F=128, BLOCK_K=64),
    ],
    _cfg(8, 3, False, BLOCK_M=64, BLOCK_F=32, BLOCK_K=32),
)
#: (r): rows per program of the [T, E] router backward.
ROUTER_BACKWARD_CONFIG = dict(BLOCK_M=64, num_warps=4)


def _fits(block: int, size: int) -> bool:
    """A block no larger than the dimension rounded up to a power of two (≥ 16)."""
    return block <= max(16, triton.next_power_of_2(size))


def _prune(dims: dict[str, str], operand: str):
    """early_config_prune: configs whose K-rows hold K_ROW_BYTES of the ``operand`` tensor's dtype and
    whose blocks fit the launch's dims (``BLOCK_X -> size arg``); the smallest such tile if none fits.
    Every block is ≥ 16, so tl.dot's minimum shapes hold for any T, M, F (and BLOCK_E ≥ 16 for any E)."""

    def prune(configs, named_args, **kwargs):
        sizes = {**named_args, **kwargs}
        itemsize = sizes[operand].element_size()
        legal = [c for c in configs if c.kwargs["BLOCK_K"] * itemsize == K_ROW_BYTES]
        kept = [c for c in legal if all(_fits(c.kwargs[b], sizes[d]) for b, d in dims.items())]
        return kept or [min(legal, key=lambda c: math.prod(c.kwargs[b] for b in dims))]

    return prune


#: Autotuning key: a power-of-two bucket of T (T_BUCKET), not T — a new batch length within the bucket reuses
#: the tuned configuration instead of stalling to re-tune (and to sync with the host) on every distinct T.
_TUNING_KEY = ["T_BUCKET", "M", "F", "E"]


def t_bucket(T: int) -> int:
    """The autotuning bucket of T tokens: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(T))


def _autotune(configs, key, dims, operand):
    return triton.autotune(
        configs=configs,
        key=key,
        prune_configs_by={"early_config_prune": _prune(dims, operand)},
        do_bench=do_bench,
    )


# ------------------------------------------------------------------------------------------
# (a) dual GEMM + activation + router-logit partials
# ------------------------------------------------------------------------------------------


@_autotune(UP_CONFIGS, _TUNING_KEY, {"BLOCK_M": "T", "BLOCK_F": "F", "BLOCK_K": "M"}, "x_ptr")
@triton.jit
def _ffn_up_kernel(
    x_ptr, wi_0_ptr, wi_1_ptr, router_ptr,  # inputs: x [T, M], wi_0/wi_1 [F, M], router [F, E]
    inter_ptr, logits_part_ptr,  # outputs: u [T, F], logit partials [NUM_F_TILES, T, E] float32
    T, M, F, E, T_BUCKET,
    stride_xt, stride_xm, stride_w0f, stride_w0m, stride_w1f, stride_w1m, stride_rf, stride_re,
    stride_ut, stride_uf, stride_lj, stride_lt,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, ROUTE_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROUTER_PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """u = act(x·wi_0ᵀ) [⊙ x·wi_1ᵀ] and logits_part[pid_f] = act(x·wi_0ᵀ)[:, f-slice]·router[f-slice]."""
    pid_m, pid_f = tiles.grouped_ids(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(F, BLOCK_F), GROUP_M)
    pid_m, pid_f = pid_m.to(tl.int64), pid_f.to(tl.int64)  # 64-bit: row and partial-buffer offsets pass 2^31
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    # ---- main loop: h0 = x·wi_0ᵀ, g = x·wi_1ᵀ
    h0, g = _dual_gemm(
        x_ptr, wi_0_ptr, wi_1_ptr, offs_m, offs_f, T, F, M,
        stride_xt, stride_xm, stride_w0f, stride_w0m, stride_w1f, stride_w1m,
        GATED, DOT_PRECISION, BLOCK_M, BLOCK_F, BLOCK_K,
    )  # fmt: skip
    # ---- epilogue: activation, intermediate, router-logit partial (padded columns: act(0) = 0)
    a, _ = _activation(h0, ACTIVATION, False)
    u = a * g if GATED else a
    tile_mask = (offs_m[:, None] < T) & (offs_f[None, :] < F)
    tl.store(
        inter_ptr + offs_m[:, None] * stride_ut + offs_f[None, :] * stride_uf,
        u.to(inter_ptr.dtype.element_ty),
        mask=tile_mask,
    )
    if ROUTE_LOGITS:
        offs_e = tl.arange(0, BLOCK_E)
        r_mask = (offs_f[:, None] < F) & (offs_e[None, :] < E)
        router = tl.load(router_ptr + offs_f[:, None] * stride_rf + offs_e[None, :] * stride_re, mask=r_mask, other=0.0)
        logits = tl.dot(a, router, input_precision=ROUTER_PRECISION)  # [BLOCK_M, BLOCK_E]
        tl.store(
            logits_part_ptr + pid_f * stride_lj + offs_m[:, None] * stride_lt + offs_e[None, :],
            logits,
            mask=(offs_m[:, None] < T) & (offs_e[None, :] < E),
        )


# ------------------------------------------------------------------------------------------
# (b) wo GEMM with the softmax + expert-merge prologue
# ------------------------------------------------------------------------------------------


@_autotune(DOWN_CONFIGS, _TUNING_KEY, {"BLOCK_M": "T", "BLOCK_N": "M", "BLOCK_K": "F"}, "inter_ptr")
@triton.jit
def _ffn_down_kernel(
    inter_ptr, wo_ptr, experts_ptr, logits_part_ptr, probs_ptr,  # inputs: u [T, F], wo [M, F], experts [E, F]
    y_ptr, p_soft_ptr,  # outputs: y [T, M], p_soft [T, E] float32 (only when SAVE_P_SOFT)
    T, M, F, E, T_BUCKET, NUM_F_TILES,
    stride_ut, stride_uf, stride_wom, stride_wof, stride_ee, stride_ef, stride_lj, stride_lt,
    stride_pt, stride_pe, stride_yt, stride_ym,
    ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, SAVE_P_SOFT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """y[rows, cols] = Σ_f u[rows, f]·s[rows, f]·wo[cols, f], s = p·experts from the logit partials."""
    pid_m, pid_n = tiles.grouped_ids(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(M, BLOCK_N), GROUP_M)
    pid_m = pid_m.to(tl.int64)  # 64-bit: row and partial-buffer offsets pass 2^31 (columns: < M, 32-bit)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    row_e_mask = (offs_m[:, None] < T) & (offs_e[None, :] < E)
    # ---- prologue, once per row block: p [BLOCK_M, BLOCK_E] float32
    if ROUTING == "self":
        logits = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
        part_ptr = logits_part_ptr
        for _ in range(0, NUM_F_TILES):  # fixed order: deterministic; the pointer advances in 64 bits
            logits += tl.load(part_ptr + offs_m[:, None] * stride_lt + offs_e[None, :], mask=row_e_mask, other=0.0)
            part_ptr += stride_lj
        p, p_soft = routing.router_probs(logits, offs_e, E, TOP_K, RENORMALIZE)
        if SAVE_P_SOFT:
            if pid_n == 0:
                tl.store(
                    p_soft_ptr + offs_m[:, None] * stride_pt + offs_e[None, :] * stride_pe, p_soft, mask=row_e_mask
                )
    elif ROUTING == "given":
        p = tl.load(probs_ptr + offs_m[:, None] * stride_pt + offs_e[None, :] * stride_pe, mask=row_e_mask, other=0.0)
    else:
        p = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)  # unused: s is experts[0, 0, :]
    # ---- main loop over F: A tile = u ⊙ s, B tile = woᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        u = tl.load(
            inter_ptr + offs_m[:, None] * stride_ut + offs_k[None, :] * stride_uf,
            mask=(offs_m[:, None] < T) & (offs_k[None, :] < F),
            other=0.0,
        )
        s = _merge(p, experts_ptr, offs_e, offs_k, E, F, stride_ee, stride_ef, u.dtype, ROUTING)
        a = (u.to(tl.float32) * s).to(u.dtype)
        wo = tl.load(
            wo_ptr + offs_k[:, None] * stride_wof + offs_n[None, :] * stride_wom,
            mask=(offs_k[:, None] < F) & (offs_n[None, :] < M),
            other=0.0,
        )
        acc = tl.dot(a, wo, acc, input_precision=DOT_PRECISION)
    # ---- epilogue
    tl.store(
        y_ptr + offs_m[:, None] * stride_yt + offs_n[None, :] * stride_ym,
        acc.to(y_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < T) & (offs_n[None, :] < M),
    )


# ------------------------------------------------------------------------------------------
# (c) backward: dz = dy·wo with the MoV-merge epilogue
# ------------------------------------------------------------------------------------------


@_autotune(DOWN_BACKWARD_CONFIGS, _TUNING_KEY, {"BLOCK_M": "T", "BLOCK_F": "F", "BLOCK_K": "M"}, "dy_ptr")
@triton.jit
def _ffn_down_backward_kernel(
    dy_ptr, wo_ptr, inter_ptr, experts_ptr, p_ptr,  # inputs: dy [T, M], wo [M, F], u [T, F], experts [E, F], p [T, E]
    du_ptr, dp_part_ptr, dexperts_part_ptr,  # outputs: du [T, F], dp [NUM_F_TILES, T, E], d experts [NUM_M_TILES, E, F]
    T, M, F, E, T_BUCKET,
    stride_dyt, stride_dym, stride_wom, stride_wof, stride_ut, stride_uf, stride_ee, stride_ef,
    stride_pt, stride_pe, stride_dut, stride_duf, stride_dpj, stride_dpt, stride_dej, stride_dee,
    ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    NEED_DU: tl.constexpr, NEED_DP: tl.constexpr, NEED_DEXPERTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROUTER_PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dz = dy·wo[:, f-slice]; du = dz ⊙ s; partials of dp = (dz ⊙ u)·expertsᵀ and d experts = pᵀ·(dz ⊙ u)."""
    pid_m, pid_f = tiles.grouped_ids(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(F, BLOCK_F), GROUP_M)
    pid_m, pid_f = pid_m.to(tl.int64), pid_f.to(tl.int64)  # 64-bit: row and partial-buffer offsets pass 2^31
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_m[:, None] < T
    col_ok = offs_f[None, :] < F
    # ---- main loop over M: dz = dy·wo
    dz = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dyt + offs_k[None, :] * stride_dym,
            mask=row_ok & (offs_k[None, :] < M),
            other=0.0,
        )
        wo = tl.load(
            wo_ptr + offs_k[:, None] * stride_wom + offs_f[None, :] * stride_wof,
            mask=(offs_k[:, None] < M) & col_ok,
            other=0.0,
        )
        dz = tl.dot(dy, wo, dz, input_precision=DOT_PRECISION)
    # ---- epilogue: merge recomputed from p, then the MoV gradients
    tile_mask = row_ok & col_ok
    u = tl.load(inter_ptr + offs_m[:, None] * stride_ut + offs_f[None, :] * stride_uf, mask=tile_mask, other=0.0).to(
        tl.float32
    )
    ds = dz * u
    if ROUTING == "none":
        p = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    else:
        p = _routing_weights(p_ptr, offs_m, offs_e, T, E, stride_pt, stride_pe, ROUTING, TOP_K, RENORMALIZE)
    if NEED_DU:
        s = _merge(p, experts_ptr, offs_e, offs_f, E, F, stride_ee, stride_ef, du_ptr.dtype.element_ty, ROUTING)
        tl.store(
            du_ptr + offs_m[:, None] * stride_dut + offs_f[None, :] * stride_duf,
            (dz * s).to(du_ptr.dtype.element_ty),
            mask=tile_mask,
        )
    if NEED_DP:
        e_mask = (offs_e[:, None] < E) & col_ok
        ex = tl.load(experts_ptr + offs_e[:, None] * stride_ee + offs_f[None, :] * stride_ef, mask=e_mask, other=0.0)
        dp = tl.dot(ds, tl.trans(ex), input_precision=ROUTER_PRECISION)  # [BLOCK_M, BLOCK_E]
        tl.store(
            dp_part_ptr + pid_f * stride_dpj + offs_m[:, None] * stride_dpt + offs_e[None, :],
            dp,
            mask=row_ok & (offs_e[None, :] < E),
        )
    if NEED_DEXPERTS:
        if ROUTING == "none":  # p ≡ 1: d experts[0, 0, f] = Σ_t ds
            tl.store(dexperts_part_ptr + pid_m * stride_dej + offs_f, tl.sum(ds, axis=0), mask=offs_f < F)
        else:
            dex = tl.dot(tl.trans(p), ds, input_precision=ROUTER_PRECISION)  # [BLOCK_E, BLOCK_F]
            tl.store(
                dexperts_part_ptr + pid_m * stride_dej + offs_e[:, None] * stride_dee + offs_f[None, :],
                dex,
                mask=(offs_e[:, None] < E) & col_ok,
            )


# ------------------------------------------------------------------------------------------
# (r) backward: dp partials -> dlogits (self-routing) or d probs (sentence routing)
# ------------------------------------------------------------------------------------------


@triton.jit
def _router_backward_kernel(
    dp_part_ptr, p_soft_ptr,  # inputs: dp partials [NUM_F_TILES, T, E], p_soft [T, E] (both float32, contiguous)
    out_ptr,  # output [T, E] float32: dlogits (SELF_ROUTED) or dp
    T, E, NUM_F_TILES, stride_dpj,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, SELF_ROUTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """dp = Σ_j dp_part[j] (fixed order); out = router_probs_backward(dp, p_soft) or dp."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # 64-bit row offsets
    offs_e = tl.arange(0, BLOCK_E)
    mask = (offs_m[:, None] < T) & (offs_e[None, :] < E)
    idx = offs_m[:, None] * E + offs_e[None, :]
    dp = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    part_ptr = dp_part_ptr
    for _ in range(0, NUM_F_TILES):  # the pointer advances in 64 bits: j·stride_dpj passes 2^31 at long T
        dp += tl.load(part_ptr + idx, mask=mask, other=0.0)
        part_ptr += stride_dpj
    if SELF_ROUTED:
        p_soft = _load_probs(p_soft_ptr, offs_m, offs_e, T, E, E, 1)
        dp = routing.router_probs_backward(dp, p_soft, offs_e, E, TOP_K, RENORMALIZE)
    tl.store(out_ptr + idx, dp, mask=mask)


# ------------------------------------------------------------------------------------------
# (d) backward: recompute h0, g; dh0, dg and the router-gradient partials
# ------------------------------------------------------------------------------------------


@_autotune(UP_BACKWARD_CONFIGS, _TUNING_KEY, {"BLOCK_M": "T", "BLOCK_F": "F", "BLOCK_K": "M"}, "x_ptr")
@triton.jit
def _ffn_up_backward_kernel(
    x_ptr, wi_0_ptr, wi_1_ptr, router_ptr, du_ptr, dlogits_ptr,  # inputs (router [F, E], du [T, F], dlogits [T, E])
    dh0_ptr, dg_ptr, drouter_part_ptr,  # outputs: dh0, dg [T, F]; d router partials [NUM_M_TILES, F, E] float32
    T, M, F, E, T_BUCKET,
    stride_xt, stride_xm, stride_w0f, stride_w0m, stride_w1f, stride_w1m, stride_rf, stride_re,
    stride_dut, stride_duf, stride_dht, stride_dhf, stride_dgt, stride_dgf, stride_drj, stride_drf,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, SELF_ROUTED: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DROUTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROUTER_PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dh0 = (du ⊙ g + dlogits·routerᵀ) ⊙ act'(h0), dg = du ⊙ a, d router partial = aᵀ·dlogits."""
    # a 2-D grid, rows fastest (not grouped: the grouped ids cost this register-bound kernel spills on sm_80 /
    # sm_90 at its defaults)
    pid_m = tl.program_id(0).to(tl.int64)  # 64-bit: row and partial-buffer offsets pass 2^31
    pid_f = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_m[:, None] < T
    col_ok = offs_f[None, :] < F
    tile_mask = row_ok & col_ok
    # ---- main loop: recompute h0 = x·wi_0ᵀ, g = x·wi_1ᵀ
    h0, g = _dual_gemm(
        x_ptr, wi_0_ptr, wi_1_ptr, offs_m, offs_f, T, F, M,
        stride_xt, stride_xm, stride_w0f, stride_w0m, stride_w1f, stride_w1m,
        GATED, DOT_PRECISION, BLOCK_M, BLOCK_F, BLOCK_K,
    )  # fmt: skip
    # ---- epilogue
    a, act_grad = _activation(h0, ACTIVATION, True)
    if SELF_ROUTED:
        dlogits = tl.load(
            dlogits_ptr + offs_m[:, None] * E + offs_e[None, :], mask=row_ok & (offs_e[None, :] < E), other=0.0
        )
        if NEED_DROUTER:
            drouter = tl.dot(tl.trans(a), dlogits, input_precision=ROUTER_PRECISION)  # [BLOCK_F, BLOCK_E]
            tl.store(
                drouter_part_ptr + pid_m * stride_drj + offs_f[:, None] * stride_drf + offs_e[None, :],
                drouter,
                mask=(offs_f[:, None] < F) & (offs_e[None, :] < E),
            )
    if NEED_DH:
        du = tl.load(
            du_ptr + offs_m[:, None] * stride_dut + offs_f[None, :] * stride_duf, mask=tile_mask, other=0.0
        ).to(tl.float32)
        da = du * g if GATED else du
        if SELF_ROUTED:
            r_mask = (offs_f[:, None] < F) & (offs_e[None, :] < E)
            router = tl.load(
                router_ptr + offs_f[:, None] * stride_rf + offs_e[None, :] * stride_re, mask=r_mask, other=0.0
            )
            da += tl.dot(dlogits, tl.trans(router), input_precision=ROUTER_PRECISION)
        tl.store(
            dh0_ptr + offs_m[:, None] * stride_dht + offs_f[None, :] * stride_dhf,
            (da * act_grad).to(dh0_ptr.dtype.element_ty),
            mask=tile_mask,
        )
        if GATED:
            tl.store(
                dg_ptr + offs_m[:, None] * stride_dgt + offs_f[None, :] * stride_dgf,
                (du * a).to(dg_ptr.dtype.element_ty),
                mask=tile_mask,
            )


# ------------------------------------------------------------------------------------------
# Launchers: validate, allocate, grid, launch
# ------------------------------------------------------------------------------------------


def _check_inputs(
    x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, *, check_device: bool = True
) -> tuple[int, int, int, int]:
    """Clear errors for what these kernels do not support; returns (T, M, F, E). ``check_device=False``:
    shapes and dtypes only (pemoe.jax.triton plans JAX launches with torch "meta" tensors)."""
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


def _routing_mode(router, probs) -> str:
    if probs is not None:
        return ROUTE_GIVEN
    return ROUTE_NONE if router is None else ROUTE_SELF


@dataclass(frozen=True)
class _Problem:
    """What the kernels specialise on (constexprs) besides the tile sizes."""

    dtype: torch.dtype
    gated: bool
    mode: str  # ROUTE_NONE | ROUTE_SELF | ROUTE_GIVEN
    activation: str
    num_experts: int
    top_k: int = 0  # 0: no top-k (also when top_k == E)
    renormalize: bool = False

    @staticmethod
    def of(x, wi_1, router, experts, probs, activation, top_k, renormalize) -> _Problem:
        num_experts = experts.shape[1]
        k = 0 if top_k is None or top_k == num_experts else int(top_k)
        return _Problem(
            x.dtype,
            wi_1 is not None,
            _routing_mode(router, probs),
            activation,
            num_experts,
            k,
            bool(renormalize) and k > 0,
        )

    @property
    def block_e(self) -> int:
        """E padded to a power of two, at least 16 (tl.dot's minimum M/N/K) — for every E, E = 1 included."""
        return max(16, triton.next_power_of_2(self.num_experts))

    @property
    def precisions(self) -> dict[str, str]:
        """GEMM and router-dot input precisions: "ieee" for float32 activations (torch's float32 matmul)."""
        if self.dtype == torch.float32:
            return dict(DOT_PRECISION="ieee", ROUTER_PRECISION="ieee")
        return dict(DOT_PRECISION="tf32", ROUTER_PRECISION="tf32x3")


def _num_tiles(size: int, configs, block: str) -> int:
    """Slots of a split buffer: enough for the smallest ``block`` autotune may pick."""
    return triton.cdiv(size, min(c.kwargs[block] for c in configs))


def _strides(t: torch.Tensor | None, n: int = 2) -> tuple[int, ...]:
    return tuple(t.stride()[:n]) if t is not None else (0,) * n


def _empty(shape, dtype, device, needed: bool = True) -> torch.Tensor:
    """A buffer, or a 1-element float32 placeholder for a pointer the kernel never touches."""
    return torch.empty(shape, dtype=dtype, device=device) if needed else torch.empty(1, device=device)


def _up_launch(x, wi_0, wi_1, router, prob: _Problem):
    """(args, constexprs) of (a); allocates u [T, F] and the logit partials."""
    (T, M), F, E = x.shape, wi_0.shape[0], prob.num_experts
    self_routed = prob.mode == ROUTE_SELF
    inter = torch.empty((T, F), dtype=x.dtype, device=x.device)
    logits_part = _empty((_num_tiles(F, _ffn_up_kernel.configs, "BLOCK_F"), T, E), torch.float32, x.device, self_routed)
    wi_1 = wi_1 if prob.gated else wi_0  # never read when not GATED
    router = router if self_routed else logits_part
    args = dict(
        x_ptr=x, wi_0_ptr=wi_0, wi_1_ptr=wi_1, router_ptr=router, inter_ptr=inter, logits_part_ptr=logits_part,
        T=T, M=M, F=F, E=E, T_BUCKET=t_bucket(T),
        stride_xt=x.stride(0), stride_xm=x.stride(1), stride_w0f=wi_0.stride(0), stride_w0m=wi_0.stride(1),
        stride_w1f=wi_1.stride(0), stride_w1m=wi_1.stride(1),
        stride_rf=router.stride(0) if self_routed else 0, stride_re=router.stride(1) if self_routed else 0,
        stride_ut=inter.stride(0), stride_uf=inter.stride(1),
        stride_lj=logits_part.stride(0) if self_routed else 0, stride_lt=logits_part.stride(1) if self_routed else 0,
    )  # fmt: skip
    cx = dict(ACTIVATION=prob.activation, GATED=prob.gated, ROUTE_LOGITS=self_routed, BLOCK_E=prob.block_e)
    return args, {**cx, **prob.precisions}


def _down_launch(inter, wo, experts, logits_part, probs, num_f_tiles: int, prob: _Problem, save_p_soft: bool):
    """(args, constexprs) of (b); allocates y [T, M] and p_soft [T, E] (when saved)."""
    (T, F), M, E = inter.shape, wo.shape[0], prob.num_experts
    save = save_p_soft and prob.mode == ROUTE_SELF
    y = torch.empty((T, M), dtype=inter.dtype, device=inter.device)
    p_soft = _empty((T, E), torch.float32, inter.device, save)
    p_io = probs if prob.mode == ROUTE_GIVEN else p_soft
    ex = experts[0]
    has_p = save or prob.mode == ROUTE_GIVEN
    args = dict(
        inter_ptr=inter, wo_ptr=wo, experts_ptr=ex, logits_part_ptr=logits_part, probs_ptr=p_io,
        y_ptr=y, p_soft_ptr=p_io,
        T=T, M=M, F=F, E=E, T_BUCKET=t_bucket(T), NUM_F_TILES=num_f_tiles,
        stride_ut=inter.stride(0), stride_uf=inter.stride(1), stride_wom=wo.stride(0), stride_wof=wo.stride(1),
        stride_ee=ex.stride(0), stride_ef=ex.stride(1),
        stride_lj=logits_part.stride(0) if prob.mode == ROUTE_SELF else 0,
        stride_lt=logits_part.stride(1) if prob.mode == ROUTE_SELF else 0,
        stride_pt=p_io.stride(0) if has_p else 0, stride_pe=p_io.stride(1) if has_p else 0,
        stride_yt=y.stride(0), stride_ym=y.stride(1),
    )  # fmt: skip
    cx = dict(
        ROUTING=prob.mode, TOP_K=prob.top_k, RENORMALIZE=prob.renormalize, SAVE_P_SOFT=save,
        DOT_PRECISION=prob.precisions["DOT_PRECISION"], BLOCK_E=prob.block_e,
    )  # fmt: skip
    return args, cx, (p_soft if save else None)


def _down_backward_launch(dy, wo, inter, experts, p, prob: _Problem, need_du, need_dp, need_dexperts):
    """(args, constexprs) of (c); allocates du [T, F] and the dp / d experts partials."""
    (T, F), M, E = inter.shape, wo.shape[0], prob.num_experts
    configs = _ffn_down_backward_kernel.configs
    du = _empty((T, F), inter.dtype, inter.device, need_du)
    dp_part = _empty((_num_tiles(F, configs, "BLOCK_F"), T, E), torch.float32, inter.device, need_dp)
    dex_part = _empty((_num_tiles(T, configs, "BLOCK_M"), E, F), torch.float32, inter.device, need_dexperts)
    has_p = prob.mode != ROUTE_NONE
    p = p if has_p else dp_part
    ex = experts[0]
    args = dict(
        dy_ptr=dy, wo_ptr=wo, inter_ptr=inter, experts_ptr=ex, p_ptr=p,
        du_ptr=du, dp_part_ptr=dp_part, dexperts_part_ptr=dex_part,
        T=T, M=M, F=F, E=E, T_BUCKET=t_bucket(T),
        stride_dyt=dy.stride(0), stride_dym=dy.stride(1), stride_wom=wo.stride(0), stride_wof=wo.stride(1),
        stride_ut=inter.stride(0), stride_uf=inter.stride(1), stride_ee=ex.stride(0), stride_ef=ex.stride(1),
        stride_pt=p.stride(0) if has_p else 0, stride_pe=p.stride(1) if has_p else 0,
        stride_dut=du.stride(0) if need_du else 0, stride_duf=du.stride(1) if need_du else 0,
        stride_dpj=dp_part.stride(0) if need_dp else 0, stride_dpt=dp_part.stride(1) if need_dp else 0,
        stride_dej=dex_part.stride(0) if need_dexperts else 0, stride_dee=dex_part.stride(1) if need_dexperts else 0,
    )  # fmt: skip
    cx = dict(
        ROUTING=prob.mode, TOP_K=prob.top_k, RENORMALIZE=prob.renormalize,
        NEED_DU=need_du, NEED_DP=need_dp, NEED_DEXPERTS=need_dexperts, BLOCK_E=prob.block_e,
    )  # fmt: skip
    return args, {**cx, **prob.precisions}


def _router_backward_launch(dp_part, p_soft, num_f_tiles: int, T: int, prob: _Problem):
    """(args, constexprs) of (r); allocates dlogits / d probs [T, E] float32."""
    E = prob.num_experts
    out = torch.empty((T, E), dtype=torch.float32, device=dp_part.device)
    self_routed = prob.mode == ROUTE_SELF
    args = dict(
        dp_part_ptr=dp_part, p_soft_ptr=p_soft if self_routed else out, out_ptr=out,
        T=T, E=E, NUM_F_TILES=num_f_tiles, stride_dpj=dp_part.stride(0),
    )  # fmt: skip
    cx = dict(
        TOP_K=prob.top_k, RENORMALIZE=prob.renormalize, SELF_ROUTED=self_routed,
        BLOCK_M=ROUTER_BACKWARD_CONFIG["BLOCK_M"], BLOCK_E=prob.block_e,
    )  # fmt: skip
    return args, cx


def _up_backward_launch(x, wi_0, wi_1, router, du, dlogits, prob: _Problem, need_dh, need_drouter):
    """(args, constexprs) of (d); allocates dh0, dg [T, F] and the d router partials."""
    (T, M), F, E = x.shape, wi_0.shape[0], prob.num_experts
    self_routed = prob.mode == ROUTE_SELF
    dh0 = _empty((T, F), x.dtype, x.device, need_dh)
    dg = _empty((T, F), x.dtype, x.device, need_dh and prob.gated)
    dr_part = _empty(
        (_num_tiles(T, _ffn_up_backward_kernel.configs, "BLOCK_M"), F, E), torch.float32, x.device, need_drouter
    )
    wi_1 = wi_1 if prob.gated else wi_0
    router = router if self_routed else dh0
    dlogits = dlogits if self_routed else dh0
    du = du if need_dh else dh0
    args = dict(
        x_ptr=x, wi_0_ptr=wi_0, wi_1_ptr=wi_1, router_ptr=router, du_ptr=du, dlogits_ptr=dlogits,
        dh0_ptr=dh0, dg_ptr=dg, drouter_part_ptr=dr_part,
        T=T, M=M, F=F, E=E, T_BUCKET=t_bucket(T),
        stride_xt=x.stride(0), stride_xm=x.stride(1), stride_w0f=wi_0.stride(0), stride_w0m=wi_0.stride(1),
        stride_w1f=wi_1.stride(0), stride_w1m=wi_1.stride(1),
        stride_rf=router.stride(0) if self_routed else 0, stride_re=router.stride(1) if self_routed else 0,
        stride_dut=du.stride(0) if need_dh else 0, stride_duf=du.stride(1) if need_dh else 0,
        stride_dht=dh0.stride(0) if need_dh else 0, stride_dhf=dh0.stride(1) if need_dh else 0,
        stride_dgt=dg.stride(0) if need_dh and prob.gated else 0,
        stride_dgf=dg.stride(1) if need_dh and prob.gated else 0,
        stride_drj=dr_part.stride(0) if need_drouter else 0, stride_drf=dr_part.stride(1) if need_drouter else 0,
    )  # fmt: skip
    cx = dict(
        ACTIVATION=prob.activation, GATED=prob.gated, SELF_ROUTED=self_routed,
        NEED_DH=need_dh, NEED_DROUTER=need_drouter, BLOCK_E=prob.block_e,
    )  # fmt: skip
    return args, {**cx, **prob.precisions}


def tile_grid(rows: int, cols: int, block_cols: str, grouped: bool = True):
    """Grid of the tiled kernels (a)–(d): one program per [BLOCK_M, ``block_cols``] tile of a rows × cols output;
    a 1-D grid in grouped order (the kernels map their program id with :func:`.tiles.grouped_ids`), or for (d),
    ``grouped=False``, the 2-D grid (row tiles, column tiles)."""
    if not grouped:
        return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cols, meta[block_cols]))
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta[block_cols]),)


def router_backward_grid(T: int) -> tuple[int]:
    """Grid of (r): one program per ROUTER_BACKWARD_CONFIG["BLOCK_M"] token rows."""
    return (triton.cdiv(T, ROUTER_BACKWARD_CONFIG["BLOCK_M"]),)


def _forward(x, wi_0, wi_1, wo, router, experts, probs, prob: _Problem, save_p_soft: bool):
    """Launches (a) and (b); returns (y [T, M], u [T, F], p_soft [T, E] float32 or None)."""
    T, M = x.shape
    F = wi_0.shape[0]
    args, cx = _up_launch(x, wi_0, wi_1, router, prob)
    _ffn_up_kernel[tile_grid(T, F, "BLOCK_F")](**args, **cx)
    num_f_tiles = triton.cdiv(F, _ffn_up_kernel.best_config.kwargs["BLOCK_F"])
    inter, logits_part = args["inter_ptr"], args["logits_part_ptr"]
    args, cx, p_soft = _down_launch(inter, wo, experts, logits_part, probs, num_f_tiles, prob, save_p_soft)
    _ffn_down_kernel[tile_grid(T, M, "BLOCK_N")](**args, **cx)
    return args["y_ptr"], inter, p_soft


def _backward(dy, x, wi_0, wi_1, wo, router, experts, probs, inter, p_soft, prob: _Problem, needs):
    """Launches (c), (r), (d) and the dx GEMMs; returns (dx, d router, d experts, d probs), None where not needed."""
    need_x, need_router, need_experts, need_probs = needs
    T, F = inter.shape
    self_routed = prob.mode == ROUTE_SELF
    need_drouter = need_router and self_routed
    need_dlogits = self_routed and (need_x or need_drouter)
    need_dp = need_dlogits or (prob.mode == ROUTE_GIVEN and need_probs)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()  # explicit: unit-stride rows for the GEMM loads
    # ---- (c)
    p = p_soft if self_routed else probs
    args, cx = _down_backward_launch(dy, wo, inter, experts, p, prob, need_x, need_dp, need_experts)
    _ffn_down_backward_kernel[tile_grid(T, F, "BLOCK_F")](**args, **cx)
    best = _ffn_down_backward_kernel.best_config.kwargs
    du = args["du_ptr"]
    d_experts = d_probs = dlogits = None
    if need_experts:
        d_experts = args["dexperts_part_ptr"][: triton.cdiv(T, best["BLOCK_M"])].sum(0).unsqueeze(0)
        if prob.mode == ROUTE_NONE:
            d_experts = d_experts[:, :1]  # only expert row 0 is written when p ≡ 1 (E = 1)
    # ---- (r)
    if need_dp:
        r_args, r_cx = _router_backward_launch(args["dp_part_ptr"], p_soft, triton.cdiv(F, best["BLOCK_F"]), T, prob)
        warps = ROUTER_BACKWARD_CONFIG["num_warps"]
        _router_backward_kernel[router_backward_grid(T)](**r_args, **r_cx, num_warps=warps)
        if self_routed:
            dlogits = r_args["out_ptr"]
        else:
            d_probs = r_args["out_ptr"]
    # ---- (d) and the dx GEMMs (torch: the vendor GEMM)
    dx = d_router = None
    if need_x or need_drouter:
        args, cx = _up_backward_launch(x, wi_0, wi_1, router, du, dlogits, prob, need_x, need_drouter)
        _ffn_up_backward_kernel[tile_grid(T, F, "BLOCK_F", grouped=False)](**args, **cx)
        if need_drouter:
            m_tiles = triton.cdiv(T, _ffn_up_backward_kernel.best_config.kwargs["BLOCK_M"])
            d_router = args["drouter_part_ptr"][:m_tiles].sum(0)
        if need_x:
            dx = args["dh0_ptr"] @ wi_0
            if prob.gated:
                dx.addmm_(args["dg_ptr"], wi_1)
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
    prob = _Problem.of(x, wi_1, router, experts, probs, activation, top_k, renormalize)
    with launch_device(x.device):
        y, inter, p_soft = _forward(x, wi_0, wi_1, wo, router, experts, probs, prob, save_p_soft=save)
    return y, inter, (p_soft if p_soft is not None else absent(x))


@_forward_op.register_fake
def _(x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize, save):
    T, E = x.shape[0], experts.shape[1]
    p_soft = x.new_empty((T, E), dtype=torch.float32) if save and _saves_p_soft(router, probs) else absent(x)
    return x.new_empty((T, wo.shape[0])), x.new_empty((T, wi_0.shape[0])), p_soft


def _saves_p_soft(router: Tensor | None, probs: Tensor | None) -> bool:
    return _routing_mode(router, probs) == ROUTE_SELF


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
        prob = _Problem.of(x, wi_1, router, experts, probs, activation, top_k, renormalize)
        with launch_device(x.device):
            grads = _backward(dy, x, wi_0, wi_1, wo, router, experts, probs, inter, p_soft, prob, tuple(needs))
    return tuple(g if g is not None and need else absent(x) for g, need in zip(grads, needs, strict=True))


@_backward_op.register_fake
def _(dy, x, wi_0, wi_1, wo, router, experts, probs, inter, p_soft, activation, top_k, renormalize, needs):
    T, M, E, F = x.shape[0], x.shape[1], experts.shape[1], wi_0.shape[0]
    mode = _routing_mode(router, probs)
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
    mode = _routing_mode(router, probs)
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
