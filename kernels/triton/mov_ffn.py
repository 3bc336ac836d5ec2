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
  (a) ``_ffn_up_kernel``: dual GEMM over [BLOCK_M, BLOCK_F] tiles; each program owns one row tile and a
      chunk of F_CHUNK columns (a runtime scalar, :func:`f_chunk`) and loops over the chunk's F tiles;
      epilogue per tile: act, writes u, and adds the tile's share of the router logits
      a_tile·router[f-slice] (tl.dot) to a [BLOCK_M, BLOCK_E] register accumulator, in F order; the chunk's
      sum goes to a split buffer ``logits_part [cdiv(F, F_CHUNK), T, E]`` float32 — no atomics: every slot
      is written by one program, so the result is bitwise deterministic and autotune re-runs are idempotent.
  (b) ``_ffn_down_kernel``: y = (u ⊙ s)·woᵀ. Prologue, once per row block: sum the cdiv(F, F_CHUNK) logit
      partials in a fixed order, softmax/top-k (``routing.router_probs``), keep p in registers
      (and write p_soft [T, E] float32 from the first column block when backward needs it);
      per K-slice of F: s = p·experts[:, slice] (tl.dot) scales the A tile before the GEMM.
Backward (base weights frozen; dy [T, M]):
    dz = dy·wo; ds = dz ⊙ u; du = dz ⊙ s
    d experts = pᵀ·ds;  dp = ds·experts[0]ᵀ;  dlogits = router_probs_backward(dp, p_soft)
    da = du ⊙ g + dlogits·routerᵀ (du + ... for v1.0); dg = du ⊙ a; dh0 = da ⊙ act'(h0)
    d router = a32ᵀ·dlogits;  dx = dh0·wi_0 + dg·wi_1;  d probs = dp (sentence routing)
  (c) ``_ffn_down_backward_kernel``: the dz GEMM (K = M); epilogue recomputes s from p, writes
      du, and the split partials of dp [cdiv(F, F_CHUNK), T, E] and d experts [CHUNKS, E, F]: each
      program owns a chunk of ROW_CHUNK rows (a runtime scalar, :func:`row_chunk`) and a chunk of F_CHUNK
      columns (:func:`f_chunk`); it loops over the chunk's F tiles (outer) and row tiles (inner), keeps
      the F tile's d experts partial in registers across the row tiles (in row order) and writes it to
      slot c, columns of that tile; dp of each row tile is added to the program's rows of slot j in F
      order (the chunk's first F tile stores, later ones read back and add: those rows belong to this
      program alone, so no atomics, and a barrier between F tiles orders the reads after the stores).
      dp cannot stay in registers across F tiles too: the row tiles are the inner loop, and with rows
      outer the d experts partial would need the read-back instead ([E, F_CHUNK] per row tile, where dp
      reads [ROW_CHUNK, E] per F tile: the same order of bytes, mostly L2 hits either way).
  (r) ``_router_backward_kernel``: sums the cdiv(F, F_CHUNK) dp partials in order, applies the softmax/top-k
      backward (``routing.router_probs_backward``) -> dlogits [T, E] (or d probs for sentence routing).
  (d) ``_ffn_up_backward_kernel``: recomputes h0, g with the dual GEMM of (a) (cheaper in memory
      than keeping two [T, F] tensors alive); epilogue forms dh0, dg and, over the row chunks of (c),
      the split partials of d router [CHUNKS, F, E].
  Split buffers: the d experts / d router partials are summed in chunk order, the logit / dp partials in F
  chunk order (deterministic). CHUNKS = cdiv(T, ROW_CHUNK) and the F slots cdiv(F, F_CHUNK) are chosen by the
  plan, independent of the tile autotune picks, and bounded: ~1/8 of a [T, F] activation's bytes, unless
  fewer slots would leave the first wave of programs short of NUM_SMS. At T = 8192, E = 60, F = 10240 in
  bfloat16 (a [T, F] activation: 168 MB): d experts / d router 7 row chunks, 17 MB each; logits 9 F chunks
  (17.7 MB), dp 20 F chunks (39 MB: (c) pairs them with only 7 row chunks, and 140 programs fill one H100
  wave), where a slot per F tile was 630 MB (logits, BLOCK_F = 32) and 1.26 GB (dp, BLOCK_F = 16).
  Offsets: row and column indices are 32-bit (T, F < 2^31); a row tile's or slot's element offset, which
  passes 2^31, goes into scalar base pointers in 64 bits, so the per-element offsets live across the F
  loop stay 32-bit (64-bit ones cost (a) and (c) spills) — except the rows of the operands a caller passes
  with its own strides (x in (a), dy in (c)), whose row stride times BLOCK_M alone can pass 2^31.
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
BLOCK_E / BLOCK_N of its MMA work (12.5 % for E ≤ 16 at the default BLOCK_N = 128, 50 % for
E = 60), recomputed by each of the M / BLOCK_N column blocks (:func:`.mov_ffn_analysis.down_mma_flops`):
hence wide BLOCK_N. Computing s or u ⊙ s once would need it in HBM: two more [T, F] passes, where
§3 allows [T, E] float32 beyond a plain FFN. Bytes: see :func:`.mov_ffn_analysis.hbm_traffic`.
The interpreter cannot time, so the defaults (first config of each list) are chosen for the AOT
register/spill/smem report, not measured; on a GPU autotune benchmarks every config that survives
pruning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import triton
import triton.language as tl

from pemoe.kernels.triton import routing, tiles
from pemoe.kernels.triton.interpreter import do_bench
from pemoe.kernels.triton.plan import ITEMSIZE, Buffer, Launch, load_torch_part, strides_of, torch_attribute

ACTIVATIONS = ("gelu_new", "gelu", "relu", "silu")
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
def _up_tile(
    x_ptr, wi_0_ptr, wi_1_ptr,  # x [T, M]; wi_0, wi_1 [F, M]
    offs_m, offs_f, T, F, M,
    stride_xt, stride_xm, stride_w0f, stride_w0m, stride_w1f, stride_w1m,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, WITH_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """(act(h0), act'(h0), g) float32 [BLOCK_M, BLOCK_F] with h0 = x·wi_0ᵀ, g = x·wi_1ᵀ (zeros unless GATED) for
    the x rows offs_m; act'(h0) as :func:`_activation` (only with WITH_GRAD). Rows >= T and columns >= F read
    as 0, so padded entries hold act(0) = 0."""
    h0, g = _dual_gemm(
        x_ptr, wi_0_ptr, wi_1_ptr, offs_m, offs_f, T, F, M,
        stride_xt, stride_xm, stride_w0f, stride_w0m, stride_w1f, stride_w1m,
        GATED, DOT_PRECISION, BLOCK_M, BLOCK_F, BLOCK_K,
    )  # fmt: skip
    a, act_grad = _activation(h0, ACTIVATION, WITH_GRAD)
    return a, act_grad, g


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


#: (a): dual GEMM tiles [BLOCK_M, BLOCK_F], K = M, looped over an F chunk (the logit accumulator lives across the loop).
UP_CONFIGS = _for_every_dtype(
    [
        _cfg(4, 4, BLOCK_M=64, BLOCK_F=64, BLOCK_K=64),  # default: no spill (ptxas stack 0) for E <= 32
        _cfg(8, 3, BLOCK_M=128, BLOCK_F=128, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=128, BLOCK_F=64, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=64, BLOCK_F=128, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=16, BLOCK_F=128, BLOCK_K=64),  # decode-sized T
    ],
    _cfg(8, 2, BLOCK_M=64, BLOCK_F=32, BLOCK_K=32),  # float32 default: no spill (4 warps spill on sm_90)
)
#: (b): output tiles [BLOCK_M, BLOCK_N] over M, K = F. Every column block recomputes the merge s = p·experts of
#: its row block at each K step (BLOCK_E / BLOCK_N of the tile's MMA work): wide BLOCK_N first.
DOWN_CONFIGS = _for_every_dtype(
    [
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),  # default
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64),
        _cfg(8, 3, BLOCK_M=64, BLOCK_N=256, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64),
    ],
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
)
#: (c): dz tiles [BLOCK_M, BLOCK_F], K = M (a 2-D grid over row chunks and F tiles: not grouped). The d experts
#: accumulator lives across the row loop: the default tile is narrow in F.
DOWN_BACKWARD_CONFIGS = _for_every_dtype(
    [
        _cfg(8, 3, False, BLOCK_M=64, BLOCK_F=32, BLOCK_K=64),  # default: no spill for E <= 32
        _cfg(8, 3, False, BLOCK_M=64, BLOCK_F=64, BLOCK_K=64),
        _cfg(8, 3, False, BLOCK_M=128, BLOCK_F=128, BLOCK_K=64),
        _cfg(4, 4, False, BLOCK_M=128, BLOCK_F=64, BLOCK_K=64),
        _cfg(4, 4, False, BLOCK_M=64, BLOCK_F=128, BLOCK_K=64),
        _cfg(4, 4, False, BLOCK_M=64, BLOCK_F=64, BLOCK_K=64),
        _cfg(4, 4, False, BLOCK_M=16, BLOCK_F=128, BLOCK_K=64),
    ],
    _cfg(8, 2, False, BLOCK_M=64, BLOCK_F=32, BLOCK_K=32),  # float32 default: no spill for E <= 32
)
#: (d): as (a), but the epilogue also holds du, dlogits and act'(h0), and the d router accumulator lives across the
#: row loop: a narrow default tile (16-bit: spill-free under jax-triton's constant sizes too).
UP_BACKWARD_CONFIGS = _for_every_dtype(
    [
        _cfg(4, 3, False, BLOCK_M=64, BLOCK_F=16, BLOCK_K=64),  # default: no spill (ptxas stack 0) for E <= 32
        _cfg(8, 3, False, BLOCK_M=64, BLOCK_F=32, BLOCK_K=64),
        _cfg(4, 3, False, BLOCK_M=64, BLOCK_F=32, BLOCK_K=64),
        _cfg(8, 3, False, BLOCK_M=128, BLOCK_F=64, BLOCK_K=64),
        _cfg(4, 4, False, BLOCK_M=64, BLOCK_F=128, BLOCK_K=64),
        _cfg(4, 4, False, BLOCK_M=64, BLOCK_F=64, BLOCK_K=64),
        _cfg(4, 4, False, BLOCK_M=16, BLOCK_F=128, BLOCK_K=64),
    ],
    _cfg(8, 2, False, BLOCK_M=64, BLOCK_F=32, BLOCK_K=32),  # float32 default: no spill for E <= 32
)
#: (r): rows per program of the [T, E] router backward.
ROUTER_BACKWARD_CONFIG = dict(BLOCK_M=64, num_warps=4)


def _fits(block: int, size: int) -> bool:
    """A block no larger than the dimension rounded up to a power of two (≥ 16)."""
    return block <= max(16, triton.next_power_of_2(size))


def legal_configs(configs: list[triton.Config], dims: dict[str, int], itemsize: int) -> list[triton.Config]:
    """The configs whose K-rows hold K_ROW_BYTES of the operand's dtype (``itemsize`` bytes) and whose blocks
    fit the launch's dims (``BLOCK_X -> size``); the smallest such tile if none fits. Order is kept: the first
    is the default. Every block is ≥ 16, so tl.dot's minimum shapes hold for any T, M, F (and BLOCK_E ≥ 16)."""
    legal = [c for c in configs if c.kwargs["BLOCK_K"] * itemsize == K_ROW_BYTES]
    kept = [c for c in legal if all(_fits(c.kwargs[b], size) for b, size in dims.items())]
    return kept or [min(legal, key=lambda c: math.prod(c.kwargs[b] for b in dims))]


def _prune(dims: dict[str, str], operand: str):
    """early_config_prune: :func:`legal_configs` for the launch's sizes (``BLOCK_X -> size arg``) and the
    ``operand`` tensor's dtype."""

    def prune(configs, named_args, **kwargs):
        sizes = {**named_args, **kwargs}
        return legal_configs(configs, {b: sizes[d] for b, d in dims.items()}, sizes[operand].element_size())

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
    inter_ptr, logits_part_ptr,  # outputs: u [T, F], logit partials [F_SLOTS, T, E] float32
    T, M, F, E, T_BUCKET, F_CHUNK,
    stride_xt, stride_xm, stride_w0f, stride_w0m, stride_w1f, stride_w1m, stride_rf, stride_re,
    stride_ut, stride_uf, stride_lj, stride_lt,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, ROUTE_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROUTER_PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """For one row tile and the columns [j·F_CHUNK, (j + 1)·F_CHUNK) ∩ [0, F) of F chunk j: per F tile,
    u = act(x·wi_0ᵀ) [⊙ x·wi_1ᵀ]; the chunk's logit partial Σ_tiles act(x·wi_0ᵀ)[:, f-slice]·router[f-slice]
    accumulates in registers, in F order, into slot j."""
    pid_m, pid_j = tiles.grouped_ids(tl.program_id(0), tl.cdiv(T, BLOCK_M), tl.cdiv(F, F_CHUNK), GROUP_M)
    # the row tile's offset goes into the base pointers in 64 bits (it passes 2^31 elements at long T); offsets
    # within the tile stay 32-bit, which keeps the loop's live address registers few, except x's rows: x may be a
    # strided view whose row stride times BLOCK_M alone passes 2^31 elements
    row0 = pid_m.to(tl.int64) * BLOCK_M
    rows = T - row0  # the tile's rows in [0, rows) are tokens
    x_ptr += row0 * stride_xt
    inter_ptr += row0 * stride_ut
    logits_part_ptr += pid_j.to(tl.int64) * stride_lj + row0 * stride_lt
    offs_m = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    f_start = pid_j * F_CHUNK
    f_end = tl.minimum(f_start + F_CHUNK, F)
    logits = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for f0 in range(f_start, f_end, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        # ---- main loop (h0 = x·wi_0ᵀ, g = x·wi_1ᵀ) and activation: a = act(h0), u = a [⊙ g]; columns past the
        # chunk's end read as 0, so a = act(0) = 0 there
        a, _, g = _up_tile(
            x_ptr, wi_0_ptr, wi_1_ptr, offs_m.to(tl.int64), offs_f, rows, f_end, M,
            stride_xt, stride_xm, stride_w0f, stride_w0m, stride_w1f, stride_w1m,
            ACTIVATION, GATED, False, DOT_PRECISION, BLOCK_M, BLOCK_F, BLOCK_K,
        )  # fmt: skip
        u = a * g if GATED else a
        # ---- epilogue: intermediate, the tile's router-logit share
        tl.store(
            inter_ptr + offs_m[:, None] * stride_ut + offs_f[None, :] * stride_uf,
            u.to(inter_ptr.dtype.element_ty),
            mask=(offs_m[:, None] < rows) & (offs_f[None, :] < f_end),
        )
        if ROUTE_LOGITS:
            r_mask = (offs_f[:, None] < f_end) & (offs_e[None, :] < E)
            router = tl.load(
                router_ptr + offs_f[:, None] * stride_rf + offs_e[None, :] * stride_re, mask=r_mask, other=0.0
            )
            logits = tl.dot(a, router, logits, input_precision=ROUTER_PRECISION)  # [BLOCK_M, BLOCK_E]
    # ---- the chunk's logit partial: one slot per F chunk, written by this program alone
    if ROUTE_LOGITS:
        tl.store(
            logits_part_ptr + offs_m[:, None] * stride_lt + offs_e[None, :],
            logits,
            mask=(offs_m[:, None] < rows) & (offs_e[None, :] < E),
        )


# ------------------------------------------------------------------------------------------
# (b) wo GEMM with the softmax + expert-merge prologue
# ------------------------------------------------------------------------------------------


@_autotune(DOWN_CONFIGS, _TUNING_KEY, {"BLOCK_M": "T", "BLOCK_N": "M", "BLOCK_K": "F"}, "inter_ptr")
@triton.jit
def _ffn_down_kernel(
    inter_ptr, wo_ptr, experts_ptr, logits_part_ptr, probs_ptr,  # inputs: u [T, F], wo [M, F], experts [E, F]
    y_ptr, p_soft_ptr,  # outputs: y [T, M], p_soft [T, E] float32 (only when SAVE_P_SOFT)
    T, M, F, E, T_BUCKET, F_SLOTS,
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
        for _ in range(0, F_SLOTS):  # fixed order: deterministic; the pointer advances in 64 bits
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
    du_ptr, dp_part_ptr, dexperts_part_ptr,  # outputs: du [T, F], dp [F_SLOTS, T, E], d experts [CHUNKS, E, F]
    T, M, F, E, T_BUCKET, ROW_CHUNK, F_CHUNK,
    stride_dyt, stride_dym, stride_wom, stride_wof, stride_ut, stride_uf, stride_ee, stride_ef,
    stride_pt, stride_pe, stride_dut, stride_duf, stride_dpj, stride_dpt, stride_dej, stride_dee,
    ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    NEED_DU: tl.constexpr, NEED_DP: tl.constexpr, NEED_DEXPERTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROUTER_PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """For the rows [c·ROW_CHUNK, (c + 1)·ROW_CHUNK) ∩ [0, T) of row chunk c = program_id(0) and the columns
    [j·F_CHUNK, (j + 1)·F_CHUNK) ∩ [0, F) of F chunk j = program_id(1), per F tile (outer) and row tile (inner):
    dz = dy·wo[:, f-slice]; du = dz ⊙ s; the chunk's dp partial Σ_tiles (dz ⊙ u)·experts[:, f-slice]ᵀ accumulates
    in its slot j, in F order (the slot's rows of this row chunk belong to this program alone); the F tile's
    d experts partial Σ_rows pᵀ·(dz ⊙ u) accumulates in registers, in row order, into slot c."""
    # 2-D grid, row chunks fastest: the programs in flight share F slices of wo (L2) across the row chunks
    # row and column indices are 32-bit (T, F < 2^31); element offsets that pass 2^31 (a row times its stride, a
    # slot times its size) are formed in 64 bits into scalar base pointers
    pid_c = tl.program_id(0)
    pid_j = tl.program_id(1)
    row_start = pid_c * ROW_CHUNK
    row_start64 = pid_c.to(tl.int64) * ROW_CHUNK
    row_end = tl.minimum(row_start + ROW_CHUNK, T)
    f_start = pid_j * F_CHUNK
    f_end = tl.minimum(f_start + F_CHUNK, F)
    offs_e = tl.arange(0, BLOCK_E)
    dp_part = dp_part_ptr + pid_j.to(tl.int64) * stride_dpj  # this F chunk's slot
    for f0 in range(f_start, f_end, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        col_ok = offs_f[None, :] < f_end  # columns past the chunk's end read as 0 and are not stored
        if ROUTING == "none":  # p ≡ 1: d experts[0, 0, f] = Σ_t ds
            dex = tl.zeros((BLOCK_F,), dtype=tl.float32)
        else:
            dex = tl.zeros((BLOCK_E, BLOCK_F), dtype=tl.float32)
        if NEED_DP:  # experts[:, f-slice]ᵀ, the same for every row tile
            e_mask = (offs_e[:, None] < E) & col_ok
            ex_t = tl.trans(
                tl.load(experts_ptr + offs_e[:, None] * stride_ee + offs_f[None, :] * stride_ef, mask=e_mask, other=0.0)
            )
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = row_end - m0  # tile rows in [0, rows) belong to the chunk
            row0 = row_start64 + (m0 - row_start)  # m0 in 64 bits
            offs_m = tl.arange(0, BLOCK_M)
            row_ok = offs_m[:, None] < rows
            # ---- main loop over M: dz = dy·wo
            dy_tile = dy_ptr + row0 * stride_dyt
            offs_m64 = offs_m.to(tl.int64)  # dy may be a strided view: its row stride times BLOCK_M can pass 2^31
            dz = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
            for k0 in range(0, M, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                dy = tl.load(
                    dy_tile + offs_m64[:, None] * stride_dyt + offs_k[None, :] * stride_dym,
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
            u = tl.load(
                inter_ptr + row0 * stride_ut + offs_m[:, None] * stride_ut + offs_f[None, :] * stride_uf,
                mask=tile_mask,
                other=0.0,
            ).to(tl.float32)
            ds = dz * u
            if ROUTING == "none":
                p = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
            else:  # rows past the chunk's end are 0, so they add nothing to d experts
                p = _routing_weights(
                    p_ptr + row0 * stride_pt, offs_m, offs_e, rows, E, stride_pt, stride_pe, ROUTING, TOP_K, RENORMALIZE
                )
            if NEED_DU:
                s = _merge(
                    p, experts_ptr, offs_e, offs_f, E, f_end, stride_ee, stride_ef, du_ptr.dtype.element_ty, ROUTING
                )
                tl.store(
                    du_ptr + row0 * stride_dut + offs_m[:, None] * stride_dut + offs_f[None, :] * stride_duf,
                    (dz * s).to(du_ptr.dtype.element_ty),
                    mask=tile_mask,
                )
            if NEED_DP:
                dp = tl.dot(ds, ex_t, input_precision=ROUTER_PRECISION)  # [BLOCK_M, BLOCK_E]
                dp_ptrs = dp_part + row0 * stride_dpt + offs_m[:, None] * stride_dpt + offs_e[None, :]
                dp_mask = row_ok & (offs_e[None, :] < E)
                # the chunk's first F tile stores, later ones add (every slot entry is fully written: re-runs of
                # autotune give the same result); the flag is a [1, BLOCK_E] tensor: a scalar one in the mask fails
                # in the interpreter
                later = (f0 + tl.zeros((1, BLOCK_E), dtype=tl.int32)) > f_start
                dp += tl.load(dp_ptrs, mask=dp_mask & later, other=0.0)
                tl.store(dp_ptrs, dp, mask=dp_mask)
            if NEED_DEXPERTS:
                if ROUTING == "none":
                    dex += tl.sum(ds, axis=0)
                else:
                    dex = tl.dot(tl.trans(p), ds, dex, input_precision=ROUTER_PRECISION)  # [BLOCK_E, BLOCK_F]
        # ---- the F tile's d experts partial: slot c, columns written by this program alone
        if NEED_DEXPERTS:
            if ROUTING == "none":
                tl.store(dexperts_part_ptr + pid_c.to(tl.int64) * stride_dej + offs_f, dex, mask=offs_f < f_end)
            else:
                dex_part = dexperts_part_ptr + pid_c.to(tl.int64) * stride_dej
                tl.store(
                    dex_part + offs_e[:, None] * stride_dee + offs_f[None, :],
                    dex,
                    mask=(offs_e[:, None] < E) & col_ok,
                )
        if NEED_DP:  # the next F tile reads this one's dp stores, which other threads of the program may have made
            tl.debug_barrier()


# ------------------------------------------------------------------------------------------
# (r) backward: dp partials -> dlogits (self-routing) or d probs (sentence routing)
# ------------------------------------------------------------------------------------------


@triton.jit
def _router_backward_kernel(
    dp_part_ptr, p_soft_ptr,  # inputs: dp partials [F_SLOTS, T, E], p_soft [T, E] (both float32, contiguous)
    out_ptr,  # output [T, E] float32: dlogits (SELF_ROUTED) or dp
    T, E, F_SLOTS, stride_dpj,
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
    for _ in range(0, F_SLOTS):  # the pointer advances in 64 bits: j·stride_dpj passes 2^31 at long T
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
    dh0_ptr, dg_ptr, drouter_part_ptr,  # outputs: dh0, dg [T, F]; d router partials [CHUNKS, F, E] float32
    T, M, F, E, T_BUCKET, ROW_CHUNK,
    stride_xt, stride_xm, stride_w0f, stride_w0m, stride_w1f, stride_w1m, stride_rf, stride_re,
    stride_dut, stride_duf, stride_dht, stride_dhf, stride_dgt, stride_dgf, stride_drj, stride_drf,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, SELF_ROUTED: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DROUTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ROUTER_PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """For the rows [c·ROW_CHUNK, (c + 1)·ROW_CHUNK) ∩ [0, T) of chunk c = program_id(0) and one F slice, per row
    tile: dh0 = (du ⊙ g + dlogits·routerᵀ) ⊙ act'(h0), dg = du ⊙ a; the chunk's d router partial Σ_tiles aᵀ·dlogits
    accumulates in registers, in row order, into slot c."""
    # a 2-D grid, chunks fastest (not grouped: the grouped ids cost this register-bound kernel spills on sm_80 /
    # sm_90 at its defaults)
    pid_c = tl.program_id(0).to(tl.int64)  # 64-bit: row and partial-buffer offsets pass 2^31
    pid_f = tl.program_id(1).to(tl.int64)
    row_start = pid_c * ROW_CHUNK
    row_end = tl.minimum(row_start + ROW_CHUNK, T)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_e = tl.arange(0, BLOCK_E)
    col_ok = offs_f[None, :] < F
    drouter = tl.zeros((BLOCK_F, BLOCK_E), dtype=tl.float32)
    if SELF_ROUTED and NEED_DH:  # router[f-slice]ᵀ, the same for every row tile
        r_mask = (offs_f[:, None] < F) & (offs_e[None, :] < E)
        router_t = tl.trans(
            tl.load(router_ptr + offs_f[:, None] * stride_rf + offs_e[None, :] * stride_re, mask=r_mask, other=0.0)
        )
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m[:, None] < row_end
        tile_mask = row_ok & col_ok
        # ---- main loop: recompute h0 = x·wi_0ᵀ, g = x·wi_1ᵀ, then a = act(h0), act'(h0) (rows past the chunk: 0)
        a, act_grad, g = _up_tile(
            x_ptr, wi_0_ptr, wi_1_ptr, offs_m, offs_f, row_end, F, M,
            stride_xt, stride_xm, stride_w0f, stride_w0m, stride_w1f, stride_w1m,
            ACTIVATION, GATED, True, DOT_PRECISION, BLOCK_M, BLOCK_F, BLOCK_K,
        )  # fmt: skip
        # ---- epilogue
        if SELF_ROUTED:
            dlogits = tl.load(
                dlogits_ptr + offs_m[:, None] * E + offs_e[None, :], mask=row_ok & (offs_e[None, :] < E), other=0.0
            )
        if NEED_DH:
            du = tl.load(
                du_ptr + offs_m[:, None] * stride_dut + offs_f[None, :] * stride_duf, mask=tile_mask, other=0.0
            ).to(tl.float32)
            da = du * g if GATED else du
            if SELF_ROUTED:
                da += tl.dot(dlogits, router_t, input_precision=ROUTER_PRECISION)
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
        if SELF_ROUTED:
            if NEED_DROUTER:
                drouter = tl.dot(tl.trans(a), dlogits, drouter, input_precision=ROUTER_PRECISION)  # [BLOCK_F, BLOCK_E]
    # ---- the chunk's d router partial: one slot per chunk, written by this program alone
    if SELF_ROUTED:
        if NEED_DROUTER:
            tl.store(
                drouter_part_ptr + pid_c * stride_drj + offs_f[:, None] * stride_drf + offs_e[None, :],
                drouter,
                mask=(offs_f[:, None] < F) & (offs_e[None, :] < E),
            )


# ------------------------------------------------------------------------------------------
# Launch plan: framework-neutral (shapes, dtype names, strides; no tensors), consumed by the PyTorch
# launcher (mov_ffn_torch.py) and by pemoe.jax.triton (jax-triton)
# ------------------------------------------------------------------------------------------

#: Names of the op's array inputs (and of the backward's extra ones), as a launch's pointers refer to them.
INPUTS = ("x", "wi_0", "wi_1", "wo", "router", "experts", "probs")
BACKWARD_INPUTS = INPUTS + ("dy", "inter", "p_soft")


def routing_mode(has_router: bool, has_probs: bool) -> str:
    """ROUTE_GIVEN with probs, else ROUTE_SELF with a router, else ROUTE_NONE ((IA)3)."""
    if has_probs:
        return ROUTE_GIVEN
    return ROUTE_SELF if has_router else ROUTE_NONE


@dataclass(frozen=True)
class Problem:
    """What the kernels specialise on besides the tile sizes: x [T, M], wi_0 / wi_1 [F, M], wo [M, F],
    experts [1, E, F]; ``dtype`` the activation dtype name; ``mode`` ROUTE_NONE | ROUTE_SELF | ROUTE_GIVEN."""

    T: int
    M: int
    F: int
    E: int
    dtype: str
    gated: bool
    mode: str
    activation: str
    top_k: int = 0  # 0: no top-k (also when top_k == E)
    renormalize: bool = False

    @property
    def num_experts(self) -> int:
        return self.E

    @property
    def block_e(self) -> int:
        """E padded to a power of two, at least 16 (tl.dot's minimum M/N/K) — for every E, E = 1 included."""
        return max(16, triton.next_power_of_2(self.E))

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def precisions(self) -> dict[str, str]:
        """GEMM and router-dot input precisions: "ieee" for float32 activations (torch's float32 matmul)."""
        if self.dtype == "float32":
            return dict(DOT_PRECISION="ieee", ROUTER_PRECISION="ieee")
        return dict(DOT_PRECISION="tf32", ROUTER_PRECISION="tf32x3")


def plan_problem(
    T: int,
    M: int,
    F: int,
    E: int,
    dtype: str,
    *,
    gated: bool,
    has_router: bool,
    has_probs: bool,
    activation: str,
    top_k: int | None,
    renormalize: bool,
) -> Problem:
    """The :class:`Problem` of x [T, M] (activation dtype name ``dtype``), F intermediate features, E experts,
    after the checks of what these kernels support that shapes and dtype names show (the launchers check
    devices and the PyTorch-specific rest)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"mov_ffn (triton): activation must be one of {ACTIVATIONS}, got {activation!r}")
    if dtype not in ITEMSIZE:
        raise TypeError(f"mov_ffn (triton): x has dtype {dtype}; the kernels support {list(ITEMSIZE)}")
    if M == 0:
        raise ValueError(f"mov_ffn (triton): x must have M >= 1 features, got [{T}, {M}]")
    if E == 0:
        raise ValueError(f"mov_ffn (triton): experts must have E >= 1 experts, got shape [1, 0, {F}]")
    if top_k is not None and not 1 <= top_k <= E:
        raise ValueError(f"mov_ffn (triton): top_k must be in [1, E = {E}], got {top_k}")
    k = 0 if top_k is None or top_k == E else int(top_k)
    mode = routing_mode(has_router, has_probs)
    return Problem(T, M, F, E, dtype, bool(gated), mode, activation, k, bool(renormalize) and k > 0)


#: Streaming multiprocessors of the largest target (H100 SXM: 132): the backward's row chunks give each programs.
NUM_SMS = 132
#: Waves of programs the row chunks aim for on NUM_SMS (several: the last wave is a small share of the work).
CHUNK_WAVES = 4
#: The d experts and d router partial buffers hold at most 1 / PARTIAL_SHARE of a [T, F] activation's bytes
#: (unless fewer row chunks would leave SMs without a program in the first wave).
PARTIAL_SHARE = 8


def row_chunk(pb: Problem, configs) -> int:
    """Rows each program of (c) and (d) owns (a runtime scalar, ROW_CHUNK): the program loops over the row tiles
    of its chunk and writes one d experts / d router partial, so those buffers have cdiv(T, ROW_CHUNK) slots
    whatever tile autotune picks.

    A multiple of every BLOCK_M in ``configs`` (row tiles never straddle two chunks). The number of chunks n is
    the fewest that give CHUNK_WAVES waves of programs over NUM_SMS with the fewest F tiles autotune may
    launch (its largest BLOCK_F), capped so n·E·4 bytes ≤ T·itemsize / PARTIAL_SHARE (the partials' bytes, per
    F column, against a [T, F] activation's), and raised again to one full wave where that cap is smaller.
    """
    align = max(c.kwargs["BLOCK_M"] for c in configs)
    if pb.T == 0:  # no rows, no programs: any chunk sizes the (empty) partial buffers
        return align
    f_programs = triton.cdiv(pb.F, max(c.kwargs["BLOCK_F"] for c in configs))
    waves = triton.cdiv(CHUNK_WAVES * NUM_SMS, f_programs)
    cap = (pb.T * pb.itemsize) // (PARTIAL_SHARE * 4 * pb.E)
    chunks = max(min(waves, cap), triton.cdiv(NUM_SMS, f_programs), 1)
    chunks = min(chunks, triton.cdiv(pb.T, align))
    return triton.cdiv(triton.cdiv(pb.T, chunks), align) * align


def f_chunk(F: int, E: int, itemsize: int, configs, programs: int) -> int:
    """Columns of F each program of (a) and (c) owns (a runtime scalar, F_CHUNK): the program loops over the F tiles
    of its chunk and writes one logit / dp partial slot, so those buffers have cdiv(F, F_CHUNK) slots whatever
    tile autotune picks. F columns, E experts, activations of ``itemsize`` bytes; ``programs``: the programs along
    T that each F chunk is paired with ((a): the row tiles of the largest BLOCK_M in ``configs``; (c): its row
    chunks). No columns or no programs: one chunk, which sizes the (empty) partial buffers.

    A multiple of every BLOCK_F in ``configs`` (F tiles never straddle two chunks). The number of chunks aimed for
    is the fewest that give CHUNK_WAVES waves of programs over NUM_SMS, capped so n·T·E·4 bytes ≤ T·F·itemsize /
    PARTIAL_SHARE (the partials' bytes against a [T, F] activation's); the chunk is that share of F rounded up to
    the alignment (at most that many chunks), or, where that leaves the first wave of NUM_SMS programs unfilled,
    the widest aligned chunk that fills it.
    """
    align = max(c.kwargs["BLOCK_F"] for c in configs)
    tiles_f = triton.cdiv(F, align)
    if programs == 0 or F == 0:
        return max(tiles_f, 1) * align
    waves = triton.cdiv(CHUNK_WAVES * NUM_SMS, programs)
    cap = (F * itemsize) // (PARTIAL_SHARE * 4 * E)
    chunk = triton.cdiv(triton.cdiv(F, max(min(waves, cap), 1)), align) * align
    wave = min(triton.cdiv(NUM_SMS, programs), tiles_f)  # chunks that fill one wave (or one tile each)
    if triton.cdiv(F, chunk) < wave:
        # cdiv(F, c) >= wave  <=>  (wave - 1)·c < F; (wave - 1)·align < F, so c >= align
        chunk = (F - 1) // (wave - 1) // align * align
    return chunk


def up_f_chunk(pb: Problem) -> int:
    """F_CHUNK of (a), which (b) needs for its number of logit slots."""
    configs = _ffn_up_kernel.configs
    return f_chunk(pb.F, pb.E, pb.itemsize, configs, triton.cdiv(pb.T, max(c.kwargs["BLOCK_M"] for c in configs)))


def down_backward_chunks(pb: Problem) -> tuple[int, int]:
    """(ROW_CHUNK, F_CHUNK) of (c): its row chunks first, then the F chunks paired with them; (r) needs F_CHUNK
    for its number of dp slots."""
    configs = _ffn_down_backward_kernel.configs
    rows = row_chunk(pb, configs)
    return rows, f_chunk(pb.F, pb.E, pb.itemsize, configs, triton.cdiv(pb.T, rows))


def chunk_grid(pb: Problem, chunk: int, block_cols: str):
    """Grid of (d): (row chunks of ``chunk`` rows, F tiles), chunks fastest."""
    return lambda meta: (triton.cdiv(pb.T, chunk), triton.cdiv(pb.F, meta[block_cols]))


def chunk_pair_grid(pb: Problem, rows: int, cols: int):
    """Grid of (c): (row chunks of ``rows`` rows, F chunks of ``cols`` columns), row chunks fastest."""
    return lambda meta: (triton.cdiv(pb.T, rows), triton.cdiv(pb.F, cols))


def tile_grid(rows: int, cols: int, block_cols: str):
    """Grid of (b): one program per [BLOCK_M, ``block_cols``] tile of a rows × cols output, a 1-D grid in grouped
    order (the kernel maps its program id with :func:`.tiles.grouped_ids`)."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta[block_cols]),)


def row_tile_chunk_grid(rows: int, cols: int, chunk: int):
    """Grid of (a): one program per (row tile of BLOCK_M rows, chunk of ``chunk`` columns) of a rows × cols
    output, a 1-D grid in grouped order (:func:`.tiles.grouped_ids`)."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, chunk),)


def router_backward_grid(T: int) -> tuple[int]:
    """Grid of (r): one program per ROUTER_BACKWARD_CONFIG["BLOCK_M"] token rows."""
    return (triton.cdiv(T, ROUTER_BACKWARD_CONFIG["BLOCK_M"]),)


def _configs(kernel, pb: Problem, dims: dict[str, int]) -> tuple[triton.Config, ...]:
    """What the kernel's autotuner runs from: its one configuration, else the pruned list."""
    if len(kernel.configs) == 1:
        return tuple(kernel.configs)
    return tuple(legal_configs(kernel.configs, dims, pb.itemsize))


def _strided(t: tuple[int, ...] | None, needed: bool) -> tuple[int, int]:
    return (t[0], t[1]) if needed and t is not None else (0, 0)


def up_launch(pb: Problem, strides: dict[str, tuple[int, ...]] | None = None) -> tuple[dict[str, Buffer], Launch]:
    """(a): buffers u ("inter" [T, F], x's dtype) and the logit partials ("logits_part" [cdiv(F, F_CHUNK), T, E]
    float32, self-routing only; every slot written); ``strides`` of the op inputs where not row-major (PyTorch)."""
    T, M, F, E = pb.T, pb.M, pb.F, pb.E
    self_routed = pb.mode == ROUTE_SELF
    chunk = up_f_chunk(pb)
    buffers = {"inter": Buffer((T, F), pb.dtype)}
    if self_routed:
        buffers["logits_part"] = Buffer((triton.cdiv(F, chunk), T, E), "float32")
    sx = strides_of(strides, "x", (T, M))
    s0 = strides_of(strides, "wi_0", (F, M))
    s1 = strides_of(strides, "wi_1", (F, M)) if pb.gated else s0  # never read when not GATED
    sr = _strided(strides_of(strides, "router", (F, E)), self_routed)
    sl = _strided(buffers["logits_part"].strides if self_routed else None, self_routed)
    scalars = dict(
        T=T, M=M, F=F, E=E, T_BUCKET=t_bucket(T), F_CHUNK=chunk,
        stride_xt=sx[0], stride_xm=sx[1], stride_w0f=s0[0], stride_w0m=s0[1], stride_w1f=s1[0], stride_w1m=s1[1],
        stride_rf=sr[0], stride_re=sr[1], stride_ut=F, stride_uf=1, stride_lj=sl[0], stride_lt=sl[1],
    )  # fmt: skip
    cx = dict(ACTIVATION=pb.activation, GATED=pb.gated, ROUTE_LOGITS=self_routed, BLOCK_E=pb.block_e)
    launch = Launch(
        role="up", name="pemoe_mov_ffn_up", kernel=_ffn_up_kernel,
        inputs=("x", "wi_0", "wi_1" if pb.gated else None, "router" if self_routed else None),
        outputs=("inter", "logits_part" if self_routed else None),
        scalars=scalars, constexprs={**cx, **pb.precisions}, grid=row_tile_chunk_grid(T, F, chunk),
        configs=_configs(_ffn_up_kernel, pb, {"BLOCK_M": T, "BLOCK_F": F, "BLOCK_K": M}),
    )  # fmt: skip
    return buffers, launch


def down_launch(
    pb: Problem, save_p_soft: bool, strides: dict[str, tuple[int, ...]] | None = None
) -> tuple[dict[str, Buffer], Launch]:
    """(b), reading the cdiv(F, F_CHUNK) logit partials of (a) (:func:`up_f_chunk`): buffers y [T, M] and
    p_soft [T, E] float32 (self-routing, when saved for the backward)."""
    T, M, F, E = pb.T, pb.M, pb.F, pb.E
    self_routed, given = pb.mode == ROUTE_SELF, pb.mode == ROUTE_GIVEN
    save = save_p_soft and self_routed
    buffers = {"y": Buffer((T, M), pb.dtype)}
    if save:
        buffers["p_soft"] = Buffer((T, E), "float32")
    sw = strides_of(strides, "wo", (M, F))
    se = strides_of(strides, "experts", (1, E, F))[1:]  # experts[0]
    sp = strides_of(strides, "probs", (T, E)) if given else (E, 1) if save else (0, 0)
    scalars = dict(
        T=T, M=M, F=F, E=E, T_BUCKET=t_bucket(T), F_SLOTS=triton.cdiv(F, up_f_chunk(pb)) if self_routed else 0,
        stride_ut=F, stride_uf=1, stride_wom=sw[0], stride_wof=sw[1], stride_ee=se[0], stride_ef=se[1],
        stride_lj=T * E if self_routed else 0, stride_lt=E if self_routed else 0,
        stride_pt=sp[0], stride_pe=sp[1], stride_yt=M, stride_ym=1,
    )  # fmt: skip
    cx = dict(
        ROUTING=pb.mode, TOP_K=pb.top_k, RENORMALIZE=pb.renormalize, SAVE_P_SOFT=save,
        DOT_PRECISION=pb.precisions["DOT_PRECISION"], BLOCK_E=pb.block_e,
    )  # fmt: skip
    launch = Launch(
        role="down", name="pemoe_mov_ffn_down", kernel=_ffn_down_kernel,
        inputs=("inter", "wo", "experts", "logits_part" if self_routed else None, "probs" if given else None),
        outputs=("y", "p_soft" if save else None),
        scalars=scalars, constexprs=cx, grid=tile_grid(T, M, "BLOCK_N"),
        configs=_configs(_ffn_down_kernel, pb, {"BLOCK_M": T, "BLOCK_N": M, "BLOCK_K": F}),
    )  # fmt: skip
    return buffers, launch


def down_backward_launch(
    pb: Problem,
    need_du: bool,
    need_dp: bool,
    need_dexperts: bool,
    strides: dict[str, tuple[int, ...]] | None = None,
) -> tuple[dict[str, Buffer], Launch]:
    """(c) on dy, wo, inter (u), experts and p (p_soft when self-routed, probs when given): buffers du [T, F]
    (x's dtype), the dp partials "dp_part" [F chunks, T, E] and d experts partials "dexperts_part" [row chunks, E, F]
    (float32, every slot written: their sums are dp and d experts), each when needed (:func:`down_backward_chunks`)."""
    T, M, F, E = pb.T, pb.M, pb.F, pb.E
    chunk, cols = down_backward_chunks(pb)
    buffers = {}
    if need_du:
        buffers["du"] = Buffer((T, F), pb.dtype)
    if need_dp:
        buffers["dp_part"] = Buffer((triton.cdiv(F, cols), T, E), "float32")
    if need_dexperts:
        buffers["dexperts_part"] = Buffer((triton.cdiv(T, chunk), E, F), "float32")
    p_name = {ROUTE_SELF: "p_soft", ROUTE_GIVEN: "probs", ROUTE_NONE: None}[pb.mode]
    sdy = strides_of(strides, "dy", (T, M))
    sw = strides_of(strides, "wo", (M, F))
    su = strides_of(strides, "inter", (T, F))
    se = strides_of(strides, "experts", (1, E, F))[1:]
    sp = _strided(strides_of(strides, p_name, (T, E)) if p_name else None, p_name is not None)
    sdp = _strided(buffers["dp_part"].strides if need_dp else None, need_dp)
    sde = _strided(buffers["dexperts_part"].strides if need_dexperts else None, need_dexperts)
    scalars = dict(
        T=T, M=M, F=F, E=E, T_BUCKET=t_bucket(T), ROW_CHUNK=chunk, F_CHUNK=cols,
        stride_dyt=sdy[0], stride_dym=sdy[1], stride_wom=sw[0], stride_wof=sw[1],
        stride_ut=su[0], stride_uf=su[1], stride_ee=se[0], stride_ef=se[1],
        stride_pt=sp[0], stride_pe=sp[1],
        stride_dut=F if need_du else 0, stride_duf=1 if need_du else 0,
        stride_dpj=sdp[0], stride_dpt=sdp[1], stride_dej=sde[0], stride_dee=sde[1],
    )  # fmt: skip
    cx = dict(
        ROUTING=pb.mode, TOP_K=pb.top_k, RENORMALIZE=pb.renormalize,
        NEED_DU=need_du, NEED_DP=need_dp, NEED_DEXPERTS=need_dexperts, BLOCK_E=pb.block_e,
    )  # fmt: skip
    launch = Launch(
        role="down_backward", name="pemoe_mov_ffn_down_bwd", kernel=_ffn_down_backward_kernel,
        inputs=("dy", "wo", "inter", "experts", p_name),
        outputs=tuple(n if n in buffers else None for n in ("du", "dp_part", "dexperts_part")),
        scalars=scalars, constexprs={**cx, **pb.precisions}, grid=chunk_pair_grid(pb, chunk, cols),
        configs=_configs(_ffn_down_backward_kernel, pb, {"BLOCK_M": T, "BLOCK_F": F, "BLOCK_K": M}),
    )  # fmt: skip
    return buffers, launch


def router_backward_launch(pb: Problem) -> tuple[dict[str, Buffer], Launch]:
    """(r) on the cdiv(F, F_CHUNK) dp partials of (c) (and p_soft when self-routed): buffer "d_route" [T, E] float32,
    dlogits (self-routing) or d probs (given probs)."""
    T, E = pb.T, pb.E
    self_routed = pb.mode == ROUTE_SELF
    buffers = {"d_route": Buffer((T, E), "float32")}
    cx = dict(
        TOP_K=pb.top_k, RENORMALIZE=pb.renormalize, SELF_ROUTED=self_routed,
        BLOCK_M=ROUTER_BACKWARD_CONFIG["BLOCK_M"], BLOCK_E=pb.block_e,
    )  # fmt: skip
    launch = Launch(
        role="router_backward", name="pemoe_mov_ffn_router_bwd", kernel=_router_backward_kernel,
        inputs=("dp_part", "p_soft" if self_routed else None), outputs=("d_route",),
        scalars=dict(T=T, E=E, F_SLOTS=triton.cdiv(pb.F, down_backward_chunks(pb)[1]), stride_dpj=T * E),
        constexprs=cx, grid=lambda meta: router_backward_grid(T),
        configs=(triton.Config({}, num_warps=ROUTER_BACKWARD_CONFIG["num_warps"]),),
    )  # fmt: skip
    return buffers, launch


def up_backward_launch(
    pb: Problem, need_dh: bool, need_drouter: bool, strides: dict[str, tuple[int, ...]] | None = None
) -> tuple[dict[str, Buffer], Launch]:
    """(d) on x, the weights, router, du and d_route (dlogits): buffers dh0, dg [T, F] (x's dtype; dg gated only)
    and the d router partials "drouter_part" [row chunks, F, E] float32 (every slot written: their sum is d router),
    each when needed."""
    T, M, F, E = pb.T, pb.M, pb.F, pb.E
    self_routed = pb.mode == ROUTE_SELF
    chunk = row_chunk(pb, _ffn_up_backward_kernel.configs)
    buffers = {}
    if need_dh:
        buffers["dh0"] = Buffer((T, F), pb.dtype)
        if pb.gated:
            buffers["dg"] = Buffer((T, F), pb.dtype)
    if need_drouter:
        buffers["drouter_part"] = Buffer((triton.cdiv(T, chunk), F, E), "float32")
    sx = strides_of(strides, "x", (T, M))
    s0 = strides_of(strides, "wi_0", (F, M))
    s1 = strides_of(strides, "wi_1", (F, M)) if pb.gated else s0
    sr = _strided(strides_of(strides, "router", (F, E)), self_routed)
    sdu = _strided(strides_of(strides, "du", (T, F)), need_dh)
    sdr = _strided(buffers["drouter_part"].strides if need_drouter else None, need_drouter)
    dh, dg = (F, 1) if need_dh else (0, 0), (F, 1) if need_dh and pb.gated else (0, 0)
    scalars = dict(
        T=T, M=M, F=F, E=E, T_BUCKET=t_bucket(T), ROW_CHUNK=chunk,
        stride_xt=sx[0], stride_xm=sx[1], stride_w0f=s0[0], stride_w0m=s0[1], stride_w1f=s1[0], stride_w1m=s1[1],
        stride_rf=sr[0], stride_re=sr[1], stride_dut=sdu[0], stride_duf=sdu[1],
        stride_dht=dh[0], stride_dhf=dh[1], stride_dgt=dg[0], stride_dgf=dg[1], stride_drj=sdr[0], stride_drf=sdr[1],
    )  # fmt: skip
    cx = dict(
        ACTIVATION=pb.activation, GATED=pb.gated, SELF_ROUTED=self_routed,
        NEED_DH=need_dh, NEED_DROUTER=need_drouter, BLOCK_E=pb.block_e,
    )  # fmt: skip
    launch = Launch(
        role="up_backward", name="pemoe_mov_ffn_up_bwd", kernel=_ffn_up_backward_kernel,
        inputs=(
            "x", "wi_0", "wi_1" if pb.gated else None, "router" if self_routed else None,
            "du" if need_dh else None, "d_route" if self_routed else None,
        ),
        outputs=tuple(n if n in buffers else None for n in ("dh0", "dg", "drouter_part")),
        scalars=scalars, constexprs={**cx, **pb.precisions}, grid=chunk_grid(pb, chunk, "BLOCK_F"),
        configs=_configs(_ffn_up_backward_kernel, pb, {"BLOCK_M": T, "BLOCK_F": F, "BLOCK_K": M}),
    )  # fmt: skip
    return buffers, launch


def backward_needs(pb: Problem, need_x: bool, need_router: bool, need_experts: bool, need_probs: bool) -> dict:
    """Which of (c), (r), (d) run and what they produce for the gradients asked for."""
    self_routed = pb.mode == ROUTE_SELF
    need_drouter = need_router and self_routed
    need_dlogits = self_routed and (need_x or need_drouter)
    need_dp = need_dlogits or (pb.mode == ROUTE_GIVEN and need_probs)
    return dict(need_du=need_x, need_dp=need_dp, need_dexperts=need_experts, need_drouter=need_drouter,
                run_up_backward=need_x or need_drouter)  # fmt: skip


# ------------------------------------------------------------------------------------------
# Launcher and autograd (PyTorch): mov_ffn_torch.py, loaded with this module when torch is installed (its
# entry point mov_ffn and the custom ops are attributes of this module); without torch (JAX) this module
# holds the kernels and the launch plan alone.
# ------------------------------------------------------------------------------------------

_torch_part = load_torch_part(__name__)


def __getattr__(name: str):
    return torch_attribute(_torch_part, __name__, name)
