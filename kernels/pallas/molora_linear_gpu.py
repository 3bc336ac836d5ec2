"""Fused MoLoRA linear, forward, in Pallas for GPUs (Pallas' Triton lowering).

Math (SPEC §1, §3.3) as in :mod:`kernels.pallas.molora_linear` (the TPU kernel), per output tile:
    U      = x · A_cat                             [block_m, E·r]  float32 accumulation
    logits = x32 · router                          [block_m, E]    float32 (HIGHEST: IEEE, not TF32)
    p      = softmax(logits) (top-k, renormalised on request), or the given probs, or 1 (LoRA)
    U′     = scale · U · p   (expert e's r columns scaled by p[:, e]; one float32 dot with a 0/scale matrix)
    y      = x · Wᵀ + U′ · B_cat + b               the expand is E·r extra columns of the GEMM's K
Shapes: x [T, K] (float32/bfloat16/float16), weight [N, K] (x's dtype), bias [N] or None,
lora_a [E, K, r], lora_b [E, r, N], router [K, E] / probs [T, E] float32.

Why a second kernel (the TPU one keeps U′ in VMEM scratch across a sequential column axis): Pallas'
Triton lowering runs grid programs independently, without scratch, so here each program of the grid
(T / block_m, N / block_n) loops over K in block_k steps (``lax.fori_loop``, accumulators in registers) and
feeds every x tile to the base GEMM, the shrink and the router dots — the structure of pemoe's Triton
forward (kernels/triton/molora_linear.py): x, W, y move once per tile; each program recomputes its rows'
shrink and router (E·r + E extra dot columns per block_n output columns). Programs of the first column
also store U and p_soft (float32) for the backward.
Triton's rules: tiles are powers of two ≥ 16 (tl.dot's minimum), so E·r and E are padded to P =
max(16, next_pow2(E·r)) and E_pad = max(16, next_pow2(E)) with zeros; block_k must divide K (K a
multiple of 16). The Triton lowering does not bound-check blocks, so partial row / column blocks and
the padded widths are handled with masked loads and stores here.

Forward only: :mod:`pemoe.jax.pallas` pairs the TPU kernel with the XLA backward; this kernel is
exported for CUDA and checked in the interpreter (no GPU on the development machines).

This module never imports the rest of pemoe.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ._blocks import check_positive_ints, check_triton_tile
from .molora_linear import GIVEN_PROBS, NO_ROUTER, TOKEN_ROUTER, _check, _dot, _dot_nt, _top_k_mask

__all__ = ["MoLoRALinearGPUBlocks", "get_default", "gpu_widths", "molora_linear", "export_cases"]


def _next_pow2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def gpu_widths(num_experts: int, rank: int) -> tuple[int, int]:
    """(P, E_pad): E·r and E padded to powers of two ≥ 16 (Triton tiles)."""
    return max(16, _next_pow2(num_experts * rank)), max(16, _next_pow2(num_experts))


# ------------------------------------------------------------------------------------------
# Block sizes: data, validated against the problem and Triton's rules
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoLoRALinearGPUBlocks:
    """Tile of the GPU kernel: output [block_m, block_n], K consumed block_k at a time; launch options.

    Rules (checked on construction and by :meth:`validate`, each error names the rule it broke):
      * block_m, block_n, block_k are powers of two ≥ 16 (Triton tiles; tl.dot's 16×16×16 minimum);
      * block_k divides K (no partial reduction block). Partial row / column blocks are masked.
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        check_positive_ints(self)
        for name in ("block_m", "block_n", "block_k"):
            check_triton_tile(name, getattr(self, name))

    def validate(self, *, k: int) -> None:
        """Raise ValueError if these blocks cannot tile K = k."""
        if k % self.block_k:
            raise ValueError(f"block_k must divide K = {k} (no partial reduction block), got {self.block_k}")


def get_default(t: int, n: int, k: int, e: int, r: int) -> MoLoRALinearGPUBlocks:
    """A legal tile for x [t, k] @ W [n, k]ᵀ: 64×64 (smaller for tiny T or N), block_k 64 / 32 / 16."""
    del e, r  # the padded adapter widths do not change the legal tiles
    block_k = next((b for b in (64, 32, 16) if k % b == 0), None)
    if block_k is None:
        raise ValueError(f"K = {k} must be a multiple of 16 for the GPU kernel")
    blocks = MoLoRALinearGPUBlocks(min(64, max(16, _next_pow2(t))), min(64, max(16, _next_pow2(n))), block_k)
    blocks.validate(k=k)
    return blocks


# ------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------


def _molora_linear_gpu_kernel(
    *refs,
    t: int,
    n: int,
    k: int,
    block_k: int,
    e_pad: int,
    num_experts: int,
    rank: int,
    scale: float,
    routing: int,
    top_k: int | None,
    renormalize: bool,
    has_bias: bool,
    save_residuals: bool,
):
    refs = list(refs)
    x_ref, w_ref = refs.pop(0), refs.pop(0)  # [bm, K], [bn, K]
    bias_ref = refs.pop(0) if has_bias else None  # [bn]
    a_ref = refs.pop(0)  # [K, P] A_cat in x's dtype
    router_ref = refs.pop(0) if routing == TOKEN_ROUTER else None  # [K, E_pad] float32
    probs_ref = refs.pop(0) if routing == GIVEN_PROBS else None  # [bm, E_pad] float32
    b_ref = refs.pop(0)  # [P, bn] B_cat in x's dtype
    y_ref = refs.pop(0)  # [bm, bn]
    u_out_ref = refs.pop(0) if save_residuals else None  # [bm, P] block of U [T, E·r]
    p_out_ref = refs.pop(0) if save_residuals and routing == TOKEN_ROUTER else None  # [bm, E_pad] of [T, E]
    assert not refs

    block_m, block_n = y_ref.shape
    width = a_ref.shape[1]  # P
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * block_m + jax.lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    cols = j * block_n + jax.lax.broadcasted_iota(jnp.int32, (1, block_n), 1)
    row_ok, col_ok = rows < t, cols < n  # [bm, 1], [1, bn]
    col_ok_t = (j * block_n + jax.lax.broadcasted_iota(jnp.int32, (block_n, 1), 0)) < n  # [bn, 1]

    # ---- one loop over K: base GEMM, shrink and router on the same x tile ----
    def step(s, carry):
        acc, u, logits = carry
        x = pltriton.load(x_ref.at[:, pl.ds(s * block_k, block_k)], mask=row_ok, other=0.0)
        w = pltriton.load(w_ref.at[:, pl.ds(s * block_k, block_k)], mask=col_ok_t, other=0.0)
        acc = acc + _dot_nt(x, w)
        u = u + _dot(x, a_ref[pl.ds(s * block_k, block_k), :])
        if router_ref is not None:
            logits = logits + _dot(x.astype(jnp.float32), router_ref[pl.ds(s * block_k, block_k), :])
        return acc, u, logits

    init = (
        jnp.zeros((block_m, block_n), jnp.float32),
        jnp.zeros((block_m, width), jnp.float32),
        jnp.zeros((block_m, e_pad), jnp.float32),
    )
    acc, u, logits = jax.lax.fori_loop(0, k // block_k, step, init)

    # ---- routing weights and U′ ----
    p_soft = None
    if routing == NO_ROUTER:
        u_scaled = scale * u
    else:
        lane = jax.lax.broadcasted_iota(jnp.int32, (block_m, e_pad), 1)
        if routing == TOKEN_ROUTER:
            logits = jnp.where(lane < num_experts, logits, -jnp.inf)
            unnorm = jnp.exp(logits - logits.max(axis=1, keepdims=True))
            p_soft = unnorm / unnorm.sum(axis=1, keepdims=True)
            p = p_soft
            if top_k is not None and top_k < num_experts:
                p = p_soft * _top_k_mask(p_soft, num_experts, top_k)
                if renormalize:
                    p = p / p.sum(axis=1, keepdims=True)
        else:
            p = pltriton.load(probs_ref, mask=row_ok & (lane < num_experts), other=0.0)
        row = jax.lax.broadcasted_iota(jnp.int32, (e_pad, width), 0)
        col = jax.lax.broadcasted_iota(jnp.int32, (e_pad, width), 1)
        spread = jnp.where(jnp.logical_and(col >= row * rank, col < row * rank + rank), scale, 0.0)
        u_scaled = u * _dot(p, spread.astype(jnp.float32))

    # ---- the expand as extra K, bias, one masked store of y ----
    b = pltriton.load(b_ref, mask=col_ok, other=0.0)  # [P, bn]
    out = acc + _dot(u_scaled.astype(b.dtype), b)
    if bias_ref is not None:
        out = out + pltriton.load(bias_ref, mask=col_ok[0], other=0.0).astype(jnp.float32)[None, :]
    pltriton.store(y_ref, out.astype(y_ref.dtype), mask=row_ok & col_ok)

    # ---- first column: U and p_soft for the backward ----
    if u_out_ref is not None:

        @pl.when(j == 0)
        def _save():
            u_lane = jax.lax.broadcasted_iota(jnp.int32, (block_m, width), 1)
            pltriton.store(u_out_ref, u, mask=row_ok & (u_lane < num_experts * rank))
            if p_out_ref is not None:
                lane = jax.lax.broadcasted_iota(jnp.int32, (block_m, e_pad), 1)
                pltriton.store(p_out_ref, p_soft, mask=row_ok & (lane < num_experts))


# ------------------------------------------------------------------------------------------
# Launcher: validate, concatenate and pad the adapters, grid, launch
# ------------------------------------------------------------------------------------------


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
    blocks: MoLoRALinearGPUBlocks | None = None,
    interpret: bool = False,
    save_residuals: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array | None]:
    """y = x Wᵀ + b + scale·Σ_e p_e (x A_e) B_e, lowered through Pallas' Triton backend (GPU).

    Same arguments, checks and results as :func:`kernels.pallas.molora_linear.molora_linear` (the TPU kernel);
    ``jax.export(..., platforms=["cuda"])`` works without a GPU; ``interpret=True`` runs the Pallas interpreter.
    """
    num_experts, rank, routing = _check(x, weight, bias, lora_a, lora_b, router, probs, scale, top_k)
    t, k = x.shape
    n = weight.shape[0]
    dt = x.dtype
    er = num_experts * rank
    if t == 0:
        y = jnp.zeros((0, n), dt)
        empty_p = jnp.zeros((0, num_experts), jnp.float32) if routing == TOKEN_ROUTER else None
        return (y, jnp.zeros((0, er), jnp.float32), empty_p) if save_residuals else y
    blocks = blocks or get_default(t, n, k, num_experts, rank)
    blocks.validate(k=k)
    bm, bn = blocks.block_m, blocks.block_n
    width, e_pad = gpu_widths(num_experts, rank)

    a_cat = jnp.pad(lora_a.transpose(1, 0, 2).reshape(k, er).astype(dt), ((0, 0), (0, width - er)))  # [K, P]
    b_cat = jnp.pad(lora_b.reshape(er, n).astype(dt), ((0, width - er), (0, 0)))  # [P, N]

    operands = [x, weight]
    in_specs = [pl.BlockSpec((bm, k), lambda i, j: (i, 0)), pl.BlockSpec((bn, k), lambda i, j: (j, 0))]
    if bias is not None:
        operands.append(bias.astype(dt))
        in_specs.append(pl.BlockSpec((bn,), lambda i, j: (j,)))
    operands.append(a_cat)
    in_specs.append(pl.BlockSpec((k, width), lambda i, j: (0, 0)))
    if routing == TOKEN_ROUTER:
        operands.append(jnp.pad(router.astype(jnp.float32), ((0, 0), (0, e_pad - num_experts))))
        in_specs.append(pl.BlockSpec((k, e_pad), lambda i, j: (0, 0)))
    elif routing == GIVEN_PROBS:
        operands.append(probs.astype(jnp.float32))
        in_specs.append(pl.BlockSpec((bm, e_pad), lambda i, j: (i, 0)))  # masked to [T, E]
    operands.append(b_cat)
    in_specs.append(pl.BlockSpec((width, bn), lambda i, j: (0, j)))

    out_shape = [jax.ShapeDtypeStruct((t, n), dt)]
    out_specs = [pl.BlockSpec((bm, bn), lambda i, j: (i, j))]
    if save_residuals:  # blocks wider than the arrays: the stores are masked to E·r and E columns
        out_shape.append(jax.ShapeDtypeStruct((t, er), jnp.float32))
        out_specs.append(pl.BlockSpec((bm, width), lambda i, j: (i, 0)))
        if routing == TOKEN_ROUTER:
            out_shape.append(jax.ShapeDtypeStruct((t, num_experts), jnp.float32))
            out_specs.append(pl.BlockSpec((bm, e_pad), lambda i, j: (i, 0)))

    kernel = functools.partial(
        _molora_linear_gpu_kernel,
        t=t,
        n=n,
        k=k,
        block_k=blocks.block_k,
        e_pad=e_pad,
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
        grid=(pl.cdiv(t, bm), pl.cdiv(n, bn)),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
    )(*operands)
    if not save_residuals:
        return outs[0]
    return outs[0], outs[1], outs[2] if routing == TOKEN_ROUTER else None


# ------------------------------------------------------------------------------------------
# Export cases: T5 v1.1 MoLoRA sites with the default blocks (for jax.export(..., platforms=["cuda"]))
# ------------------------------------------------------------------------------------------

#: (label, T, K, N, E, r): T5 v1.1 base / large / XL q/k/v/o (d_model -> d_model), wi (d_model -> d_ff) and
#: wo (d_ff -> d_model) with MoLoRA-10 r = 4, plus MoLoRA-15 r = 16 and LoRA (E = 1) at T5-large wi.
EXPORT_SHAPES = (
    ("t5-base qkvo E=10 r=4", 2048, 768, 768, 10, 4),
    ("t5-base wi E=10 r=4", 2048, 768, 2048, 10, 4),
    ("t5-base wo E=10 r=4", 2048, 2048, 768, 10, 4),
    ("t5-large qkvo E=10 r=4", 2048, 1024, 1024, 10, 4),
    ("t5-large wi E=10 r=4", 2048, 1024, 2816, 10, 4),
    ("t5-large wo E=10 r=4", 2048, 2816, 1024, 10, 4),
    ("t5-xl qkvo E=10 r=4", 2048, 2048, 2048, 10, 4),
    ("t5-xl wi E=10 r=4", 2048, 2048, 5120, 10, 4),
    ("t5-xl wo E=10 r=4", 2048, 5120, 2048, 10, 4),
    ("t5-large wi E=15 r=16", 2048, 1024, 2816, 15, 16),
    ("t5-large wi lora r=4", 2048, 1024, 2816, 1, 4),
)


def export_cases(dtype=jnp.bfloat16) -> list[tuple[str, object, tuple[jax.ShapeDtypeStruct, ...]]]:
    """(label, fn, abstract args) for ``jax.export(jax.jit(fn), platforms=["cuda"])(*args)``; one output y [T, N].

    args: x [T, K], weight [N, K] (dtype), lora_a [E, K, r], lora_b [E, r, N], router [K, E] (float32;
    ignored for LoRA, E = 1).
    """
    cases = []
    s = jax.ShapeDtypeStruct
    for label, t, k, n, e, r in EXPORT_SHAPES:
        args = (s((t, k), dtype), s((n, k), dtype), s((e, k, r), jnp.float32), s((e, r, n), jnp.float32))
        args += (s((k, e), jnp.float32),)

        def fn(x, w, lora_a, lora_b, router, has_router=e > 1):
            return molora_linear(x, w, None, lora_a, lora_b, router if has_router else None, scale=4.0)

        cases.append((label, fn, args))
    return cases
