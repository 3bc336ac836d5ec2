"""Analysis of the MoLoRA kernels (:mod:`.molora_linear`), off the kernel file: the HBM-traffic, FLOP and time
model of every launch (:func:`hbm_traffic`, checked against the interpreter's counted traffic in the tests),
:func:`choose_schedule` (the forward schedule ``schedule="auto"`` runs: the one the model times faster at each
schedule's best tiles; the launcher asks it once per shape), the ahead-of-time compile cases (``aot_cases()``,
for :mod:`.aot`) and the model report.

``python -m pemoe.kernels.triton.molora_linear_analysis`` prints the report;
``python -m pemoe.kernels.triton.aot pemoe.kernels.triton.molora_linear_analysis`` the compile report.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import triton

from pemoe.kernels.triton import molora_linear
from pemoe.kernels.triton.molora_linear import (
    GIVEN_PROBS,
    NO_ROUTER,
    SCHEDULES,
    TOKEN_ROUTER,
    Launch,
    Problem,
    _flags,
    _problem_from_args,
    _router_cols,
    _tail_step,
    backward_plan,
    forward_plan,
    legal_configs,
    plan_problem,
)
from pemoe.kernels.triton.plan import ITEMSIZE, dtype_name

# ------------------------------------------------------------------------------------------------
# HBM-traffic, FLOP and time models
# ------------------------------------------------------------------------------------------------


@dataclass
class KernelTraffic:
    """Bytes and FLOPs of one launch. ``loaded`` / ``stored``: every tile load and store of every program
    (what ``interpreter.count_traffic`` counts, masked lanes excluded); ``unique``: each tensor once
    (re-read tiles served by L2); ``flops``: tensor-core FLOPs of the padded tiles; ``programs``: grid size.
    ``interpreted``: False for torch reductions (not Triton kernels, not seen by the interpreter counter)."""

    name: str
    loaded: int
    stored: int
    unique: int
    flops: int
    programs: int
    interpreted: bool = True


def _total(name: str, kernels: list[KernelTraffic]) -> KernelTraffic:
    kernels = [k for k in kernels if k.interpreted] if name == "interpreted" else kernels
    return KernelTraffic(
        name,
        sum(k.loaded for k in kernels),
        sum(k.stored for k in kernels),
        sum(k.unique for k in kernels),
        sum(k.flops for k in kernels),
        sum(k.programs for k in kernels),
    )


@dataclass(frozen=True)
class DeviceModel:
    """Roofline constants of a GPU for :func:`modelled_seconds` (data, not measured here).

    ``launch_gap_s``: idle time between two dependent kernels queued in one stream (an assumption, ~1 µs;
    more when the CPU cannot keep the queue full); ``float32_flops``: the FMA rate ("ieee" float32 dots run
    on CUDA cores)."""

    name: str
    sms: int
    tensor_flops: float
    float32_flops: float
    hbm_bytes_per_s: float
    launch_gap_s: float


#: H100 SXM: 132 SMs, ~989 dense 16-bit tensor TFLOP/s, ~67 float32 TFLOP/s, ~3.35 TB/s.
H100 = DeviceModel("H100 SXM", 132, 989e12, 67e12, 3.35e12, 1e-6)


def modelled_seconds(kernels: list[KernelTraffic], dtype: Any, device: DeviceModel = H100) -> float:
    """Σ over launches of launch_gap + max(compute, memory): compute = ceil(programs / SMs) waves of one
    program's padded FLOPs at the per-SM peak; memory = unique bytes / HBM bandwidth. torch reductions
    count as launches too."""
    peak = device.float32_flops if dtype_name(dtype) == "float32" else device.tensor_flops
    total = 0.0
    for kern in kernels:
        per_program = kern.flops / max(kern.programs, 1)
        compute = math.ceil(kern.programs / device.sms) * per_program / (peak / device.sms)
        total += device.launch_gap_s + max(compute, kern.unique / device.hbm_bytes_per_s)
    return total


@dataclass
class TrafficModel:
    """:func:`hbm_traffic`'s answer: per-launch models of the forward (the chosen ``schedule``) and the
    backward, and references of the same shape (bytes, padded FLOPs)."""

    schedule: str
    forward_kernels: list[KernelTraffic]
    backward_kernels: list[KernelTraffic]
    linear_forward: int  # x, W, b in; y out
    linear_backward: int  # frozen linear: dy, W in; dx out
    linear_forward_flops: int  # 2·T·N·K
    linear_backward_flops: int  # a plain dgrad, 2·T·N·K
    linear_kernel: KernelTraffic  # a plain linear on the GEMM's default tiles (time model)
    minimum_forward: int  # x, W, b, adapters in; y out (nothing saved for backward)
    minimum_backward: int  # dy, x, W, adapters in; dx and adapter gradients out
    authors_forward: int  # the authors' unfused formulation, eager ops ([T, E, N] written and read)
    authors_backward: int
    dtype: Any = "bfloat16"
    extra: dict = field(default_factory=dict)

    @property
    def forward(self) -> KernelTraffic:
        return _total("forward", self.forward_kernels)

    @property
    def backward(self) -> KernelTraffic:
        return _total("backward", self.backward_kernels)

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

    def forward_seconds(self, device: DeviceModel = H100) -> float:
        return modelled_seconds(self.forward_kernels, self.dtype, device)

    def backward_seconds(self, device: DeviceModel = H100) -> float:
        return modelled_seconds(self.backward_kernels, self.dtype, device)

    def linear_seconds(self, device: DeviceModel = H100) -> float:
        return modelled_seconds([self.linear_kernel], self.dtype, device)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def _problem(role: str, t: int, k: int, n: int, flags: dict, extra: dict | None = None) -> Problem:
    elem = 4 if flags["DOT_PRECISION"] == "ieee" else 2
    be, rp = flags["BLOCK_E"], flags["RANK_PAD"]
    rows, cols, red = {
        "pack": (0, max(k, n), 0),
        "fused": (t, n, k),
        "shrink": (t, 0, k),
        "expand": (t, n, k),
        "grad_u": (t, 0, n),
        "dx": (t, k, n),
        "wgrad_a": (t, k, t),
        "wgrad_b": (t, n, t),
    }[role]
    return Problem(role, rows, cols, red, be, rp, elem, _router_cols(role, {**flags, **(extra or {})}, be, elem))


def default_config(role: str, tokens: int, in_features: int, out_features: int, flags: dict) -> triton.Config:
    """The configuration a launch role runs by default (the first one surviving pruning); ``flags`` as from
    ``_flags`` (plus ROUTER_TAIL / HAS_RHS2 where they matter)."""
    return legal_configs(_problem(role, tokens, in_features, out_features, flags, flags))[0]


def hbm_traffic(
    tokens: int,
    in_features: int,
    out_features: int,
    num_experts: int,
    rank: int,
    dtype: Any = "bfloat16",
    *,
    routing_mode: int | None = None,
    bias: bool = True,
    save_for_backward: bool = True,
    needs: tuple[bool, bool, bool, bool, bool, bool] = (True, True, True, True, True, True),
    schedule: str = "auto",
    configs: dict[str, triton.Config] | None = None,
    reduce_rows: int | None = None,
) -> TrafficModel:
    """Modelled bytes and FLOPs of every launch of the forward (``schedule``: "fused", "two_kernel" or
    "auto" = :func:`choose_schedule`) and the backward at one shape.

    ``routing_mode``: TOKEN_ROUTER (default for E > 1), NO_ROUTER (LoRA, default for E = 1) or
    GIVEN_PROBS (sentence routing). ``needs``: which gradients the backward computes, in the order
    (dx, d bias, d lora_a, d lora_b, d router, d probs). ``configs``: per launch role (defaults: each
    role's default configuration). ``reduce_rows``: the weight-gradient token chunk (default REDUCE_ROWS).
    """
    t, k, n, e, r = tokens, in_features, out_features, num_experts, rank
    if routing_mode is None:
        routing_mode = NO_ROUTER if e == 1 else TOKEN_ROUTER
    if schedule == "auto":
        schedule = choose_schedule(t, k, n, e, r, dtype, routing_mode=routing_mode, save_for_backward=save_for_backward)
    configs = configs or {}
    rr = reduce_rows or molora_linear.REDUCE_ROWS  # read at call time: tests shrink it
    es = ITEMSIZE[dtype_name(dtype)]
    bes = es if bias else 0
    token, given = routing_mode == TOKEN_ROUTER, routing_mode == GIVEN_PROBS
    flags = _flags(dtype, e, r, routing_mode, None, False)
    bj = flags["BLOCK_E"] * flags["RANK_PAD"]
    a_bytes, b_bytes, router_bytes, probs_bytes = 4 * e * k * r, 4 * e * r * n, 4 * k * e, 4 * t * e
    a_cat, b_cat = k * bj * es, bj * n * es  # packed A_cat [K, BLOCK_J], B_cat [BLOCK_J, N] (activation dtype)
    u_bytes, p_bytes, tail_bytes = 4 * t * e * r, 4 * t * e, t * e * r * es  # U f32, p f32, U′ / dU
    x_b, w_b, y_b, dy_b = t * k * es, n * k * es, t * n * es, t * n * es

    def cfg(role, extra=None):
        return configs.get(role) or legal_configs(_problem(role, t, k, n, flags, extra))[0]

    def router_cols(role, extra=None):
        return _problem(role, t, k, n, flags, extra).router_cols

    def pack(pack_a, pack_b, split_b):
        """lora_a / lora_b (float32, real elements) in; A_cat, B_cat (and B_lo) out, padded, activation dtype."""
        args = dict(K=k, N=n, PACK_A=pack_a, PACK_B=pack_b, **flags)
        c = configs.get("pack") or legal_configs(_problem_from_args("pack", args))[0]
        bc = c.kwargs["BLOCK_C"]
        loaded = a_bytes * pack_a + b_bytes * pack_b
        stored = a_cat * pack_a + b_cat * (1 + split_b) * pack_b
        programs = _cdiv(k, bc) * pack_a + _cdiv(n, bc) * pack_b
        return KernelTraffic("pack A_cat / B_cat", loaded, stored, loaded + stored, 0, programs)

    def gemm(name, rows, cols, red, a_b, b_b, tail_adapter, log_b, router_b, bias_b, out_b, rcols, c):
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        nm, nn = _cdiv(rows, bm), _cdiv(cols, bn)
        loaded = (a_b + tail_bytes + log_b) * nn + (b_b + tail_adapter + router_b + bias_b) * nm
        unique = a_b + tail_bytes + log_b + b_b + tail_adapter + router_b + bias_b + out_b
        flops = 2 * nm * bm * nn * bn * (_pad(red, bk) + bj + rcols)
        return KernelTraffic(name, loaded, out_b, unique, flops, nm * nn)

    # ---- forward
    saved = (u_bytes if save_for_backward else 0) + (p_bytes if save_for_backward and token else 0)
    rc = router_cols("shrink", {"ROUTING": routing_mode})
    if schedule == "fused":
        fc = cfg("fused", {"ROUTING": routing_mode})
        bm, bn, tiles, bk = fc.kwargs["BLOCK_M"], fc.kwargs["BLOCK_N"], fc.kwargs["N_TILES"], fc.kwargs["BLOCK_K"]
        nm, nn = _cdiv(t, bm), _cdiv(n, bn * tiles)  # programs per column / per row
        loaded = (
            x_b * nn * tiles  # x, once per column tile (masked-off tiles past N included)
            + w_b * nm  # W, once per row of programs
            + a_cat * nm * nn  # A_cat: every program, in its first tile
            + (router_bytes * nm * nn if token else 0)
            + (probs_bytes * nn if given else 0)
            + b_cat * nm  # B_cat: each program its columns
            + n * bes * nm
        )
        stored = y_b + saved
        unique = x_b + w_b + n * bes + a_cat + b_cat + (router_bytes if token else 0)
        unique += (probs_bytes if given else 0) + stored
        padded_t, padded_n = nm * bm, nn * bn * tiles
        flops = 2 * padded_t * padded_n * _pad(k, bk) + 2 * padded_t * _pad(k, bk) * (bj + rc) * nn
        flops += 2 * padded_t * bj * padded_n
        forward_kernels = [
            pack(True, True, False),
            KernelTraffic("fused forward", loaded, stored, unique, flops, nm * nn),
        ]
    else:
        sc = cfg("shrink", {"ROUTING": routing_mode})
        bm, bk = sc.kwargs["BLOCK_M"], sc.kwargs["BLOCK_K"]
        nm = _cdiv(t, bm)
        ins = x_b + (probs_bytes if given else 0)
        loaded = ins + (a_cat + (router_bytes if token else 0)) * nm
        stored = tail_bytes + saved
        unique = ins + a_cat + (router_bytes if token else 0) + stored
        shrink = KernelTraffic("shrink", loaded, stored, unique, 2 * nm * bm * _pad(k, bk) * (bj + rc), nm)
        expand = gemm("expand GEMM", t, n, k, x_b, w_b, b_cat, 0, 0, n * bes, y_b, 0, cfg("expand"))
        forward_kernels = [pack(True, True, False), shrink, expand]

    # ---- backward
    need_dx, need_bias, need_a, need_b, need_router, need_probs = needs
    need_router, need_probs = need_router and token, need_probs and given
    need_d_u = need_dx or need_a
    need_d_route = (token and (need_dx or need_router)) or need_probs
    backward_kernels = []
    g = need_d_u or need_d_route
    split = g and need_d_route and es < 4  # G float32-grade: B_cat + B_lo
    if need_dx or g:
        backward_kernels.append(pack(need_dx, g, split))
    if g or need_b:
        gc = cfg("grad_u")
        bm, bk = gc.kwargs["BLOCK_M"], gc.kwargs["BLOCK_K"]
        nm = _cdiv(t, bm)
        b_read = b_cat * (1 + split)
        loaded = (p_bytes if (token or given) else 0) + (u_bytes if (need_b or need_d_route) else 0)
        loaded += (dy_b + b_read * nm) if g else 0
        stored = tail_bytes * (need_d_u + need_b) + (p_bytes if need_d_route else 0)
        unique = loaded - (b_read * (nm - 1) if g else 0) + stored
        flops = 2 * nm * bm * _pad(n, bk) * bj * (1 + split) if g else 0
        backward_kernels.append(KernelTraffic("grad_u (G = dy·B_catᵀ)", loaded, stored, unique, flops, nm))
    if need_dx:
        extra = {"ROUTER_TAIL": token}
        backward_kernels.append(
            gemm(
                "dx GEMM",
                t,
                k,
                n,
                dy_b,
                w_b,
                a_cat,
                p_bytes if token else 0,
                router_bytes if token else 0,
                0,
                x_b,
                router_cols("dx", extra),
                cfg("dx", extra),
            )  # fmt: skip
        )
    chunks = _cdiv(t, rr)
    padded_rows = lambda bt: sum(_pad(min(rr, t - z * rr), bt) for z in range(chunks))  # noqa: E731
    reductions = []
    for role, need_rhs, need_rhs2, row_sum, lhs_b, cols, part_rhs, part_rhs2 in (
        ("wgrad_a", need_a, need_router, False, x_b, k, 4 * k * e * r, 4 * k * e),
        ("wgrad_b", need_b, False, need_bias, dy_b, n, 4 * n * e * r, 4 * n),
    ):
        if not (need_rhs or need_rhs2 or row_sum):
            continue
        extra = {"HAS_RHS2": need_rhs2}
        wc = cfg(role, extra)
        bc, bt = wc.kwargs["BLOCK_C"], wc.kwargs["BLOCK_T"]
        nc, nj = _cdiv(cols, bc), bj // _tail_step(bj)  # column tiles; J_STEP tiles (lhs read by each)
        rhs = tail_bytes * need_rhs + p_bytes * need_rhs2
        stored = chunks * (part_rhs * need_rhs + (part_rhs2 if (need_rhs2 or row_sum) else 0))
        flops = 2 * nc * bc * padded_rows(bt) * (bj * need_rhs + router_cols(role, extra) * nj)
        name = "wgrad: d lora_a, d router" if role == "wgrad_a" else "wgrad: d lora_b, d bias"
        loaded = lhs_b * nj + rhs * nc
        backward_kernels.append(KernelTraffic(name, loaded, stored, lhs_b + rhs + stored, flops, chunks * nc * nj))
        final = stored // chunks
        if chunks > 1:
            reductions.append(KernelTraffic(f"torch Σ chunks ({role})", stored, final, stored + final, 0, 1, False))
    backward_kernels += reductions

    # ---- references
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
    lc = cfg("expand")
    bm, bn, bk = lc.kwargs["BLOCK_M"], lc.kwargs["BLOCK_N"], lc.kwargs["BLOCK_K"]
    nm, nn = _cdiv(t, bm), _cdiv(n, bn)
    linear_bytes = x_b + w_b + n * bes + y_b
    linear_kernel = KernelTraffic("plain linear", 0, y_b, linear_bytes, 2 * nm * bm * nn * bn * _pad(k, bk), nm * nn)
    return TrafficModel(
        schedule=schedule,
        forward_kernels=forward_kernels,
        backward_kernels=backward_kernels,
        linear_forward=linear_bytes,
        linear_backward=y_b + w_b + x_b,
        linear_forward_flops=2 * t * n * k,
        linear_backward_flops=2 * t * n * k,
        linear_kernel=linear_kernel,
        minimum_forward=x_b + w_b + n * bes + adapters + y_b,
        minimum_backward=y_b + w_b + x_b + adapters + x_b + grads,
        authors_forward=int(authors_forward),
        authors_backward=int(authors_backward),
        dtype=dtype,
    )


def schedule_costs(
    tokens: int,
    in_features: int,
    out_features: int,
    num_experts: int,
    rank: int,
    dtype: Any = "bfloat16",
    *,
    routing_mode: int | None = None,
    save_for_backward: bool = True,
    device: DeviceModel = H100,
) -> dict[str, float]:
    """Modelled forward seconds of each schedule (:func:`modelled_seconds`), each with its best legal
    configuration (what autotuning would pick if the model were right)."""
    t, k, n, e, r = tokens, in_features, out_features, num_experts, rank
    if routing_mode is None:
        routing_mode = NO_ROUTER if e == 1 else TOKEN_ROUTER
    flags = dict(_flags(dtype, e, r, routing_mode, None, False), ROUTING=routing_mode)
    kw = dict(routing_mode=routing_mode, save_for_backward=save_for_backward, needs=(False,) * 6)
    costs = {}
    for schedule, roles in (("fused", ("fused",)), ("two_kernel", ("shrink", "expand"))):
        best = math.inf
        options = [legal_configs(_problem(role, t, k, n, flags, flags)) for role in roles]
        for combo in _product(options):
            m = hbm_traffic(t, k, n, e, r, dtype, schedule=schedule, configs=dict(zip(roles, combo, strict=True)), **kw)
            best = min(best, m.forward_seconds(device))
        costs[schedule] = best
    return costs


def _product(options: list[list]) -> list[tuple]:
    out: list[tuple] = [()]
    for opts in options:
        out = [prev + (o,) for prev in out for o in opts]
    return out


def choose_schedule(
    tokens: int,
    in_features: int,
    out_features: int,
    num_experts: int,
    rank: int,
    dtype: Any = "bfloat16",
    *,
    routing_mode: int | None = None,
    save_for_backward: bool = True,
    device: DeviceModel = H100,
) -> str:
    """ "fused" or "two_kernel": the smaller modelled forward time (:func:`schedule_costs`); ties -> "fused"."""
    costs = schedule_costs(
        tokens, in_features, out_features, num_experts, rank, dtype,
        routing_mode=routing_mode, save_for_backward=save_for_backward, device=device,
    )  # fmt: skip
    return "fused" if costs["fused"] <= costs["two_kernel"] else "two_kernel"


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases and the model report
# ------------------------------------------------------------------------------------------------

#: T5-large attention projections (T = 2048 tokens, K = N = 1024) at the paper's MoLoRA settings.
AOT_SHAPES = ((2048, 1024, 1024, 1, 4), (2048, 1024, 1024, 10, 4), (2048, 1024, 1024, 15, 16))
AOT_DTYPES = ("float16", "bfloat16", "float32")


def _example_launches(t, k, n, e, r, dtype) -> list[Launch]:
    """Every launch of both forward schedules and the full backward at one shape (``dtype``: the activation
    dtype, a name or a torch dtype)."""
    router = e > 1
    pb = plan_problem(
        (t, k), (e, k, r), (e, r, n), dtype, has_router=router, has_probs=False, top_k=None, renormalize=False,
        has_bias=True,
    )  # fmt: skip
    launches = []
    for schedule in SCHEDULES:
        launches += forward_plan(pb, 4.0, True, schedule).launches
    return launches + list(backward_plan(pb, 4.0, (True,) * 5 + (False,)).launches)


def _aot_args(launch: Launch, t, k, n, e, r, dtype) -> dict:
    """A launch's named arguments on CPU tensors of the example shape (what :class:`.aot.AotCase` takes)."""
    import torch

    from pemoe.kernels.triton.autograd import allocate, launch_args, torch_dtype

    act = torch_dtype(dtype_name(dtype))
    cpu = torch.device("cpu")
    tensors = dict(
        x=torch.empty((t, k), dtype=act), weight=torch.empty((n, k), dtype=act), bias=torch.empty((n,), dtype=act),
        lora_a=torch.empty((e, k, r)), lora_b=torch.empty((e, r, n)), router=torch.empty((k, e)) if e > 1 else None,
        probs=None, base=None, dy=torch.empty((t, n), dtype=act), u=torch.empty((t, e * r)),
        p_soft=torch.empty((t, e)) if e > 1 else None,
    )  # fmt: skip
    pb = plan_problem((t, k), (e, k, r), (e, r, n), dtype, has_router=e > 1, has_probs=False, top_k=None,
                      renormalize=False, has_bias=True)  # fmt: skip
    for plan in (forward_plan(pb, 4.0, True, "two_kernel"), backward_plan(pb, 4.0, (True,) * 5 + (False,))):
        tensors |= {k_: v for k_, v in allocate(plan.buffers, cpu).items() if k_ not in tensors}
    return launch_args(launch, tensors, cpu)


def aot_cases() -> list:
    """Every configuration autotuning may choose, every launch role, fp16 / bf16 / fp32, the AOT_SHAPES.

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
            name = f"{dtype} E={e} r={r}"
            for launch in _example_launches(t, k, n, e, r, dtype):
                named = _aot_args(launch, t, k, n, e, r, dtype)
                chosen = list(launch.configs)
                for i, cfg in enumerate(chosen[:1] if defaults_only else chosen):
                    kw = cfg.kwargs
                    tile = "x".join(str(v) for key, v in kw.items() if key.startswith("BLOCK"))
                    tile += f"x{kw['N_TILES']}tiles" if kw.get("N_TILES", 1) > 1 else ""
                    cases.append(
                        AotCase(
                            name=f"{name} {launch.role} {tile}",
                            kernel=launch.kernel,
                            args=named,
                            constexprs={**launch.constexprs, **kw},
                            num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages,
                            default=i == 0,
                        )
                    )
    return [c for c in cases if select.search(c.name)]


#: Shapes of the model report: T5-large attention (K = N = 1024) and T5-XL FFN in (2048 -> 5120) and
#: out (5120 -> 2048), T = 2048 tokens; plus a decode-sized T.
REPORT_SHAPES = (
    ("T5-large q/k/v/o", 2048, 1024, 1024),
    ("T5-XL wi (2048->5120)", 2048, 2048, 5120),
    ("T5-XL wo (5120->2048)", 2048, 5120, 2048),
    ("T5-large, T = 64", 64, 1024, 1024),
)


def report(dtype: Any = "bfloat16", experts: tuple[tuple[int, int], ...] = ((10, 4), (15, 16), (1, 4))) -> str:
    """The model's table: bytes, padded FLOPs and modelled H100 time of each schedule vs a plain linear."""
    lines = [
        f"{'shape':<24} {'E':>3} {'r':>3} {'schedule':<10} {'MiB':>7} {'bytes':>6} {'FLOPs':>6} {'µs':>6} "
        f"{'time':>6}  (ratios vs a plain linear of the same shape; time: H100 model incl. launch gaps)"
    ]
    for label, t, k, n in REPORT_SHAPES:
        for e, r in experts:
            pick = choose_schedule(t, k, n, e, r, dtype)
            for schedule in SCHEDULES:
                m = hbm_traffic(t, k, n, e, r, dtype, schedule=schedule, needs=(False,) * 6)
                sec, lin = m.forward_seconds(), m.linear_seconds()
                lines.append(
                    f"{label:<24} {e:>3} {r:>3} {schedule + ('*' if schedule == pick else ''):<10} "
                    f"{m.forward.unique / 2**20:7.2f} {m.forward_ratio:6.3f} {m.forward_flops_ratio:6.3f} "
                    f"{sec * 1e6:6.2f} {sec / lin:6.3f}"
                )
            m = hbm_traffic(t, k, n, e, r, dtype, schedule=pick)
            lines.append(
                f"{label:<24} {e:>3} {r:>3} {'backward':<10} {m.backward.unique / 2**20:7.2f} "
                f"{m.backward_ratio:6.3f} {m.backward_flops_ratio:6.3f} {m.backward_seconds() * 1e6:6.2f} "
                f"{m.backward_seconds() / m.linear_seconds():6.3f}"
            )
    return "\n".join(lines) + (
        "\n(bytes / FLOPs / µs at default tiles; * = choose_schedule's pick, which compares each schedule at its"
        " best legal tiles; backward ratios vs a plain dgrad)"
    )


if __name__ == "__main__":
    print(report())
