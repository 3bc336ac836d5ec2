"""Fused MoV T5 feed-forward block, forward, in Pallas (SPEC §3 item 2): two kernels.

Math (SPEC §1–§2), x [T, M], wi_0 / wi_1 [F, M] and wo [M, F] (frozen, torch Linear layout, x's dtype),
router [F, E] float32 (None: (IA)3, E = 1), experts [1, E, F] float32:
    h0 = x·wi_0ᵀ, a = act(h0), g = x·wi_1ᵀ                    [T, F]   float32 accumulators
    u  = a ⊙ g  (gated, T5 v1.1)   or   u = a  (T5 v1.0)        [T, F]   stored in x's dtype
    p  = softmax(a·router)                                     [T, E]   float32 (the router reads the
                                                                        unscaled activation a)
    s  = p·experts[0]                                          [T, F]   the merged scaling, never stored
    y  = (u ⊙ s)·woᵀ                                           [T, M]   x's dtype
(mov scales a per column by s and the gate multiplies afterwards; (a ⊙ s) ⊙ g = (a ⊙ g) ⊙ s, so the
scaling moves to the second GEMM's operand.) act ∈ {gelu_new (tanh form), gelu (erf form), relu, silu}.

Kernels (TPU, Mosaic):
  (a) ``_ffn_up_kernel``, grid (T / block_t, F / up_block_f, M / up_block_k): the dual GEMM accumulates
      x·wi_0ᵀ and x·wi_1ᵀ tiles in float32 VMEM over M (innermost axis). Epilogue at the last M step:
      act, writes u (and, for the backward, h0 and g), and adds the tile's router logits a_tile·router[f]
      into the row block's [block_t, E_pad] float32 output block, which stays in VMEM while the F axis
      runs ("arbitrary": F is a reduction axis of the logits); at the last F tile the row's logits are
      complete and the float32 softmax replaces them in place. Output: p [T, E_pad] float32.
  (b) ``_ffn_down_kernel``, grid (T / block_t, M / down_block_n, F / down_block_k): the wo GEMM. Prologue
      on each A-operand tile: s = p·experts[:, f-slice] (one small MXU matmul), u_tile ⊙ s rounded to x's
      dtype, then acc += (u ⊙ s)·wo_tileᵀ. The merge is recomputed once per output column block, so the
      default down_block_n is the whole model width when VMEM allows (M ≤ 2048 for 16-bit).
The softmax sits in (a)'s last epilogue rather than in (b)'s prologue: F is sequential in (a), so the
probabilities are ready there once per row block, instead of being recomputed by every column block of
(b); the backward needs them anyway. Top-k selection or sentence routing (given probabilities) are
applied by the caller between the two kernels, on the [T, E] array: (b) takes any p.

Lanes: the expert dimension is padded to E_pad = 128·⌈E/128⌉ (zero router columns and expert rows;
padded logits masked to -inf, so padded probabilities are exactly 0), so every small matmul is
lane-aligned. p is stored lane-padded [T, E_pad]; XLA's TPU layout tiles a float32 [T, E] array by
(8, 128) in HBM anyway, so this costs no more HBM bytes than [T, E].
HBM traffic beyond a plain FFN: p [T, E_pad] float32 (written by (a), read by (b)), router and experts.

Numerics: accumulation and element-wise math in float32. 16-bit activations: the router reads a rounded
to x's dtype (as the reference does) against the float32 router split into two 16-bit halves
(router ≈ hi + lo; two [block_t, block_f]·[block_f, E_pad] matmuls, float32 accumulation: logits
accurate to about 2⁻¹⁶ of the router at two 16-bit MXU passes); the merge s = p·experts runs in x's
dtype with float32 accumulation (s is rounded once, to the precision u ⊙ s is rounded to anyway).
Float32 activations: every dot at Precision.HIGHEST.
MXU work beyond the FFN's three GEMMs: (a) 2·E_pad / (2·M) of its GEMM work (17 % at M = 768, 6 % at
M = 2048); (b) E_pad / down_block_n (same figures with down_block_n = M).

Backward: none here (the JAX side, ``pemoe.jax.pallas``, runs an explicit XLA backward); with
``save_residuals=True`` kernel (a) also writes h0 and g (x's dtype) for it.

GPU (``backend="gpu"``: Pallas' Triton lowering). Triton programs run concurrently, so nothing may be
carried across grid steps and there is no VMEM scratch: the GPU twins ``_ffn_up_kernel_gpu`` (grid
(T / block_t, F / up_block_f)) and ``_ffn_down_kernel_gpu`` (grid (T / block_t, M / down_block_n)) loop
over their reduction dimension inside the program (masked loads: any T, M, F), with the same epilogue /
prologue math (shared helpers below). (a) writes each F tile's logits into a split buffer
[F / up_block_f, T, E_pad] float32 (no atomics: deterministic), and the sum over F tiles and the softmax
run as one small XLA fusion between the kernels. That buffer is the GPU path's traffic beyond a plain FFN:
(F / up_block_f)·E_pad·4 bytes per token written and read (5 KiB at T5-XL, F = 5120, E ≤ 16, defaults;
u itself is 10 KiB). Blocks: :class:`MoVFFNTritonBlocks` (powers of two ≥ 16, tl.dot's minimum);
E_pad = max(16, next power of two ≥ E). Float32 activations use IEEE float32 dots (Precision.HIGHEST),
as on TPU. The erf of "gelu" is a rational approximation there (no erf in the
Triton lowering; see ``_erf_rational``).

This module never imports the rest of pemoe.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from ._blocks import check_positive_ints, check_triton_tile
from ._tpu import LANES, SUBLANES, check_output_block, check_reduction_block

__all__ = [
    "ACTIVATIONS",
    "LANES",
    "SUBLANES",
    "VMEM_BUDGET",
    "ExportCase",
    "MoVFFNBlocks",
    "MoVFFNTritonBlocks",
    "UpResult",
    "export_cases",
    "get_default",
    "get_default_triton",
    "mov_ffn",
    "mov_ffn_down",
    "mov_ffn_up",
    "pad_experts",
]

#: TPU vreg tile: the last two dims of a block are multiples of (SUBLANES, LANES) or the full dims.
#: VMEM one kernel may use (double-buffered blocks + scratch): 16 MiB is the default scoped VMEM limit of
#: TPU v4 / v5e; the defaults keep 4 MiB of it free for Mosaic's own scratch.
VMEM_BUDGET = 16 * 2**20
_DEFAULT_VMEM_TARGET = 12 * 2**20
ACTIVATIONS = ("gelu_new", "gelu", "relu", "silu")
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


BACKENDS = ("tpu", "gpu")


def padded_experts(num_experts: int, backend: str = "tpu") -> int:
    """E rounded up to whole lanes (128) on TPU; to a power of two ≥ 16 (tl.dot's minimum) on GPU."""
    if backend == "gpu":
        return max(16, pl.next_power_of_2(num_experts))
    return LANES * math.ceil(num_experts / LANES)


# ------------------------------------------------------------------------------------------
# Block sizes: data, validated against the problem and the TPU layout rules
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoVFFNBlocks:
    """Tiles of the two kernels (T tokens, M model width, F FFN width).

    (a) up: output tile [block_t, up_block_f] of u (and of the logits' F reduction), accumulated over
        up_block_k of M.   (b) down: output tile [block_t, down_block_n] of y, accumulated over
        down_block_k of F.

    Rules (checked by :meth:`validate`, each error names the rule it broke):
      * block_t is T, or a multiple of 8 no larger than T (a partial last row block is fine);
      * up_block_f is F, or a multiple of 128 that divides F (the router logits reduce over every F tile:
        no partial tile may add padding columns to them);
      * up_block_k is M, or a multiple of 128 that divides M (no partial reduction block);
      * down_block_n is M, or a multiple of 128 no larger than M (a partial last column block is fine);
      * down_block_k is F, or a multiple of 128 that divides F (no partial reduction block);
      * each kernel's VMEM (double-buffered blocks and scratch, :meth:`vmem_bytes`) fits VMEM_BUDGET.
    """

    block_t: int = 256
    up_block_f: int = 512
    up_block_k: int = 512
    down_block_n: int = 512
    down_block_k: int = 512

    def __post_init__(self) -> None:
        check_positive_ints(self)

    def vmem_bytes(self, *, e: int, itemsize: int, gated: bool = True) -> tuple[int, int]:
        """Estimated VMEM bytes of kernels (a) and (b): every block double-buffered, plus the scratch (the
        epilogue's float32 temporaries are not counted: the defaults leave VMEM_BUDGET - 12 MiB for them)."""
        e_pad = padded_experts(e)
        bt, bf, bk, bn, bfk = self.block_t, self.up_block_f, self.up_block_k, self.down_block_n, self.down_block_k
        w = 2 if gated else 1  # weight matrices and accumulators of the (dual) GEMM
        router_cols = e_pad if itemsize == 4 else 2 * e_pad
        up_blocks = (
            bt * bk * itemsize  # x
            + w * bf * bk * itemsize  # wi_0 (wi_1)
            + bf * router_cols * max(itemsize, 2)  # router (hi | lo halves for 16-bit)
            + (1 + w) * bt * bf * itemsize  # u, h0 (g)
            + bt * e_pad * 4  # p
        )
        up = 2 * up_blocks + w * bt * bf * 4
        down_blocks = (
            bt * bfk * itemsize  # u
            + bt * e_pad * 4  # p
            + e_pad * bfk * itemsize  # experts
            + bn * bfk * itemsize  # wo
            + bt * bn * itemsize  # y
        )
        down = 2 * down_blocks + bt * bn * 4
        return up, down

    def validate(self, *, t: int, f: int, k: int, e: int = 1, itemsize: int = 2, gated: bool = True) -> None:
        """Raise ValueError if these blocks cannot tile T = t, F = f, M = k (model width) on TPU."""
        check_output_block("block_t", self.block_t, "T", t, SUBLANES)
        for name, size, dim in (("up_block_f", f, "F"), ("up_block_k", k, "M"), ("down_block_k", f, "F")):
            check_reduction_block(name, getattr(self, name), dim, size)
        check_output_block("down_block_n", self.down_block_n, "M", k, LANES)
        usage = self.vmem_bytes(e=e, itemsize=itemsize, gated=gated)
        for kernel, used in zip(("(a) up", "(b) down"), usage, strict=True):
            if used > VMEM_BUDGET:
                raise ValueError(
                    f"kernel {kernel} needs about {used / 2**20:.1f} MiB of VMEM with {self}, over the "
                    f"{VMEM_BUDGET // 2**20} MiB budget (VMEM_BUDGET); use smaller blocks"
                )


def _dividing(size: int, candidates: tuple[int, ...]) -> list[int]:
    """size itself when it is not lane-tileable, else the candidates (multiples of 128) that divide it."""
    fits = [c for c in candidates if c <= size and size % c == 0]
    return fits or [size]


def get_default(t: int, f: int, k: int, e: int, *, itemsize: int = 2, gated: bool = True) -> MoVFFNBlocks:
    """TPU-legal default tiles for T = t tokens, FFN width F = f, model width M = k and E = e experts.

    block_t = min(T, 256). Kernel (a): the reduction block the whole of M when it fits (x's row block
    then stays in VMEM across the F tiles: x is read once), then the largest F block. Kernel (b): the
    column block the whole of M up to 2048 (the merge then runs once per A tile), then the largest F
    block. Each kernel takes the first choice whose VMEM estimate fits 12 MiB (VMEM_BUDGET less headroom
    for Mosaic's internal scratch); ``itemsize`` is x's dtype's (2 for bfloat16, 4 for float32).
    """
    block_t = t if t <= 256 else 256
    f_blocks = _dividing(f, (512, 256, 128))
    up_ks = sorted({k, *_dividing(k, (2048, 1024, 512, 256, 128))}, reverse=True)
    down_ns = sorted({min(k, 2048), *(n for n in (1024, 512, 256, 128) if n < k)}, reverse=True)

    def first(pairs, which: int) -> tuple[int, int]:
        pairs = list(pairs)
        for pair in pairs:
            trial = MoVFFNBlocks(block_t, pair[1], pair[0], pair[0], pair[1])
            if trial.vmem_bytes(e=e, itemsize=itemsize, gated=gated)[which] <= _DEFAULT_VMEM_TARGET:
                return pair
        return pairs[-1]  # the smallest: validate below says whether it fits at all

    up_k, up_f = first(((bk, bf) for bk in up_ks for bf in f_blocks), 0)
    down_n, down_k = first(((bn, bf) for bn in down_ns for bf in f_blocks), 1)
    blocks = MoVFFNBlocks(block_t, up_f, up_k, down_n, down_k)
    blocks.validate(t=t, f=f, k=k, e=e, itemsize=itemsize, gated=gated)
    return blocks


@dataclasses.dataclass(frozen=True)
class MoVFFNTritonBlocks:
    """Tiles of the GPU (Triton lowering) kernels: the same fields as :class:`MoVFFNBlocks` (the reduction
    blocks are the in-program loop's steps) plus Triton's num_warps / num_stages.

    Rules (:meth:`validate`): every block a power of two ≥ 16 (Triton tensor shapes; tl.dot's minimum);
    num_warps one of 1, 2, 4, 8, 16; num_stages ≥ 1. Edges are masked, so any T, M, F is fine.
    """

    block_t: int = 64
    up_block_f: int = 64
    up_block_k: int = 64
    down_block_n: int = 64
    down_block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        check_positive_ints(self)

    def validate(self, *, t: int = 0, f: int = 0, k: int = 0, e: int = 1, itemsize: int = 2, gated: bool = True):
        """Raise ValueError naming the broken rule (the problem sizes do not constrain GPU blocks)."""
        del t, f, k, e, itemsize, gated
        for name in ("block_t", "up_block_f", "up_block_k", "down_block_n", "down_block_k"):
            check_triton_tile(name, getattr(self, name))
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")


def get_default_triton(t: int, f: int, k: int, e: int, *, itemsize: int = 2, gated: bool = True) -> MoVFFNTritonBlocks:
    """GPU default tiles: 64×64 output tiles (16 ≤ block_t ≤ 64, following T), reduction steps of 128 bytes
    (64 elements for 16-bit operands, 32 for float32), after the PyTorch-side Triton kernels' defaults
    (kernels/triton/mov_ffn.py). Not timed nor checked for register spills (no GPU here)."""
    del f, k, e, gated
    block_t = min(64, max(16, pl.next_power_of_2(max(t, 1))))
    step = 64 if itemsize <= 2 else 32
    return MoVFFNTritonBlocks(block_t, 64, step, 64, step)


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------


NT = (((1,), (1,)), ((), ()))  # dot_general dimension numbers of a·bᵀ (contract the last dims)


def _precision(dtype):
    """IEEE float32 dots for float32 operands (TPU: 6-pass MXU; GPU: no TF32); the default for 16-bit."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _gemm_nt(a, b):
    """a·bᵀ with float32 accumulation."""
    return jax.lax.dot_general(a, b, NT, precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def _erf_rational(z):
    """erf(z) by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7; ~5e-7 in float32 arithmetic), for the GPU
    kernels: Pallas' Triton lowering has no erf. Only gelu(h) = h·(1 + erf(h/√2))/2 uses it, whose
    relative error it keeps below 1e-6 (1 + erf has no cancellation there)."""
    a = jnp.abs(z)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    r = 1.0 - poly * jnp.exp(-a * a)
    return jnp.where(z < 0.0, -r, r)


def _activation(h, activation: str, erf=jax.lax.erf):
    """act(h) for float32 h."""
    if activation == "relu":
        return jnp.maximum(h, 0.0)
    if activation == "gelu":  # erf form
        return 0.5 * h * (1.0 + erf(h * 0.7071067811865476))
    if activation == "silu":  # h·sigmoid(h) (Llama); exp(-h) overflows to inf for h < -88: h / inf = -0
        return h / (1.0 + jnp.exp(-h))
    # "gelu_new": tanh approximation (T5 v1.1)
    return 0.5 * h * (1.0 + jnp.tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))


def _router_logits(a, router_hi, router_lo):
    """a·router as float32 [rows, E_pad]. 16-bit: a rounded to the activation dtype (as the reference)
    against router = hi + lo (two 16-bit dots, float32 accumulation); float32: one IEEE dot (lo is None)."""
    if router_lo is None:
        return jnp.dot(a, router_hi, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    a16 = a.astype(router_hi.dtype)
    return jnp.dot(a16, router_hi, preferred_element_type=jnp.float32) + jnp.dot(
        a16, router_lo, preferred_element_type=jnp.float32
    )


def _softmax_lanes(logits, num_experts: int):
    """Row softmax over the first num_experts lanes of [rows, E_pad]; padded lanes get exactly 0."""
    lane = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    logits = jnp.where(lane < num_experts, logits, -jnp.inf)
    unnorm = jnp.exp(logits - logits.max(axis=1, keepdims=True))
    return unnorm / unnorm.sum(axis=1, keepdims=True)


def _scale_tile(u, p, experts, out_dtype):
    """z = u ⊙ s with s = p·experts (p [rows, E_pad] float32, experts [E_pad, cols]; p None: (IA)3 and
    experts the float32 row [1, cols]), rounded to out_dtype. The merge runs in experts' dtype (x's) with
    float32 accumulation, IEEE for float32."""
    if p is None:
        s = experts
    else:
        s = jnp.dot(
            p.astype(experts.dtype), experts, precision=_precision(experts.dtype), preferred_element_type=jnp.float32
        )
    return (u.astype(jnp.float32) * s).astype(out_dtype)


def _ffn_up_kernel(
    # inputs
    x_ref,  # [block_t, up_block_k]
    wi_0_ref,  # [up_block_f, up_block_k]
    wi_1_ref,  # [up_block_f, up_block_k] (gated) or None
    router_hi_ref,  # [up_block_f, E_pad]: float32 router (float32 x), or its high half in x's dtype; or None
    router_lo_ref,  # [up_block_f, E_pad] low half in x's dtype (16-bit x) or None
    # outputs
    u_ref,  # [block_t, up_block_f]
    p_ref,  # [block_t, E_pad] float32 (logits accumulated over F, then probabilities) or None
    h0_ref,  # [block_t, up_block_f] (save_residuals) or None
    g_ref,  # [block_t, up_block_f] (save_residuals and gated) or None
    # scratch
    acc0_ref,  # [block_t, up_block_f] float32
    acc1_ref,  # [block_t, up_block_f] float32 (gated) or None
    *,
    num_experts: int,
    activation: str,
):
    """TPU kernel (a), grid (T / block_t, F / up_block_f, M / up_block_k)."""
    f_step, k_step = pl.program_id(1), pl.program_id(2)
    gated = wi_1_ref is not None

    # ---- dual GEMM: acc0 += x·wi_0ᵀ, acc1 += x·wi_1ᵀ (float32 accumulation; x loaded once) ----
    @pl.when(k_step == 0)
    def _init():
        acc0_ref[...] = jnp.zeros_like(acc0_ref)
        if gated:
            acc1_ref[...] = jnp.zeros_like(acc1_ref)

    x = x_ref[...]
    acc0_ref[...] += _gemm_nt(x, wi_0_ref[...])
    if gated:
        acc1_ref[...] += _gemm_nt(x, wi_1_ref[...])

    # ---- epilogue at the last M step: act, u, residuals, this F tile's share of the router logits ----
    @pl.when(k_step == pl.num_programs(2) - 1)
    def _epilogue():
        h0 = acc0_ref[...]
        a = _activation(h0, activation)
        g = acc1_ref[...] if gated else None
        u_ref[...] = (a if g is None else a * g).astype(u_ref.dtype)
        if h0_ref is not None:
            h0_ref[...] = h0.astype(h0_ref.dtype)
        if g_ref is not None:
            g_ref[...] = g.astype(g_ref.dtype)
        if p_ref is None:
            return
        logits = _router_logits(a, router_hi_ref[...], None if router_lo_ref is None else router_lo_ref[...])

        @pl.when(f_step == 0)
        def _first():
            p_ref[...] = logits

        @pl.when(f_step > 0)
        def _add():
            p_ref[...] += logits

        # ---- the row block's logits are complete at its last F tile: float32 softmax in place ----
        @pl.when(f_step == pl.num_programs(1) - 1)
        def _softmax():
            p_ref[...] = _softmax_lanes(p_ref[...], num_experts)


def _ffn_down_kernel(
    # inputs
    u_ref,  # [block_t, down_block_k]
    p_ref,  # [block_t, E_pad] float32, or None ((IA)3)
    experts_ref,  # [E_pad, down_block_k] (x's dtype, float32 for float32 x); [1, down_block_k] float32 for (IA)3
    wo_ref,  # [down_block_n, down_block_k]
    # output
    y_ref,  # [block_t, down_block_n]
    # scratch
    acc_ref,  # [block_t, down_block_n] float32
):
    """TPU kernel (b), grid (T / block_t, M / down_block_n, F / down_block_k)."""
    k_step = pl.program_id(2)

    @pl.when(k_step == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    # ---- prologue on the A tile: z = u ⊙ (p·experts[:, f-slice]) in x's dtype; then acc += z·wo_tileᵀ ----
    z = _scale_tile(u_ref[...], None if p_ref is None else p_ref[...], experts_ref[...], wo_ref.dtype)
    acc_ref[...] += _gemm_nt(z, wo_ref[...])

    @pl.when(k_step == pl.num_programs(2) - 1)
    def _store():
        y_ref[...] = acc_ref[...].astype(y_ref.dtype)


def _tile_mask(row_ok, col_ok):
    return row_ok[:, None] & col_ok[None, :]


def _ffn_up_kernel_gpu(
    x_ref,  # [T, M] (whole arrays: the program slices its tiles)
    wi_0_ref,  # [F, M]
    wi_1_ref,  # [F, M] or None
    router_hi_ref,  # [F, E_pad] or None (as the TPU kernel's)
    router_lo_ref,  # [F, E_pad] or None
    u_ref,  # [T, F]
    part_ref,  # [F tiles, T, E_pad] float32: this F tile's logits, or None
    h0_ref,  # [T, F] or None
    g_ref,  # [T, F] or None
    *,
    activation: str,
    bt: int,
    bf: int,
    bk: int,
):
    """GPU kernel (a), grid (T / block_t, F / up_block_f); the M reduction loops inside the program."""
    (t, m), f = x_ref.shape, wi_0_ref.shape[0]
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * bt + jax.lax.iota(jnp.int32, bt)
    cols = j * bf + jax.lax.iota(jnp.int32, bf)
    row_ok, col_ok = rows < t, cols < f
    gated = wi_1_ref is not None

    def step(kk, accs):
        k_ok = kk * bk + jax.lax.iota(jnp.int32, bk) < m
        x = plgpu.load(x_ref.at[pl.ds(i * bt, bt), pl.ds(kk * bk, bk)], mask=_tile_mask(row_ok, k_ok), other=0.0)
        w_mask = _tile_mask(col_ok, k_ok)
        acc0 = accs[0] + _gemm_nt(
            x, plgpu.load(wi_0_ref.at[pl.ds(j * bf, bf), pl.ds(kk * bk, bk)], mask=w_mask, other=0.0)
        )
        if not gated:
            return (acc0,)
        w1 = plgpu.load(wi_1_ref.at[pl.ds(j * bf, bf), pl.ds(kk * bk, bk)], mask=w_mask, other=0.0)
        return acc0, accs[1] + _gemm_nt(x, w1)

    zeros = jnp.zeros((bt, bf), jnp.float32)
    accs = jax.lax.fori_loop(0, pl.cdiv(m, bk), step, (zeros, zeros) if gated else (zeros,))

    # ---- epilogue: act, u, residuals, this F tile's router logits (padding rows / columns are zeros) ----
    h0 = accs[0]
    a = _activation(h0, activation, erf=_erf_rational)
    g = accs[1] if gated else None
    tile = (pl.ds(i * bt, bt), pl.ds(j * bf, bf))
    mask = _tile_mask(row_ok, col_ok)
    plgpu.store(u_ref.at[tile], (a if g is None else a * g).astype(u_ref.dtype), mask=mask)
    if h0_ref is not None:
        plgpu.store(h0_ref.at[tile], h0.astype(h0_ref.dtype), mask=mask)
    if g_ref is not None:
        plgpu.store(g_ref.at[tile], g.astype(g_ref.dtype), mask=mask)
    if part_ref is not None:
        e_pad = part_ref.shape[2]
        r_mask = _tile_mask(col_ok, jax.lax.iota(jnp.int32, e_pad) >= 0)
        hi = plgpu.load(router_hi_ref.at[pl.ds(j * bf, bf), :], mask=r_mask, other=0.0)
        lo = (
            None
            if router_lo_ref is None
            else plgpu.load(router_lo_ref.at[pl.ds(j * bf, bf), :], mask=r_mask, other=0.0)
        )
        logits = _router_logits(a, hi, lo)
        p_mask = _tile_mask(row_ok, jax.lax.iota(jnp.int32, e_pad) >= 0)
        plgpu.store(part_ref.at[j, pl.ds(i * bt, bt), :], logits, mask=p_mask)


def _ffn_down_kernel_gpu(
    u_ref,  # [T, F]
    p_ref,  # [T, E_pad] float32 or None ((IA)3)
    experts_ref,  # [E_pad, F] (x's dtype; float32 for float32 x), or [1, F] float32 for (IA)3
    wo_ref,  # [M, F]
    y_ref,  # [T, M]
    *,
    bt: int,
    bn: int,
    bk: int,
):
    """GPU kernel (b), grid (T / block_t, M / down_block_n); the F reduction loops inside the program."""
    (t, f), m = u_ref.shape, wo_ref.shape[0]
    i, j = pl.program_id(0), pl.program_id(1)
    row_ok = i * bt + jax.lax.iota(jnp.int32, bt) < t
    col_ok = j * bn + jax.lax.iota(jnp.int32, bn) < m
    p = None
    if p_ref is not None:
        all_e = jax.lax.iota(jnp.int32, p_ref.shape[1]) >= 0
        p = plgpu.load(p_ref.at[pl.ds(i * bt, bt), :], mask=_tile_mask(row_ok, all_e), other=0.0)
    e_rows = jax.lax.iota(jnp.int32, experts_ref.shape[0]) >= 0

    def step(kk, acc):
        k_ok = kk * bk + jax.lax.iota(jnp.int32, bk) < f
        u = plgpu.load(u_ref.at[pl.ds(i * bt, bt), pl.ds(kk * bk, bk)], mask=_tile_mask(row_ok, k_ok), other=0.0)
        ex = plgpu.load(experts_ref.at[:, pl.ds(kk * bk, bk)], mask=_tile_mask(e_rows, k_ok), other=0.0)
        z = _scale_tile(u, p, ex, wo_ref.dtype)
        wo = plgpu.load(wo_ref.at[pl.ds(j * bn, bn), pl.ds(kk * bk, bk)], mask=_tile_mask(col_ok, k_ok), other=0.0)
        return acc + _gemm_nt(z, wo)

    acc = jax.lax.fori_loop(0, pl.cdiv(f, bk), step, jnp.zeros((bt, bn), jnp.float32))
    y_tile = (pl.ds(i * bt, bt), pl.ds(j * bn, bn))
    plgpu.store(y_ref.at[y_tile], acc.astype(y_ref.dtype), mask=_tile_mask(row_ok, col_ok))


# ------------------------------------------------------------------------------------------
# Launchers: validate, pad the expert dimension, grid, launch
# ------------------------------------------------------------------------------------------


def _shape(a) -> list[int]:
    return [int(s) for s in a.shape]


def _check_dtype(name: str, a, dtype) -> None:
    if a.dtype != dtype:
        raise TypeError(f"{name} must have x's dtype {dtype}, got {a.dtype}")


def _check_up(x, wi_0, wi_1, router, activation: str) -> tuple[int, int, int]:
    """(T, M, F) after checking x [T, M], wi_0 / wi_1 [F, M], router [F, E] or None."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.ndim != 2:
        raise ValueError(f"x must be [T, M], got shape {_shape(x)}")
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    t, m = x.shape
    if wi_0.ndim != 2 or wi_0.shape[1] != m:
        raise ValueError(f"wi_0 must be [F, M] with M = {m} (x's width), got shape {_shape(wi_0)}")
    _check_dtype("wi_0", wi_0, x.dtype)
    f = wi_0.shape[0]
    if wi_1 is not None:
        if tuple(wi_1.shape) != (f, m):
            raise ValueError(f"wi_1 must be [F, M] = [{f}, {m}] (wi_0's shape), got shape {_shape(wi_1)}")
        _check_dtype("wi_1", wi_1, x.dtype)
    if router is not None and (router.ndim != 2 or router.shape[0] != f):
        raise ValueError(f"router must be [F, E] with F = {f}, got shape {_shape(router)}")
    return t, m, f


def _check_experts_wo(experts, wo, *, t: int, m: int | None, f: int, dtype, num_experts: int | None) -> int:
    """E after checking experts [1, E, F] (E = num_experts when given) and wo [M, F] in x's dtype."""
    if experts.ndim != 3 or experts.shape[0] != 1 or experts.shape[2] != f or experts.shape[1] < 1:
        raise ValueError(f"experts must be [1, E, F] with F = {f} and E >= 1, got shape {_shape(experts)}")
    e = experts.shape[1]
    if num_experts is not None and e != num_experts:
        raise ValueError(f"experts must be [1, E, F] with E = {num_experts} (the router's E), got E = {e}")
    if wo.ndim != 2 or wo.shape[1] != f or (m is not None and wo.shape[0] != m):
        want = f"[M, F] = [{m}, {f}]" if m is not None else f"[M, F] with F = {f}"
        raise ValueError(f"wo must be {want}, got shape {_shape(wo)}")
    _check_dtype("wo", wo, dtype)
    return e


def _check_down(u, probs, experts, wo, backend: str) -> tuple[int, int, int, int]:
    """(T, M, F, E) after checking u [T, F], probs [T, E] / [T, E_pad] or None, experts [1, E, F], wo [M, F]."""
    if u.ndim != 2:
        raise ValueError(f"u must be [T, F], got shape {_shape(u)}")
    if jnp.dtype(u.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"u must be float32, bfloat16 or float16, got {u.dtype}")
    t, f = u.shape
    e = _check_experts_wo(experts, wo, t=t, m=None, f=f, dtype=u.dtype, num_experts=None)
    e_pad = padded_experts(e, backend)
    if probs is None and e != 1:
        raise ValueError(f"probs are required when E > 1 (E = {e}); None means (IA)3")
    if probs is not None and tuple(probs.shape) not in ((t, e), (t, e_pad)):
        raise ValueError(f"probs must be [T, E] = [{t}, {e}] (or padded [{t}, {e_pad}]), got {_shape(probs)}")
    return t, wo.shape[0], f, e


def _blocks(blocks, backend, t, f, m, e, itemsize, gated):
    """The validated blocks for ``backend``: the given ones or the default."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kind, default = (MoVFFNBlocks, get_default) if backend == "tpu" else (MoVFFNTritonBlocks, get_default_triton)
    blocks = blocks or default(t, f, m, e, itemsize=itemsize, gated=gated)
    if not isinstance(blocks, kind):
        raise TypeError(f"blocks must be a {kind.__name__} (backend {backend!r}) or None, got {type(blocks).__name__}")
    blocks.validate(t=t, f=f, k=m, e=e, itemsize=itemsize, gated=gated)
    return blocks


class UpResult(NamedTuple):
    """Outputs of kernel (a): u [T, F] (x's dtype); p [T, E_pad] float32 (None without a router);
    h0 and g [T, F] (x's dtype) with save_residuals (g None when ungated), else None."""

    u: jax.Array
    p: jax.Array | None
    h0: jax.Array | None
    g: jax.Array | None


def pad_experts(experts: jax.Array, dtype, backend: str = "tpu") -> jax.Array:
    """experts [1, E, F] float32 -> [E_pad, F] in ``dtype`` (zero rows past E), kernel (b)'s operand."""
    e = experts.shape[1]
    return jnp.pad(experts[0].astype(jnp.float32), ((0, padded_experts(e, backend) - e), (0, 0))).astype(dtype)


def _router_halves(router, e_pad: int, dt):
    """router [F, E] float32 -> (hi, lo) [F, E_pad] zero-padded: (router, None) for float32 x, else the
    x-dtype halves with hi + lo ≈ router to about 16 mantissa bits."""
    e = router.shape[1]
    r = jnp.pad(router.astype(jnp.float32), ((0, 0), (0, e_pad - e)))
    if jnp.dtype(dt) == jnp.float32:
        return r, None
    hi = r.astype(dt)
    return hi, (r - hi.astype(jnp.float32)).astype(dt)


@functools.partial(
    jax.jit, static_argnames=("num_experts", "activation", "save_residuals", "blocks", "backend", "interpret")
)
def mov_ffn_up(
    x: jax.Array,
    wi_0: jax.Array,
    wi_1: jax.Array | None,
    router: jax.Array | None,
    *,
    num_experts: int | None = None,
    activation: str = "gelu_new",
    save_residuals: bool = False,
    blocks: MoVFFNBlocks | MoVFFNTritonBlocks | None = None,
    backend: str = "tpu",
    interpret: bool = False,
) -> UpResult:
    """Kernel (a): u = act(x wi_0ᵀ) [⊙ x wi_1ᵀ] and p = softmax(act(x wi_0ᵀ)·router), see :class:`UpResult`.

    x [T, M]; wi_0, wi_1 [F, M] (wi_1 None: ungated); router [F, E] float32 or None. ``num_experts`` (E,
    for the VMEM estimate of the default blocks when router is None) defaults to the router's E or 1.
    ``backend``: "tpu" (Mosaic) or "gpu" (Triton lowering; the softmax then runs in XLA after the kernel).
    """
    t, m, f = _check_up(x, wi_0, wi_1, router, activation)
    e = router.shape[1] if router is not None else (num_experts or 1)
    gated, has_router, dt = wi_1 is not None, router is not None, x.dtype
    blocks = _blocks(blocks, backend, max(t, 1), f, m, e, jnp.dtype(dt).itemsize, gated)
    e_pad = padded_experts(e, backend)
    n_res = (2 if gated else 1) if save_residuals else 0
    if t == 0:  # empty batch: nothing to launch
        empty = jnp.zeros((0, f), dt)
        p = jnp.zeros((0, e_pad), jnp.float32) if has_router else None
        return UpResult(empty, p, *([empty] * n_res + [None] * (2 - n_res)))

    halves = _router_halves(router, e_pad, dt) if has_router else (None, None)
    inputs = [x, wi_0, wi_1, *halves]  # None entries are absent kernel operands
    bt, bf = blocks.block_t, blocks.up_block_f
    nf = pl.cdiv(f, bf)
    tpu = backend == "tpu"
    out_shape = {"u": jax.ShapeDtypeStruct((t, f), dt)}
    if has_router:
        out_shape["p"] = jax.ShapeDtypeStruct((t, e_pad) if tpu else (nf, t, e_pad), jnp.float32)
    if save_residuals:
        out_shape["h0"] = jax.ShapeDtypeStruct((t, f), dt)
        if gated:
            out_shape["g"] = jax.ShapeDtypeStruct((t, f), dt)
    present = [v for v in inputs if v is not None]

    def kernel(*refs):  # unflatten the present refs into the kernels' fixed signatures (absent: None)
        it = iter(refs)
        ins = [None if v is None else next(it) for v in inputs]
        outs = [next(it) if k in out_shape else None for k in ("u", "p", "h0", "g")]
        if tpu:
            acc = [next(it), next(it) if gated else None]
            _ffn_up_kernel(*ins, *outs, *acc, num_experts=e, activation=activation)
        else:
            _ffn_up_kernel_gpu(*ins, *outs, activation=activation, bt=bt, bf=bf, bk=blocks.up_block_k)

    if tpu:
        bk = blocks.up_block_k
        specs = {
            "x": pl.BlockSpec((bt, bk), lambda i, j, kk: (i, kk)),
            "w": pl.BlockSpec((bf, bk), lambda i, j, kk: (j, kk)),
            "r": pl.BlockSpec((bf, e_pad), lambda i, j, kk: (j, 0)),
        }
        in_specs = [specs[k] for k, v in zip(("x", "w", "w", "r", "r"), inputs, strict=True) if v is not None]
        tile = pl.BlockSpec((bt, bf), lambda i, j, kk: (i, j))
        probs_spec = pl.BlockSpec((bt, e_pad), lambda i, j, kk: (i, 0))
        outs = pl.pallas_call(
            kernel,
            grid=(pl.cdiv(t, bt), f // bf, m // bk),
            in_specs=in_specs,
            out_specs=[probs_spec if k == "p" else tile for k in out_shape],
            out_shape=list(out_shape.values()),
            scratch_shapes=[pltpu.VMEM((bt, bf), jnp.float32)] * (2 if gated else 1),
            # F is a reduction axis of the router logits (their block stays in VMEM across it): "arbitrary"
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
            interpret=interpret,
        )(*present)
    else:
        outs = pl.pallas_call(
            kernel,
            grid=(pl.cdiv(t, bt), nf),
            out_shape=list(out_shape.values()),
            compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
            interpret=interpret,
        )(*present)
    res = dict(zip(out_shape, outs, strict=True))
    if has_router and not tpu:  # the F tiles' logits: summed in a fixed order, float32 softmax (XLA)
        res["p"] = _softmax_lanes(res["p"].sum(axis=0), e)
    return UpResult(res["u"], res.get("p"), res.get("h0"), res.get("g"))


@functools.partial(jax.jit, static_argnames=("blocks", "backend", "interpret"))
def mov_ffn_down(
    u: jax.Array,
    probs: jax.Array | None,
    experts: jax.Array,
    wo: jax.Array,
    *,
    blocks: MoVFFNBlocks | MoVFFNTritonBlocks | None = None,
    backend: str = "tpu",
    interpret: bool = False,
) -> jax.Array:
    """Kernel (b): y = (u ⊙ (p·experts[0]))·woᵀ, u [T, F], probs [T, E] or [T, E_pad] float32 (None: (IA)3,
    E = 1), experts [1, E, F] float32, wo [M, F] -> [T, M] in u's dtype. The blocks' (a) fields are unused."""
    t, m, f, e = _check_down(u, probs, experts, wo, backend)
    dt = u.dtype
    blocks = _blocks(blocks, backend, max(t, 1), f, m, e, jnp.dtype(dt).itemsize, True)
    if t == 0:  # empty batch: nothing to launch
        return jnp.zeros((0, m), dt)
    e_pad = padded_experts(e, backend)
    bt, bn = blocks.block_t, blocks.down_block_n

    if probs is not None:
        p = probs.astype(jnp.float32)
        if p.shape[1] != e_pad:
            p = jnp.pad(p, ((0, 0), (0, e_pad - e)))
        experts_op = pad_experts(experts, jnp.float32 if dt == jnp.float32 else dt, backend)
    else:  # (IA)3: s = experts[0, 0], one float32 row
        p, experts_op = None, experts[0].astype(jnp.float32)
    present = [v for v in (u, p, experts_op, wo) if v is not None]

    def kernel(*refs):
        if p is None:
            u_ref, e_ref, wo_ref, *rest = refs
            p_ref = None
        else:
            u_ref, p_ref, e_ref, wo_ref, *rest = refs
        if backend == "tpu":
            _ffn_down_kernel(u_ref, p_ref, e_ref, wo_ref, *rest)
        else:
            _ffn_down_kernel_gpu(u_ref, p_ref, e_ref, wo_ref, *rest, bt=bt, bn=bn, bk=blocks.down_block_k)

    if backend == "gpu":
        return pl.pallas_call(
            kernel,
            grid=(pl.cdiv(t, bt), pl.cdiv(m, bn)),
            out_shape=jax.ShapeDtypeStruct((t, m), dt),
            compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
            interpret=interpret,
        )(*present)
    bk = blocks.down_block_k
    in_specs = [pl.BlockSpec((bt, bk), lambda i, j, kk: (i, kk))]
    if p is not None:
        in_specs.append(pl.BlockSpec((bt, e_pad), lambda i, j, kk: (i, 0)))
    in_specs += [
        pl.BlockSpec((experts_op.shape[0], bk), lambda i, j, kk: (0, kk)),
        pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk)),
    ]
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(t, bt), pl.cdiv(m, bn), f // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bt, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t, m), dt),
        scratch_shapes=[pltpu.VMEM((bt, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*present)


@functools.partial(jax.jit, static_argnames=("activation", "blocks", "backend", "interpret"))
def mov_ffn(
    x: jax.Array,
    wi_0: jax.Array,
    wo: jax.Array,
    router: jax.Array | None,
    experts: jax.Array,
    wi_1: jax.Array | None = None,
    *,
    activation: str = "gelu_new",
    blocks: MoVFFNBlocks | MoVFFNTritonBlocks | None = None,
    backend: str = "tpu",
    interpret: bool = False,
) -> jax.Array:
    """y = (mov(act(x wi_0ᵀ)) [⊙ x wi_1ᵀ])·woᵀ with soft routing: kernels (a) then (b).

    x [T, M]; wi_0, wi_1 [F, M]; wo [M, F] (x's dtype); router [F, E] float32 (None: (IA)3, E = 1);
    experts [1, E, F] float32 -> [T, M] in x's dtype. ``blocks`` defaults to the backend's default
    (:func:`get_default` / :func:`get_default_triton`); ``backend`` "tpu" (Mosaic) or "gpu" (Triton);
    ``interpret=True`` runs the Pallas interpreter (any machine). Forward only (see ``pemoe.jax.pallas``
    for the differentiable op with top-k and sentence routing).
    """
    t, m, f = _check_up(x, wi_0, wi_1, router, activation)
    e = _check_experts_wo(experts, wo, t=t, m=m, f=f, dtype=x.dtype,
                          num_experts=None if router is None else router.shape[1])  # fmt: skip
    if router is None and e != 1:
        raise ValueError(f"router is required when E > 1 (experts E = {e}); None means (IA)3")
    kw = dict(blocks=blocks, backend=backend, interpret=interpret)
    up = mov_ffn_up(x, wi_0, wi_1, router, num_experts=e, activation=activation, **kw)
    return mov_ffn_down(up.u, up.p, experts, wo, **kw)


# ------------------------------------------------------------------------------------------
# Export cases: T5 shapes with the default blocks (tests and the GPU/TPU export checks use them)
# ------------------------------------------------------------------------------------------

#: (d_model M, d_ff F) of T5 v1.1 base / large / XL.
T5_SHAPES = {"t5-base": (768, 2048), "t5-large": (1024, 2816), "t5-xl": (2048, 5120)}


class ExportCase(NamedTuple):
    """``jax.export.export(jax.jit(fn), platforms=[...])(*args)`` should succeed; out: (shape, dtype)."""

    name: str
    fn: object
    args: tuple
    out: tuple[tuple[int, ...], object]


def export_cases(
    tokens: int = 2048, num_experts: int = 10, dtype=jnp.bfloat16, backend: str = "tpu"
) -> list[ExportCase]:
    """The forward kernels at T5 base / large / XL shapes (gated gelu_new, E = num_experts, the backend's
    default blocks), plus T5 v1.0-style ungated relu, gated erf-gelu and (IA)3 at base width. Args are
    ShapeDtypeStructs; export with ``platforms=["tpu"]`` for backend "tpu", ``["cuda"]`` for "gpu" (with
    ``disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]``)."""
    cases = []
    act, f32 = dtype, jnp.float32
    mov_ffn_b = functools.partial(mov_ffn, backend=backend)

    def spec(*shape, dt=act):
        return jax.ShapeDtypeStruct(shape, dt)

    for name, (m, f) in T5_SHAPES.items():
        args = (spec(tokens, m), spec(f, m), spec(m, f), spec(f, num_experts, dt=f32),
                spec(1, num_experts, f, dt=f32), spec(f, m))  # fmt: skip
        cases.append(ExportCase(f"{name}-gated-E{num_experts}", mov_ffn_b, args, ((tokens, m), act)))
    m, f = T5_SHAPES["t5-base"]
    relu = functools.partial(mov_ffn, activation="relu", backend=backend)
    args = (spec(tokens, m), spec(f, m), spec(m, f), spec(f, num_experts, dt=f32), spec(1, num_experts, f, dt=f32))
    cases.append(ExportCase(f"t5-base-relu-E{num_experts}", relu, args, ((tokens, m), act)))
    gelu = functools.partial(mov_ffn, activation="gelu", backend=backend)
    cases.append(ExportCase(f"t5-base-gated-gelu-E{num_experts}", gelu, (*args, spec(f, m)), ((tokens, m), act)))
    args = (spec(tokens, m), spec(f, m), spec(m, f), None, spec(1, 1, f, dt=f32), spec(f, m))
    cases.append(ExportCase("t5-base-gated-ia3", mov_ffn_b, args, ((tokens, m), act)))
    return cases
