"""MoLoRA over an adapter bank as Triton kernels (forward only): segment-grouped shrink and expand, after SGMV
(Punica's segmented gather matrix-vector products).

Math, x [T, K], ids [T] (adapter per token, -1: none), lora_a [A, E, K, r], lora_b [A, E, r, N], router
[A, K, E] (None for LoRA, E = 1), scale = alpha / r; for token t with a = ids[t] >= 0:
    p_t  = softmax(x32_t · router[a])  (top-k, renormalised on request; or given per token: sentence routing)
    U_t  = x_t · A_cat[a]              [E·r]   A_cat[a][k, e·r + j] = lora_a[a, e, k, j]
    U′_t = scale · U_t · p_t            (each expert's r columns scaled by its probability)
    y_t  = base_t + U′_t · B_cat[a]     B_cat[a][e·r + j, n] = lora_b[a, e, j, n]
and y_t = base_t for a = -1. base is x Wᵀ + b (``molora_linear``: the frozen GEMM runs once over all tokens,
``F.linear``), the given ``base`` (``molora_adapter``) or zeros. The same semantics as
:mod:`pemoe.ops.banked` (its "reference" and "torch" implementations); never a [T, E, N] tensor, never a
per-token copy of an adapter's parameters.

Launch plan (:func:`plan_segments`, on the host once per call): one stable argsort of the ids gives the
permutation ``perm`` (sorted position -> token; the -1 rows first, then adapter 0's segment, adapter 1's, …),
and the per-adapter token counts (one device-to-host read) give each segment's start and length. Each segment
is cut into row tiles of BLOCK_M sorted positions (the last one partial), and the tile table [num_tiles, 3]
int64 holds (adapter, first sorted position, segment end) per tile: the grids run over tiles only, so the -1
rows and the adapters that name no token cost no program. BLOCK_M is one per call, picked from the mean
segment length (16, 32 or 64: decode-sized segments waste at most a 16-row tile each).

Kernels, both over the tile table:
  1. ``_banked_shrink_kernel`` (grid: tiles): the tile's rows of x are gathered through ``perm`` (x itself is
     never permuted), U = x · A_cat[a] and the router logits x · router[a] (float32-grade, see Numerics) in one
     pass over K, p = softmax (+ top-k / renormalisation; sentence routing reads the given p of each token),
     and U′ = scale·U·p stored in the activation dtype at the tile's sorted positions ([T, E·r] buffer, rows of
     id -1 neither written nor read).
  2. ``_banked_expand_kernel`` (grid: tiles x column tiles of N): acc = U′ · B_cat[a] over the E·r padded
     columns (TAIL_STEP at a time), then the epilogue adds the base row and stores y — both addressed through
     ``perm``: the output is scattered back to token order in the epilogue (no gather pass after). The output
     buffer starts as the base (the frozen GEMM's fresh output, a copy of ``base``, or zeros), so the rows of
     id -1 already hold their result and the kernel updates the adapter rows in place (each element is read and
     written by one program only). Autotuning restores the buffer between its trial runs.
Programs of one segment are consecutive in the grid (tiles first, then column tiles), so the column tile of
B_cat[a] they read is shared through L2.

Layouts and numerics follow :mod:`.molora_linear` (its helpers are reused): adapters are float32 (the ops layer
casts them), loaded as float32 tiles and cast to the activation dtype for the tensor-core dot, as the authors'
code does; every dot accumulates in float32; routing math is float32; the router logits are x (exact in its
dtype) times a hi/lo split of the float32 router (:mod:`.split_dot`); U′ is rounded once to the activation
dtype (the A-operand of the expand dot); float32 activations use ``input_precision="ieee"`` dots (no TF32).
U is kept in the per-expert padded column layout c = e·RANK_PAD + j inside the kernels. Row offsets are
int64 (the tile table and ``perm`` are int64): T·K may exceed 2^31. With one adapter and the same tiles the
result is bitwise that of :func:`.molora_linear.molora_adapter` (the same shrink, the same expand order).

There is no backward: :func:`molora_linear` and :func:`molora_adapter` refuse inputs that require grad while
autograd records (``NotImplementedError``). Supported: x float16, bfloat16 or float32 (base and weight in
x's dtype), adapters float32, E·r up to 256 padded columns; anything else raises ``TypeError`` /
``ValueError``; there is no fallback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pemoe.kernels.triton import tiles
from pemoe.kernels.triton.autograd import launch_device, refuse_grad
from pemoe.kernels.triton.interpreter import do_bench
from pemoe.kernels.triton.molora_linear import (
    DOT_MIN,
    _check_kernel_inputs,
    _expert_columns,
    _flags,
    _routing_mode,
    _shrink_rows,
    _tail_dot,
    _tail_step,
)
from pemoe.kernels.triton.molora_linear_torch import _check_base

logger = logging.getLogger("pemoe")

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------------
# Autotune configurations (data) and pruning; BLOCK_M comes from the launch plan
# ------------------------------------------------------------------------------------------------


def _config(warps: int, stages: int, **blocks: int) -> triton.Config:
    return triton.Config(dict(blocks), num_warps=warps, num_stages=stages)


#: Shrink: BLOCK_K, the reduction step over K, per row tile (ordered by preference; the first legal one is the
#: default and what the interpreter runs).
SHRINK_CONFIGS = [
    _config(4, 3, BLOCK_K=32),  # (BLOCK_K = 64 with 4 warps spills in fp16 on sm_90 at E = 10, r = 4: AOT)
    _config(8, 3, BLOCK_K=32),  # wide E·r (BLOCK_J = 256) with 64-row tiles: the accumulator over 8 warps
    _config(4, 2, BLOCK_K=16),  # float32 activations (FMA dots: operands in registers)
]
#: Expand: BLOCK_N output columns per program; the reduction is the E·r padded columns (TAIL_STEP a step).
EXPAND_CONFIGS = [
    _config(8, 2, BLOCK_N=128),  # (with 4 warps ptxas gives bf16 LoRA 32-row tiles an 8-byte stack on sm_90: AOT)
    _config(4, 2, BLOCK_N=64),
    _config(8, 2, BLOCK_N=256),
    _config(4, 2, BLOCK_N=32),  # float32 activations
    _config(4, 2, BLOCK_N=16),  # float32 activations, wide E·r (BLOCK_J > 64) with 32-row tiles
]
#: Row-tile heights the plan picks from (the mean segment length, rounded up, clamped).
BLOCK_M_CHOICES = (16, 32, 64)
#: Per-thread float32 register budgets of the estimates below (registers).
SHRINK_REGISTERS = 128
EXPAND_REGISTERS = 192


def legal_shrink(cfg: triton.Config, block_m: int, block_e: int, block_j: int, elem: int) -> bool:
    """Whether a shrink configuration fits: the [BLOCK_M, BLOCK_J] U and [BLOCK_M, BLOCK_E] logits accumulators
    plus the [BLOCK_K, BLOCK_J] float32 adapter tile within 128 registers a thread; float32 activations (FMA
    dots) BLOCK_M·BLOCK_K <= 512 (the single-adapter shrink's calibration on the AOT reports)."""
    bk = cfg.kwargs["BLOCK_K"]
    regs = (block_m * block_j + block_m * block_e + bk * block_j) / (32 * cfg.num_warps)
    if elem == 4 and block_m * bk > 512:
        return False
    return bk >= DOT_MIN and regs <= SHRINK_REGISTERS


def legal_expand(cfg: triton.Config, block_m: int, block_j: int, elem: int) -> bool:
    """Whether an expand configuration fits: the [BLOCK_M, BLOCK_N] accumulator and one TAIL_STEP slice of U′
    and B_cat within 192 registers a thread; float32 activations BLOCK_M·BLOCK_N <= 1024 (512 beyond 64
    adapter columns), as the single-adapter expand GEMM."""
    bn = cfg.kwargs["BLOCK_N"]
    step = _tail_step(block_j)
    regs = (block_m * bn + (block_m * step + step * bn) * elem / 4) / (32 * cfg.num_warps)
    if elem == 4 and block_m * bn > (1024 if block_j <= 64 else 512):
        return False
    return bn >= DOT_MIN and regs <= EXPAND_REGISTERS


def legal_configs(role: str, block_m: int, block_e: int, block_j: int, elem: int, cols: int) -> list[triton.Config]:
    """The configurations of ``role`` ("shrink" or "expand") that fit, order kept (the first is the default);
    for the expand, those whose BLOCK_N is not much wider than N (``cols``)."""
    if role == "shrink":
        legal = [c for c in SHRINK_CONFIGS if legal_shrink(c, block_m, block_e, block_j, elem)]
    else:
        legal = [c for c in EXPAND_CONFIGS if legal_expand(c, block_m, block_j, elem)]
        snug = [c for c in legal if c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(cols))]
        legal = snug or legal[-1:]
    if not legal:
        raise ValueError(
            f"molora banked Triton kernels: no {role} tile configuration fits BLOCK_M = {block_m} rows and "
            f"{block_j} padded adapter columns"
        )
    return legal


def _pruner(role: str):
    def prune(configs, named_args, **kwargs):
        a = {**named_args, **kwargs}
        elem = 4 if a["DOT_PRECISION"] == "ieee" else 2
        cols = a.get("N", 0)
        return legal_configs(role, a["BLOCK_M"], a["BLOCK_E"], a["BLOCK_E"] * a["RANK_PAD"], elem, cols)

    return prune


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _tile_rows(tiles_ptr, perm_ptr, BLOCK_M: tl.constexpr):
    """(adapter, sorted positions [BLOCK_M] int64, tokens [BLOCK_M] int64, row mask) of this program's tile."""
    tile = tl.program_id(0).to(tl.int64)
    adapter = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    pos = start + tl.arange(0, BLOCK_M).to(tl.int64)
    m_mask = pos < end
    tokens = tl.load(perm_ptr + pos, mask=m_mask, other=0)
    return adapter, pos, tokens, m_mask


_SHRINK_KEY = ["tokens_bucket", "K", "E", "R", "ROUTING", "BLOCK_M"]


@triton.autotune(
    configs=SHRINK_CONFIGS,
    key=_SHRINK_KEY,
    prune_configs_by={"early_config_prune": _pruner("shrink")},
    do_bench=do_bench,
)
@triton.jit
def _banked_shrink_kernel(
    # inputs: x [T, K], lora_a [A, E, K, R] f32, router [A, K, E] f32, probs [T, E] f32 (token order),
    # perm [T] int64 (sorted position -> token), tile table [num_tiles, 3] int64
    x_ptr, lora_a_ptr, router_ptr, probs_ptr, perm_ptr, tiles_ptr,
    # output: U′ [T, E·R] (activation dtype) at sorted positions
    u_scaled_ptr,
    # sizes (tokens_bucket: autotune key only)
    K, E, R, tokens_bucket,
    # strides (U′ row-major with unit column stride)
    stride_xt, stride_xk, stride_aa, stride_ae, stride_ak, stride_ar, stride_ra, stride_rk, stride_re,
    stride_pt, stride_pe, stride_vt,
    # scalars
    scale,
    # feature flags
    ROUTING: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_E: tl.constexpr, RANK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One row tile of one adapter's segment: U = x·A_cat[a] and the logits x·router[a] in one pass over K
    (x rows gathered through perm), p (softmax / top-k / given / ones), U′ = scale·U·p stored at the tile's
    sorted positions."""
    adapter, pos, tokens, m_mask = _tile_rows(tiles_ptr, perm_ptr, BLOCK_M)
    expert, rank, col_real = _expert_columns(E, R, BLOCK_E, RANK_PAD)
    _, _, u_scaled = _shrink_rows(
        x_ptr, lora_a_ptr + adapter * stride_aa, router_ptr + adapter * stride_ra, probs_ptr, tokens, m_mask,
        K, E, R,
        stride_xt, stride_xk, stride_ae, stride_ak, stride_ar, stride_rk, stride_re, stride_pt, stride_pe,
        scale,
        ROUTING, TOP_K, RENORMALIZE, DOT_PRECISION, BLOCK_E, RANK_PAD, BLOCK_M, BLOCK_K,
    )  # fmt: skip
    cols = expert * R + rank
    tiles.store_tile(u_scaled_ptr, pos * stride_vt, cols, u_scaled.to(u_scaled_ptr.dtype.element_ty), m_mask, col_real)


_EXPAND_KEY = ["tokens_bucket", "N", "E", "R", "BLOCK_M"]


@triton.autotune(
    configs=EXPAND_CONFIGS,
    key=_EXPAND_KEY,
    prune_configs_by={"early_config_prune": _pruner("expand")},
    restore_value=["out_ptr"],  # the kernel accumulates into out: trial runs must each start from the base
    do_bench=do_bench,
)
@triton.jit
def _banked_expand_kernel(
    # inputs: U′ [T, E·R] (activation dtype, sorted positions), lora_b [A, E, R, N] f32, perm, tile table
    u_scaled_ptr, lora_b_ptr, perm_ptr, tiles_ptr,
    # in / out: out [T, N] in token order, holding the base on entry
    out_ptr,
    # sizes (tokens_bucket: autotune key only)
    N, E, R, tokens_bucket,
    # strides (U′: unit column stride)
    stride_vt, stride_ba, stride_be, stride_br, stride_bn, stride_ot, stride_on,
    # feature flags
    DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_E: tl.constexpr, RANK_PAD: tl.constexpr, TAIL_STEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] tile of y for one row tile of adapter a's segment: out[tokens] += U′·B_cat[a]
    (float32 accumulation, base added in the epilogue, one store scattered to the tokens' rows)."""
    adapter, pos, tokens, m_mask = _tile_rows(tiles_ptr, perm_ptr, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N

    # ---- the E·R reduction: padded columns c = e·RANK_PAD + j, TAIL_STEP at a time
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _tail_dot(
        acc, u_scaled_ptr, pos * stride_vt, m_mask, lora_b_ptr + adapter * stride_ba, offs_n, n_mask, E, R,
        stride_be, stride_br, stride_bn,
        DOT_PRECISION, BLOCK_E, RANK_PAD, TAIL_STEP,
    )  # fmt: skip

    # ---- epilogue: + base (the output's current rows), one store in token order
    rows = tokens * stride_ot
    acc += tiles.load_tile(out_ptr, rows, offs_n * stride_on, m_mask, n_mask).to(tl.float32)
    tiles.store_tile(out_ptr, rows, offs_n * stride_on, acc.to(out_ptr.dtype.element_ty), m_mask, n_mask)


# ------------------------------------------------------------------------------------------------
# Launch plan
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentPlan:
    """Tokens grouped by adapter (module docstring): ``perm`` [T] int64 (sorted position -> token), ``tiles``
    [num_tiles, 3] int64 (adapter, first sorted position, segment end) per row tile of BLOCK_M positions,
    ``counts`` the tokens per id -1, 0, …, A-1 (host ints)."""

    perm: Tensor
    tiles: Tensor
    block_m: int
    counts: tuple[int, ...]

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]

    @property
    def adapter_tokens(self) -> int:
        """Tokens with an adapter (id >= 0): the rows the kernels touch."""
        return sum(self.counts[1:])


#: A forced row-tile height (tests: several tiles per segment on small shapes); None = the plan's choice.
_FORCED_BLOCK_M: list[int | None] = [None]
#: Forced configurations per role ("shrink", "expand"; tests); absent = autotune.
_FORCED: dict[str, triton.Config] = {}


class use_configs:
    """Context manager running the kernels with a given row-tile height (``block_m``) and/or shrink / expand
    configurations instead of the plan's choice and autotuning (tests, benchmarks)."""

    def __init__(
        self, block_m: int | None = None, shrink: triton.Config | None = None, expand: triton.Config | None = None
    ):
        if block_m is not None and (block_m < DOT_MIN or block_m & (block_m - 1)):
            raise ValueError(f"block_m must be a power of two >= {DOT_MIN}, got {block_m}")
        self._new = (block_m, {k: v for k, v in dict(shrink=shrink, expand=expand).items() if v is not None})

    def __enter__(self):
        self._old = (_FORCED_BLOCK_M[0], dict(_FORCED))
        block_m, configs = self._new
        if block_m is not None:
            _FORCED_BLOCK_M[0] = block_m
        _FORCED.update(configs)

    def __exit__(self, *exc):
        _FORCED_BLOCK_M[0] = self._old[0]
        _FORCED.clear()
        _FORCED.update(self._old[1])


def choose_block_m(counts: list[int] | tuple[int, ...], dtype: torch.dtype) -> int:
    """Row-tile height from the mean adapter segment length: the smallest of 16 / 32 / 64 that holds it
    (at most 32 for float32 activations, whose FMA dots keep operands in registers)."""
    if _FORCED_BLOCK_M[0] is not None:
        return _FORCED_BLOCK_M[0]
    segments = [n for n in counts[1:] if n]
    mean = sum(segments) / max(len(segments), 1)
    cap = 32 if dtype == torch.float32 else BLOCK_M_CHOICES[-1]
    return min(next((b for b in BLOCK_M_CHOICES if mean <= b), BLOCK_M_CHOICES[-1]), cap)


def plan_segments(ids: Tensor, num_adapters: int, dtype: torch.dtype = torch.bfloat16) -> SegmentPlan:
    """The launch plan of ids [T] (int64, each in [-1, A)): one bincount read on the host (the only
    device-to-host sync), one stable argsort (skipped when every token names the same id), the tile table built
    on the ids' device."""
    dev = ids.device
    counts_dev = torch.bincount(ids + 1, minlength=num_adapters + 1)
    counts = counts_dev.tolist()
    block_m = choose_block_m(counts, dtype)
    if sum(1 for n in counts if n) <= 1:
        perm = torch.arange(ids.numel(), device=dev)
    else:
        perm = torch.argsort(ids, stable=True)
    num_tiles = sum(-(-n // block_m) for n in counts[1:])
    seg = counts_dev[1:]
    seg_end = counts[0] + torch.cumsum(seg, 0)
    seg_start = seg_end - seg
    tiles_per = (seg + block_m - 1) // block_m
    tile_adapter = torch.repeat_interleave(torch.arange(num_adapters, device=dev), tiles_per, output_size=num_tiles)
    first_tile = torch.cumsum(tiles_per, 0) - tiles_per
    within = torch.arange(num_tiles, device=dev) - first_tile[tile_adapter]
    table = torch.stack([tile_adapter, seg_start[tile_adapter] + within * block_m, seg_end[tile_adapter]], dim=1)
    return SegmentPlan(perm, table.to(torch.int64).contiguous(), block_m, tuple(counts))


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------


def _launch(kernel, role: str, grid, args: tuple, constexprs: dict) -> None:
    forced = _FORCED.get(role)
    if forced is None:
        kernel[grid](*args, **constexprs)
        return
    meta = {**constexprs, **forced.kwargs}
    kernel.fn[grid(meta)](*args, **meta, num_warps=forced.num_warps, num_stages=forced.num_stages)


def _launches(x, ids, lora_a, lora_b, router, probs, scale, top_k, renormalize, out, plan):
    """(kernel, role, grid, args, constexprs) of the shrink and the expand for one call (U′ allocated here)."""
    t, k = x.shape
    _, num_experts, _, rank = lora_a.shape
    n = lora_b.shape[3]
    mode = _routing_mode(router, probs)
    flags = _flags(x.dtype, num_experts, rank, mode, top_k, renormalize)
    bucket = triton.next_power_of_2(max(plan.adapter_tokens, 1))
    u_scaled = torch.empty((t, num_experts * rank), dtype=x.dtype, device=x.device)
    router_ = router if router is not None else lora_a  # unused pointers: any tensor
    probs_ = probs if probs is not None else lora_a
    router_strides = router.stride() if router is not None else (0, 0, 0)
    probs_strides = probs.stride() if probs is not None else (0, 0)
    shrink_args = (
        x, lora_a, router_, probs_, plan.perm, plan.tiles,
        u_scaled,
        k, num_experts, rank, bucket,
        x.stride(0), x.stride(1), *lora_a.stride(), *router_strides, *probs_strides, u_scaled.stride(0),
        float(scale),
    )  # fmt: skip
    shrink_flags = dict(flags, BLOCK_M=plan.block_m)
    expand_args = (
        u_scaled, lora_b, plan.perm, plan.tiles,
        out,
        n, num_experts, rank, bucket,
        u_scaled.stride(0), *lora_b.stride(), out.stride(0), out.stride(1),
    )  # fmt: skip
    expand_flags = dict(
        DOT_PRECISION=flags["DOT_PRECISION"],
        BLOCK_E=flags["BLOCK_E"],
        RANK_PAD=flags["RANK_PAD"],
        TAIL_STEP=_tail_step(flags["BLOCK_E"] * flags["RANK_PAD"]),
        BLOCK_M=plan.block_m,
    )
    num_tiles = plan.num_tiles

    def shrink_grid(meta):
        return (num_tiles,)

    def expand_grid(meta):
        return (num_tiles, triton.cdiv(n, meta["BLOCK_N"]))

    return [
        (_banked_shrink_kernel, "shrink", shrink_grid, shrink_args, shrink_flags),
        (_banked_expand_kernel, "expand", expand_grid, expand_args, expand_flags),
    ]


def _check_bank(x, ids, lora_a, lora_b, router, probs) -> None:
    if lora_a.dim() != 4 or lora_b.dim() != 4 or (router is not None and router.dim() != 3):
        raise ValueError(
            "lora_a [A, E, K, r], lora_b [A, E, r, N] and router [A, K, E] must be stacked per adapter, got "
            f"{list(lora_a.shape)}, {list(lora_b.shape)}, {None if router is None else list(router.shape)}"
        )
    if ids.dtype != torch.int64 or tuple(ids.shape) != (x.shape[0],) or ids.device != x.device:
        raise ValueError(
            f"ids must be int64 [T] = [{x.shape[0]}] on x's device {x.device}, got {ids.dtype} "
            f"{list(ids.shape)} on {ids.device}"
        )
    if probs is not None and tuple(probs.shape) != (x.shape[0], lora_a.shape[1]):
        raise ValueError(f"probs must be [T, E] = [{x.shape[0]}, {lora_a.shape[1]}], got {list(probs.shape)}")
    _check_kernel_inputs(x, None, None, lora_a[0], lora_b[0], None if router is None else router[0], probs)


def _refuse_grad(op: str, **tensors: Tensor | None) -> None:
    hint = "call under torch.no_grad() / torch.inference_mode(), or detach them"
    refuse_grad(f"{op} (banked Triton kernels)", hint, **tensors)


def molora_banked_forward(
    x: Tensor,
    ids: Tensor,
    out: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    router: Tensor | None,
    probs: Tensor | None,
    scale: float,
    top_k: int | None,
    renormalize: bool,
) -> Tensor:
    """out[t] += scale·Σ_e p_e (x_t A[a]_e) B[a]_e for every token t with a = ids[t] >= 0, in place; returns out.

    x [T, K]; ids [T] int64 in [-1, A); out [T, N] in x's dtype holding the base; lora_a [A, E, K, r],
    lora_b [A, E, r, N], router [A, K, E] (None: LoRA) float32; probs [T, E] float32 (sentence routing: each
    token's probabilities from its adapter's router, in token order; router then unused). No autograd."""
    _check_bank(x, ids, lora_a, lora_b, router, probs)
    if out.dtype != x.dtype or tuple(out.shape) != (x.shape[0], lora_b.shape[3]) or out.device != x.device:
        raise ValueError(
            f"out must be [T, N] = [{x.shape[0]}, {lora_b.shape[3]}] {x.dtype} on {x.device}, got "
            f"{list(out.shape)} {out.dtype} on {out.device}"
        )
    plan = plan_segments(ids, lora_a.shape[0], x.dtype)
    if plan.num_tiles == 0:  # no token names an adapter: the base is the result
        return out
    router = router if probs is None else None
    with launch_device(x.device):
        for kernel, role, grid, args, constexprs in _launches(
            x, ids, lora_a, lora_b, router, probs, scale, top_k, renormalize, out, plan
        ):
            _launch(kernel, role, grid, args, constexprs)
    return out


def molora_linear(
    x2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ids: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    router: Tensor | None,
    probs: Tensor | None,
    scale: float,
    top_k: int | None,
    renormalize: bool,
) -> Tensor:
    """MoLoRA linear with per-token adapters on x2d [T, K] -> [T, N] in x's dtype (forward only): the frozen GEMM
    x Wᵀ + b once over all tokens (``F.linear``), then the banked shrink and expand add each token's adapter."""
    _refuse_grad("molora_linear", x=x2d, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, router=router,
                 probs=probs)  # fmt: skip
    _check_kernel_inputs(x2d, weight, bias, lora_a[0], lora_b[0], None, None)
    out = torch.nn.functional.linear(x2d, weight, bias).contiguous()
    return molora_banked_forward(x2d, ids, out, lora_a, lora_b, router, probs, scale, top_k, renormalize)


def molora_adapter(
    x2d: Tensor,
    base: Tensor | None,
    ids: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    router: Tensor | None,
    probs: Tensor | None,
    scale: float,
    top_k: int | None,
    renormalize: bool,
) -> Tensor:
    """The adapter-only op with per-token adapters (forward only): base [T, N] in x's dtype (None: zeros) plus
    each token's adapter delta; rows of id -1 get the base alone. ``base`` itself is not modified (the output
    starts as a copy)."""
    _refuse_grad("molora_adapter", x=x2d, base=base, lora_a=lora_a, lora_b=lora_b, router=router, probs=probs)
    n = lora_b.shape[-1]
    _check_base(x2d, base, n)
    out = x2d.new_zeros((x2d.shape[0], n)) if base is None else base.clone(memory_format=torch.contiguous_format)
    return molora_banked_forward(x2d, ids, out, lora_a, lora_b, router, probs, scale, top_k, renormalize)


__all__ = [
    "SegmentPlan",
    "choose_block_m",
    "molora_adapter",
    "molora_banked_forward",
    "molora_linear",
    "plan_segments",
    "use_configs",
]
