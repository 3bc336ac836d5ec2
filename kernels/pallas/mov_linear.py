"""Fused MoV linear, forward, in Pallas: y = mov(x Wᵀ + b) in one GEMM with a MoV epilogue.

Math (SPEC §1, §3.1), per token row t and head g (N = G·D, router shared by the heads):
    h[t, g, :] = x[t] Wᵀ[:, g·D:(g+1)·D] + b          float32 accumulator
    p[t, g, :] = softmax(h[t, g, :] @ router)         [E] float32
    s[t, g, :] = p[t, g, :] @ experts[g]              [D] float32
    y[t, g, :] = h[t, g, :] * s[t, g, :]              stored in x's dtype
Shapes: x [T, K] (float32/bfloat16/float16), weight [N, K] (torch Linear layout, x's dtype),
bias [N] or None, router [D, E] float32 (None: (IA)3, E = 1), experts [G, E, D] float32.

Grid (T / block_m, N / block_n, K / block_k), K innermost ("arbitrary"): each step adds
x_tile · W_tileᵀ to a float32 VMEM accumulator [block_m, block_n]; at the last K step the epilogue
runs on the accumulator, one head (D columns) at a time — an output tile holds whole heads
(block_n a multiple of D). The expert dimension is padded to a multiple of 128 lanes (router columns
and expert rows of zeros; padded logits masked to -inf), so the two small matmuls of the epilogue
are lane-aligned. HBM traffic: x and W once per output tile row/column, router and experts, y once.

Not here yet (raise NotImplementedError): top-k routing, sentence routing, the backward pass
(the JAX side runs the XLA backward), the Triton (GPU) lowering.

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

__all__ = ["LANES", "SUBLANES", "MoVLinearBlocks", "get_default", "mov_linear"]

#: TPU vreg tile: the last two dims of a block are multiples of (SUBLANES, LANES) or the full dims.


# ------------------------------------------------------------------------------------------
# Block sizes: data, validated against the problem and the TPU layout rules
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoVLinearBlocks:
    """Tile of the fused MoV linear: output [block_m, block_n] accumulated over block_k of K.

    Rules (checked by :meth:`validate`, each error names the rule it broke):
      * block_m (tokens) is T, or a multiple of 8 no larger than T (a partial last row block is fine);
      * block_n (output columns) is N, or a multiple of 128 that is also a multiple of D
        (an output tile holds whole heads);
      * block_k (reduction) is K, or a multiple of 128 that divides K (no partial reduction block).
    """

    block_m: int = 256
    block_n: int = 256
    block_k: int = 512

    def __post_init__(self) -> None:
        check_positive_ints(self)

    def validate(self, *, t: int, n: int, k: int, dim: int) -> None:
        """Raise ValueError if these blocks cannot tile T = t, N = n, K = k with heads of width dim."""
        check_output_block("block_m", self.block_m, "T", t, SUBLANES)
        if self.block_n != n:
            if self.block_n % LANES:
                raise ValueError(
                    f"block_n must equal N = {n} or be a multiple of {LANES} (TPU lanes), got {self.block_n}"
                )
            if self.block_n % dim:
                raise ValueError(
                    f"block_n must be a multiple of the head width D = {dim} (a tile holds whole heads), "
                    f"got {self.block_n}"
                )
            if self.block_n > n:
                raise ValueError(f"block_n = {self.block_n} is larger than N = {n}; use block_n = N")
        check_reduction_block("block_k", self.block_k, "K", k)


def get_default(t: int, n: int, k: int, dim: int) -> MoVLinearBlocks:
    """TPU-legal default tile for x [t, k] @ W [n, k]ᵀ with heads of width dim."""
    block_m = t if t <= 256 else 256
    unit = LANES * dim // math.gcd(LANES, dim)  # lcm: lane-aligned and whole heads
    block_n = n if unit >= n else unit * max(1, 256 // unit)
    block_k = next((b for b in (512, 256, 128) if k % b == 0), k)
    blocks = MoVLinearBlocks(block_m, block_n, block_k)
    blocks.validate(t=t, n=n, k=k, dim=dim)
    return blocks


# ------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------


def _mov_linear_kernel(
    # inputs
    x_ref,  # [block_m, block_k]
    w_ref,  # [block_n, block_k]
    bias_ref,  # [1, block_n]
    router_ref,  # [D, E_pad] float32 (unused for (IA)3)
    experts_ref,  # [block_n // D, E_pad, D] float32
    # output
    y_ref,  # [block_m, block_n]
    # scratch
    acc_ref,  # [block_m, block_n] float32
    *,
    num_experts: int,
    dim: int,
    has_router: bool,
):
    # ---- GEMM: acc += x_tile · W_tileᵀ (float32 accumulation) ----
    k_step = pl.program_id(2)

    @pl.when(k_step == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += jax.lax.dot_general(
        x_ref[...], w_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )

    # ---- epilogue at the last K step: bias, then per head router softmax, merge and scaling ----
    @pl.when(k_step == pl.num_programs(2) - 1)
    def _epilogue():
        h = acc_ref[...] + bias_ref[...].astype(jnp.float32)  # [block_m, block_n]
        for g in range(y_ref.shape[1] // dim):
            h_g = h[:, g * dim : (g + 1) * dim]  # [block_m, D]
            experts_g = experts_ref[g]  # [E_pad, D]
            if has_router:
                logits = jnp.dot(h_g, router_ref[...], preferred_element_type=jnp.float32)  # [block_m, E_pad]
                lane = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
                logits = jnp.where(lane < num_experts, logits, -jnp.inf)
                unnorm = jnp.exp(logits - logits.max(axis=1, keepdims=True))
                p = unnorm / unnorm.sum(axis=1, keepdims=True)
                scaling = jnp.dot(p, experts_g, preferred_element_type=jnp.float32)  # [block_m, D]
            else:  # (IA)3: one expert, p == 1
                scaling = experts_g[0:1, :]
            y_ref[:, g * dim : (g + 1) * dim] = (h_g * scaling).astype(y_ref.dtype)


# ------------------------------------------------------------------------------------------
# Launcher: validate, pad the expert dimension, grid, launch
# ------------------------------------------------------------------------------------------


def _check(x, weight, bias, router, experts, top_k, probs) -> tuple[int, int, int]:
    if top_k is not None:
        raise NotImplementedError("pallas mov_linear: top-k routing is not implemented in the kernel yet")
    if probs is not None:
        raise NotImplementedError("pallas mov_linear: sentence routing (probs) is not implemented in the kernel yet")
    if x.ndim != 2 or weight.ndim != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"x must be [T, K] and weight [N, K], got x {list(x.shape)} and weight {list(weight.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must share one dtype, got {x.dtype} and {weight.dtype}")
    if experts.ndim != 3:
        raise ValueError(f"experts must be [G, E, D], got {list(experts.shape)}")
    groups, num_experts, dim = experts.shape
    if groups * dim != weight.shape[0]:
        raise ValueError(
            f"experts [G, E, D] = {list(experts.shape)} needs N = G*D = {groups * dim}, got {weight.shape[0]}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [N] = [{weight.shape[0]}], got {list(bias.shape)}")
    if router is None and num_experts != 1:
        raise ValueError(f"router is required when E > 1 (E = {num_experts})")
    if router is not None and tuple(router.shape) != (dim, num_experts):
        raise ValueError(f"router must be [D, E] = [{dim}, {num_experts}], got {list(router.shape)}")
    return groups, num_experts, dim


@functools.partial(jax.jit, static_argnames=("top_k", "renormalize", "blocks", "interpret"))
def mov_linear(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    router: jax.Array | None,
    experts: jax.Array,
    probs: jax.Array | None = None,
    top_k: int | None = None,
    renormalize: bool = False,
    *,
    blocks: MoVLinearBlocks | None = None,
    interpret: bool = False,
) -> jax.Array:
    """y = mov(x Wᵀ + b), x [T, K], weight [N, K], router [D, E] (None for (IA)3), experts [G, E, D] -> [T, N].

    ``blocks`` defaults to :func:`get_default`; ``interpret=True`` runs the Pallas interpreter (any backend).
    Forward only: differentiate through the XLA implementation.
    """
    del renormalize  # only meaningful with top_k, which raises above
    groups, num_experts, dim = _check(x, weight, bias, router, experts, top_k, probs)
    t, k = x.shape
    n = weight.shape[0]
    if t == 0:  # no token: nothing to launch (a row block needs T >= 1)
        return jnp.zeros((0, n), x.dtype)
    blocks = blocks or get_default(t, n, k, dim)
    blocks.validate(t=t, n=n, k=k, dim=dim)

    # ---- pad the expert dimension to whole lanes (zeros; padded logits are masked in the kernel) ----
    e_pad = LANES * math.ceil(num_experts / LANES)
    experts_p = jnp.pad(experts.astype(jnp.float32), ((0, 0), (0, e_pad - num_experts), (0, 0)))
    if router is None:
        router_p = jnp.zeros((dim, e_pad), jnp.float32)
    else:
        router_p = jnp.pad(router.astype(jnp.float32), ((0, 0), (0, e_pad - num_experts)))
    bias2d = (jnp.zeros((n,), x.dtype) if bias is None else bias.astype(x.dtype)).reshape(1, n)

    bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
    grid = (pl.cdiv(t, bm), pl.cdiv(n, bn), k // bk)
    kernel = functools.partial(_mov_linear_kernel, num_experts=num_experts, dim=dim, has_router=router is not None)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk)),
            pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)),
            pl.BlockSpec((dim, e_pad), lambda i, j, kk: (0, 0)),
            pl.BlockSpec((bn // dim, e_pad, dim), lambda i, j, kk: (j, 0, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t, n), x.dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(x, weight, bias2d, router_p, experts_p)
