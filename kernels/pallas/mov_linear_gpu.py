"""Fused MoV linear, forward, in Pallas for GPUs (Pallas' Triton lowering): y = mov(x Wᵀ + b).

Math (SPEC §1, §3.1) as in :mod:`kernels.pallas.mov_linear`, per token row t and head g:
    h[t, g, :] = x[t] Wᵀ[:, g·D:(g+1)·D] + b          float32 accumulator
    p[t, g, :] = softmax(h[t, g, :] @ router)         [E] float32 (padded experts masked to -inf)
    s[t, g, :] = p[t, g, :] @ experts[g]              [D] float32
    y[t, g, :] = h[t, g, :] * s[t, g, :]              stored in x's dtype
Shapes: x [T, K] (float32/bfloat16/float16), weight [N, K] (x's dtype), bias [N] or None, router [D, E]
float32 (None: (IA)3, E = 1), experts [G, E, D] float32.

Why a second kernel: the TPU kernel accumulates over a sequential K grid axis into a VMEM scratch
buffer, which Pallas' Triton lowering does not have (its grid programs run independently, without
scratch). Here the grid is (T / block_m, N / block_n) and each program loops over K in block_k steps
(``lax.fori_loop``) with the accumulator in registers — the Triton GEMM structure; the epilogue is the
same math. An output tile is one head (block_n = D): Pallas' Triton lowering has no value slicing, so a
tile holding several heads could not split them. Triton tiles are powers of two: block_m, block_k, D and
the padded expert count E_pad = max(16, next_pow2(E)) (tl.dot's minimum).

Forward only (the JAX side differentiates through the XLA implementation). Not here: top-k and
sentence routing (NotImplementedError).

This module never imports the rest of pemoe.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ._blocks import check_positive_ints, check_triton_tile, is_pow2
from .mov_linear import _check as _check_common

__all__ = ["ExportCase", "MoVLinearGPUBlocks", "get_default", "mov_linear", "export_cases"]


# ------------------------------------------------------------------------------------------
# Block sizes: data, validated against the problem and Triton's rules
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoVLinearGPUBlocks:
    """Tile of the GPU kernel: output [block_m, block_n], K consumed block_k at a time; launch options.

    Rules (checked by :meth:`validate`, each error names the rule it broke):
      * block_m, block_n, block_k are powers of two ≥ 16 (Triton tiles; tl.dot's 16×16×16 minimum);
      * block_n equals D (an output tile is one head; the lowering cannot slice a tile into heads);
      * block_k divides K (no partial reduction block).
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

    def validate(self, *, n: int, k: int, dim: int) -> None:
        """Raise ValueError if these blocks cannot tile N = n, K = k with heads of width dim."""
        if self.block_n != dim:
            raise ValueError(f"block_n must equal the head width D = {dim} (one head a tile), got {self.block_n}")
        if n % self.block_n:
            raise ValueError(f"block_n must divide N = {n}, got {self.block_n}")
        if k % self.block_k:
            raise ValueError(f"block_k must divide K = {k} (no partial reduction block), got {self.block_k}")


def get_default(t: int, n: int, k: int, dim: int) -> MoVLinearGPUBlocks:
    """A legal tile for x [t, k] @ W [n, k]ᵀ with heads of width dim (64 rows, one head, 64-deep K steps)."""
    del t  # a partial last row block is padded by the wrapper (see mov_linear)
    block_n = dim
    block_k = next((b for b in (64, 32, 16) if k % b == 0), None)
    if block_k is None:
        raise ValueError(f"K = {k} must be a multiple of 16 for the GPU kernel")
    blocks = MoVLinearGPUBlocks(64, block_n, block_k)
    blocks.validate(n=n, k=k, dim=dim)
    return blocks


# ------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------


def _mov_linear_kernel(
    x_ref,  # [block_m, K]
    w_ref,  # [block_n, K]
    bias_ref,  # [block_n]
    router_ref,  # [D, E_pad] float32 (zeros for (IA)3)
    experts_ref,  # [1, E_pad, D] float32 (this tile's head)
    y_ref,  # [block_m, block_n]
    *,
    k: int,
    block_k: int,
    dim: int,
    num_experts: int,
    has_router: bool,
):
    block_m, block_n = y_ref.shape  # block_n == dim: one head

    # ---- GEMM: h = x · Wᵀ over K in block_k steps, float32 accumulator in registers ----
    def step(i, acc):
        x_tile = x_ref[:, pl.ds(i * block_k, block_k)]
        w_tile = w_ref[:, pl.ds(i * block_k, block_k)]
        return acc + jax.lax.dot_general(x_tile, w_tile, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    h = jax.lax.fori_loop(0, k // block_k, step, jnp.zeros((block_m, block_n), jnp.float32))
    h = h + bias_ref[...].astype(jnp.float32)[None, :]

    # ---- epilogue: router logits of every token row, float32 softmax, expert merge, scaling ----
    if has_router:
        logits = jnp.dot(h, router_ref[...], preferred_element_type=jnp.float32)  # [block_m, E_pad]
        lane = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        logits = jnp.where(lane < num_experts, logits, -jnp.inf)
        unnorm = jnp.exp(logits - logits.max(axis=1, keepdims=True))
        p = unnorm / unnorm.sum(axis=1, keepdims=True)
        scaling = jnp.dot(p, experts_ref[0], preferred_element_type=jnp.float32)  # [block_m, D]
    else:  # (IA)3: one expert, p == 1
        scaling = experts_ref[0, 0][None, :]
    y_ref[...] = (h * scaling).astype(y_ref.dtype)


# ------------------------------------------------------------------------------------------
# Launcher: validate, pad the expert dimension, grid, launch
# ------------------------------------------------------------------------------------------


def _check(x, weight, bias, router, experts, top_k, probs) -> tuple[int, int, int]:
    """The TPU kernel's checks (same arguments, same rules), plus the Triton tile rule on the head width."""
    groups, num_experts, dim = _check_common(x, weight, bias, router, experts, top_k, probs)
    if not is_pow2(dim) or dim < 16:
        raise NotImplementedError(f"pallas (gpu) mov_linear: D must be a power of two ≥ 16 (Triton tiles), got {dim}")
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
    blocks: MoVLinearGPUBlocks | None = None,
    interpret: bool = False,
) -> jax.Array:
    """y = mov(x Wᵀ + b), x [T, K], weight [N, K], router [D, E] (None for (IA)3), experts [G, E, D] -> [T, N].

    Lowers through Pallas' Triton backend on GPU (``jax.export(..., platforms=["cuda"])`` works without one);
    ``interpret=True`` runs the Pallas interpreter (any backend). Forward only.
    """
    del renormalize  # only meaningful with top_k, which raises above
    _, num_experts, dim = _check(x, weight, bias, router, experts, top_k, probs)
    t, k = x.shape
    n = weight.shape[0]
    if t == 0:  # no token: nothing to launch (a row block needs T >= 1)
        return jnp.zeros((0, n), x.dtype)
    blocks = blocks or get_default(t, n, k, dim)
    blocks.validate(n=n, k=k, dim=dim)

    e_pad = max(16, 1 << (num_experts - 1).bit_length())
    experts_p = jnp.pad(experts.astype(jnp.float32), ((0, 0), (0, e_pad - num_experts), (0, 0)))
    if router is None:
        router_p = jnp.zeros((dim, e_pad), jnp.float32)
    else:
        router_p = jnp.pad(router.astype(jnp.float32), ((0, 0), (0, e_pad - num_experts)))
    bias_p = jnp.zeros((n,), x.dtype) if bias is None else bias.astype(x.dtype)

    bm, bn = blocks.block_m, blocks.block_n
    # Pallas' Triton lowering neither masks nor bounds-checks block loads and stores (the interpreter pads
    # partial blocks, so it would not show): a partial last row block would read and write past x and y on a
    # GPU. Pad the rows to a whole block instead (a copy of x only when T % block_m != 0) and slice y.
    t_pad = pl.cdiv(t, bm) * bm
    x_p = x if t_pad == t else jnp.pad(x, ((0, t_pad - t), (0, 0)))
    kernel = functools.partial(
        _mov_linear_kernel,
        k=k,
        block_k=blocks.block_k,
        dim=dim,
        num_experts=num_experts,
        has_router=router is not None,
    )
    return pl.pallas_call(
        kernel,
        grid=(t_pad // bm, n // bn),
        in_specs=[
            pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
            pl.BlockSpec((bn, k), lambda i, j: (j, 0)),
            pl.BlockSpec((bn,), lambda i, j: (j,)),
            pl.BlockSpec((dim, e_pad), lambda i, j: (0, 0)),
            pl.BlockSpec((1, e_pad, dim), lambda i, j: (j, 0, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t_pad, n), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
    )(x_p, weight, bias_p, router_p, experts_p)[:t]


# ------------------------------------------------------------------------------------------
# Export cases: T5 attention k/v sites (N = heads · d_kv) with the default blocks
# ------------------------------------------------------------------------------------------

#: (label, T, K = d_model, G = heads, D = d_kv, E): T5 v1.1 base / large / XL k or v projections, MoV-10 and (IA)3.
EXPORT_SHAPES = (
    ("t5-base E=10", 2048, 768, 12, 64, 10),
    ("t5-large E=10", 2048, 1024, 16, 64, 10),
    ("t5-xl E=10", 2048, 2048, 32, 64, 10),
    ("t5-large ia3", 2048, 1024, 16, 64, 1),
)


class ExportCase(NamedTuple):
    """``jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)`` should succeed; out: (shape, dtype)."""

    name: str
    fn: object
    args: tuple
    out: tuple[tuple[int, ...], object]


def export_cases(dtype=jnp.bfloat16) -> list[ExportCase]:
    """The T5 k/v problems of EXPORT_SHAPES with the default blocks (ShapeDtypeStruct args); export with
    ``disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]``."""
    cases = []
    for label, t, k, g, d, e in EXPORT_SHAPES:
        s = jax.ShapeDtypeStruct
        args = (s((t, k), dtype), s((g * d, k), dtype), s((d, e), jnp.float32), s((g, e, d), jnp.float32))
        has_router = e > 1

        def fn(x, w, router, experts, has_router=has_router):
            return mov_linear(x, w, None, router if has_router else None, experts)

        cases.append(ExportCase(label, fn, args, ((t, g * d), dtype)))
    return cases
