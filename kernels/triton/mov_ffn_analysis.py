"""Analysis of the fused MoV FFN kernels (:mod:`.mov_ffn`), off the runtime path: the HBM-traffic model (bytes every
launch moves, checked against the interpreter's counted traffic in the tests) and the ahead-of-time compile
cases (``aot_cases()``: every launch autotuning may choose, for :mod:`.aot`).

``python -m pemoe.kernels.triton.aot pemoe.kernels.triton.mov_ffn_analysis`` prints the compile report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton

from pemoe.kernels.triton import mov_ffn
from pemoe.kernels.triton.autograd import allocate, launch_args
from pemoe.kernels.triton.mov_ffn import (
    ROUTE_GIVEN,
    ROUTE_NONE,
    ROUTE_SELF,
    ROUTER_BACKWARD_CONFIG,
    _ffn_down_backward_kernel,
    _ffn_down_kernel,
    _ffn_up_backward_kernel,
    _ffn_up_kernel,
    down_backward_launch,
    down_launch,
    plan_problem,
    router_backward_launch,
    up_backward_launch,
    up_launch,
)
from pemoe.kernels.triton.plan import dtype_name

# ------------------------------------------------------------------------------------------
# HBM-traffic model
# ------------------------------------------------------------------------------------------


@dataclass
class KernelBytes:
    """Global-memory bytes of one launch: ``loaded``/``stored`` as requested by the kernel (tile
    re-reads included: exactly what the interpreter's count_traffic sees), and ``unique`` (every
    tensor touched once: the DRAM traffic when re-reads hit L2). ``interpreted`` is False for the
    torch GEMMs/reductions, modelled as ideal (each operand once)."""

    loaded: int
    stored: int
    unique: int
    interpreted: bool = True

    @property
    def total(self) -> int:
        return self.loaded + self.stored


@dataclass
class TrafficModel:
    """Bytes per kernel for one mov_ffn call, next to the baselines (see :func:`hbm_traffic`)."""

    kernels: dict[str, KernelBytes]
    minimum: dict[str, int]  # "forward"/"backward": inputs once, outputs once
    plain_ffn: dict[str, KernelBytes]  # the same two-kernel FFN (same tiles) without MoV
    unfused_forward: int  # the eager sequence of the "torch" implementation, each op ideal
    configs: dict[str, dict[str, int]] = field(default_factory=dict)

    def total(self, phase: str, which: str = "requested") -> int:
        names = _PHASES[phase]
        return sum((k.total if which == "requested" else k.unique) for n, k in self.kernels.items() if n in names)

    def interpreted(self, phase: str) -> tuple[int, int]:
        """(loaded, stored) of the Triton kernels of a phase: what count_traffic must see."""
        ks = [k for n, k in self.kernels.items() if n in _PHASES[phase] and k.interpreted]
        return sum(k.loaded for k in ks), sum(k.stored for k in ks)

    def plain(self, which: str = "requested") -> int:
        return sum(k.total if which == "requested" else k.unique for k in self.plain_ffn.values())

    def summary(self) -> str:
        lines = [f"{'kernel':<28} {'loaded MB':>10} {'stored MB':>10} {'unique MB':>10}"]
        for name, k in self.kernels.items():
            tag = "" if k.interpreted else "  (torch)"
            lines.append(f"{name:<28} {k.loaded / 1e6:>10.2f} {k.stored / 1e6:>10.2f} {k.unique / 1e6:>10.2f}{tag}")
        fwd, fwd_u, plain, plain_u = (
            self.total("forward"),
            self.total("forward", "unique"),
            self.plain(),
            self.plain("unique"),
        )
        lines.append(
            f"forward: requested {fwd / 1e6:.2f} MB = {fwd / plain:.3f}x plain FFN ({plain / 1e6:.2f} MB); "
            f"unique {fwd_u / 1e6:.2f} MB = {fwd_u / plain_u:.3f}x plain FFN ({plain_u / 1e6:.2f} MB), "
            f"{fwd_u / self.minimum['forward']:.3f}x minimum ({self.minimum['forward'] / 1e6:.2f} MB), "
            f"unfused torch sequence {self.unfused_forward / 1e6:.2f} MB"
        )
        if self.minimum.get("backward"):
            bwd, bwd_u = self.total("backward"), self.total("backward", "unique")
            lines.append(
                f"backward: requested {bwd / 1e6:.2f} MB, unique {bwd_u / 1e6:.2f} MB = "
                f"{bwd_u / self.minimum['backward']:.3f}x minimum ({self.minimum['backward'] / 1e6:.2f} MB)"
            )
        return "\n".join(lines)


_PHASES = {
    "forward": ("_ffn_up_kernel", "_ffn_down_kernel"),
    "backward": (
        "_ffn_down_backward_kernel",
        "d_experts_reduce",
        "_router_backward_kernel",
        "_ffn_up_backward_kernel",
        "d_router_reduce",
        "dx_gemms",
    ),
}


def _chosen_configs(kernel, dtype: torch.dtype, **sizes) -> list[triton.Config]:
    """The configs autotune may choose for a launch with these sizes and operand dtype (the first one
    is what the interpreter runs)."""
    configs = kernel.configs
    if len(configs) > 1 and kernel.early_config_prune:
        operand = torch.empty(0, dtype=dtype)
        configs = kernel.early_config_prune(
            configs, {**sizes, "x_ptr": operand, "inter_ptr": operand, "dy_ptr": operand}
        )
    return configs


def _row_tiles(T: int, chunk: int, block_m: int) -> int:
    """Row-tile iterations of all the programs of one F tile of (c) / (d): each chunk's rows in BLOCK_M steps."""
    full, last = divmod(T, chunk)
    return full * triton.cdiv(chunk, block_m) + triton.cdiv(last, block_m)


def hbm_traffic(
    T: int,
    M: int,
    F: int,
    E: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    gated: bool = True,
    routing: str = ROUTE_SELF,
    top_k: int | None = None,
    needs: tuple[bool, bool, bool, bool] = (True, True, True, False),
    configs: dict[str, dict[str, int]] | None = None,
) -> TrafficModel:
    """Bytes each kernel of one mov_ffn forward (+ backward when any of ``needs`` = (dx, d router,
    d experts, d probs) is set) loads and stores, for the tile configs it runs (``configs`` per
    kernel name; default: the interpreter's choice). Baselines: the minimum (inputs once, outputs
    once), a plain two-kernel FFN with the same tiles, and the unfused eager sequence. ``routing``
    is "self", "given" (sentence routing: probs in) or "none" (E = 1). Counts only unmasked
    elements, as the kernels' masks do. ``top_k`` changes no byte count (kept for symmetry).
    """
    del top_k
    isz = torch.empty((), dtype=dtype).element_size()
    f32 = 4
    cfg = {
        name: dict(_chosen_configs(kernel, dtype, T=T, M=M, F=F, E=E)[0].kwargs)
        for name, kernel in (
            ("_ffn_up_kernel", _ffn_up_kernel),
            ("_ffn_down_kernel", _ffn_down_kernel),
            ("_ffn_down_backward_kernel", _ffn_down_backward_kernel),
            ("_ffn_up_backward_kernel", _ffn_up_backward_kernel),
        )
    }
    cfg.update(configs or {})
    self_routed, given = routing == ROUTE_SELF, routing == ROUTE_GIVEN
    n_w_in = 2 if gated else 1
    x_b, y_b, u_b, w_in_b, wo_b = T * M * isz, T * M * isz, T * F * isz, F * M * isz, M * F * isz
    te_b, fe_b = T * E * f32, F * E * f32
    ex_b = (E if routing != ROUTE_NONE else 1) * F * f32  # what the merge reads of experts
    kernels: dict[str, KernelBytes] = {}
    plain: dict[str, KernelBytes] = {}

    pb = plan_problem(
        T, M, F, E, dtype_name(dtype), gated=gated, has_router=self_routed, has_probs=given,
        activation="gelu_new", top_k=None, renormalize=False,
    )  # fmt: skip
    # ---- (a): one logit partial slot per F chunk (the launch plan's choice)
    c = cfg["_ffn_up_kernel"]
    n_m, n_f = triton.cdiv(T, c["BLOCK_M"]), triton.cdiv(F, c["BLOCK_F"])
    logit_slots = triton.cdiv(F, mov_ffn.up_f_chunk(pb))
    kernels["_ffn_up_kernel"] = KernelBytes(
        loaded=x_b * n_f + n_w_in * w_in_b * n_m + (fe_b * n_m if self_routed else 0),
        stored=u_b + (logit_slots * te_b if self_routed else 0),
        unique=x_b + n_w_in * w_in_b + u_b + ((fe_b + logit_slots * te_b) if self_routed else 0),
    )
    plain["up"] = KernelBytes(x_b * n_f + n_w_in * w_in_b * n_m, u_b, x_b + n_w_in * w_in_b + u_b)
    # ---- (b)
    c = cfg["_ffn_down_kernel"]
    n_m, n_n = triton.cdiv(T, c["BLOCK_M"]), triton.cdiv(M, c["BLOCK_N"])
    backward = any(needs)
    p_in = logit_slots * te_b if self_routed else (te_b if given else 0)
    kernels["_ffn_down_kernel"] = KernelBytes(
        loaded=(p_in + u_b) * n_n + ex_b * n_m * n_n + wo_b * n_m,
        stored=y_b + (te_b if self_routed and backward else 0),
        unique=p_in + u_b + ex_b + wo_b + y_b + (te_b if self_routed and backward else 0),
    )
    plain["down"] = KernelBytes(u_b * n_n + wo_b * n_m, y_b, u_b + wo_b + y_b)
    router_in = fe_b if self_routed else 0
    minimum = {"forward": x_b + n_w_in * w_in_b + wo_b + router_in + ex_b + y_b}
    # unfused eager sequence ("torch" implementation; every op reads its inputs once, writes once)
    cast = (u_b + T * F * f32) if isz < 4 else 0  # a -> float32 for the router GEMM
    mov_b = 0
    if self_routed:
        mov_b = cast + (T * F * f32 + fe_b + te_b) + 2 * te_b
    if routing != ROUTE_NONE:
        mov_b += T * E * isz + ex_b + u_b  # s = p·experts in the activation dtype
    mov_b += 3 * u_b  # a * s
    gate_b = (x_b + w_in_b + u_b) + 3 * u_b if gated else 0  # g = x wi_1ᵀ; (a s) * g
    unfused = (x_b + w_in_b + u_b) + 2 * u_b + mov_b + gate_b + (u_b + wo_b + y_b)

    if backward:
        need_x, need_router, need_experts, need_probs = needs
        need_dr = need_router and self_routed
        need_dp = (self_routed and (need_x or need_dr)) or (given and need_probs)
        p_saved = te_b if routing != ROUTE_NONE else 0
        # row chunks of (c) and (d) (the launch plan's choice: one d experts / d router partial slot each)
        # ---- (c): programs own (row chunk, F chunk); dp: one slot per F chunk, d experts: one per row chunk
        c = cfg["_ffn_down_backward_kernel"]
        chunk, cols = mov_ffn.down_backward_chunks(pb)
        n_c, n_m, n_f = triton.cdiv(T, chunk), _row_tiles(T, chunk, c["BLOCK_M"]), triton.cdiv(F, c["BLOCK_F"])
        dp_slots = triton.cdiv(F, cols)
        dex_rows = E if routing != ROUTE_NONE else 1
        dex_b = n_c * dex_rows * F * f32 if need_experts else 0
        loaded = x_b * n_f + wo_b * n_m + u_b + p_saved * n_f  # dy is [T, M] like x
        loaded += (ex_b * n_m if need_x else 0) + (E * F * f32 * n_c if need_dp else 0)  # dp's experts: a row chunk
        loaded += (n_f - dp_slots) * te_b if need_dp else 0  # dp slot rows read back by every F tile but the first
        stored = (u_b if need_x else 0) + (n_f * te_b if need_dp else 0) + dex_b  # dp: every F tile stores its sum
        unique = x_b + wo_b + u_b + p_saved + ex_b + (u_b if need_x else 0) + (dp_slots * te_b if need_dp else 0)
        kernels["_ffn_down_backward_kernel"] = KernelBytes(loaded, stored, unique + dex_b)
        if need_experts:
            part = n_c * dex_rows * F * f32
            kernels["d_experts_reduce"] = KernelBytes(part, dex_rows * F * f32, part + dex_rows * F * f32, False)
        # ---- (r)
        if need_dp:
            loaded = dp_slots * te_b + (te_b if self_routed else 0)
            kernels["_router_backward_kernel"] = KernelBytes(loaded, te_b, loaded + te_b)
        # ---- (d)
        if need_x or need_dr:
            c = cfg["_ffn_up_backward_kernel"]
            chunk = mov_ffn.row_chunk(pb, _ffn_up_backward_kernel.configs)
            n_c, n_m, n_f = triton.cdiv(T, chunk), _row_tiles(T, chunk, c["BLOCK_M"]), triton.cdiv(F, c["BLOCK_F"])
            loaded = x_b * n_f + n_w_in * w_in_b * n_m + (te_b * n_f if self_routed else 0)
            loaded += (u_b + (fe_b * n_c if self_routed else 0)) if need_x else 0  # router: once a chunk
            stored = (n_w_in * u_b if need_x else 0) + (n_c * fe_b if need_dr else 0)
            unique = x_b + n_w_in * w_in_b + (te_b if self_routed else 0) + (u_b + router_in if need_x else 0) + stored
            kernels["_ffn_up_backward_kernel"] = KernelBytes(loaded, stored, unique)
            if need_dr:
                kernels["d_router_reduce"] = KernelBytes(n_c * fe_b, fe_b, n_c * fe_b + fe_b, False)
            if need_x:  # dx = dh0·wi_0 (+ addmm_ dg·wi_1: reads dx back)
                loaded = u_b + w_in_b + ((u_b + w_in_b + x_b) if gated else 0)
                stored = x_b * (2 if gated else 1)
                kernels["dx_gemms"] = KernelBytes(loaded, stored, loaded + stored, False)
        minimum["backward"] = (
            x_b + x_b + n_w_in * w_in_b + wo_b + router_in + ex_b + u_b + p_saved  # dy, x, weights, saved
            + (x_b if need_x else 0) + (fe_b if need_dr else 0) + (ex_b if need_experts else 0)
            + (te_b if given and need_probs else 0)
        )  # fmt: skip
    return TrafficModel(kernels, minimum, plain, unfused, cfg)


def down_mma_flops(
    T: int, M: int, F: int, E: int, *, dtype: torch.dtype = torch.bfloat16, routing: str = ROUTE_SELF,
    config: dict[str, int] | None = None,
) -> dict[str, int]:  # fmt: skip
    """Tensor-core work of (b) as its tiles run it (padded to whole tiles; 2 FLOPs a multiply-add): "gemm", the
    (u ⊙ s)·woᵀ dots, and "merge", the s = p·experts dots that every one of the cdiv(M, BLOCK_N) column blocks
    of a row block recomputes at each K step ([BLOCK_M, BLOCK_E]·[BLOCK_E, BLOCK_K]: BLOCK_E / BLOCK_N of the gemm;
    0 without a router, where s is experts[0]); "merge_once": the same merge computed once per row tile and K step
    (what storing s or u ⊙ s would cost in FLOPs, at 2·T·F·itemsize more HBM bytes). ``config``: (b)'s tiles
    (default: the interpreter's choice)."""
    c = config or dict(_chosen_configs(_ffn_down_kernel, dtype, T=T, M=M, F=F, E=E)[0].kwargs)
    block_e = max(16, triton.next_power_of_2(E))
    n_m, n_n, steps = triton.cdiv(T, c["BLOCK_M"]), triton.cdiv(M, c["BLOCK_N"]), triton.cdiv(F, c["BLOCK_K"])
    per_step = 2 * c["BLOCK_M"] * c["BLOCK_K"]
    merge_once = 0 if routing == ROUTE_NONE else n_m * steps * per_step * block_e
    return dict(gemm=n_m * n_n * steps * per_step * c["BLOCK_N"], merge=merge_once * n_n, merge_once=merge_once)


# ------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (pemoe.kernels.triton.aot)
# ------------------------------------------------------------------------------------------

#: T5-large FFN (v1.1 widths, one 2 × 1024-token batch).
AOT_SHAPE = dict(T=2048, M=1024, F=2816)
#: (kernel, case name, capability) of the default configs known to spill: none (the AOT tests require exactly
#: this set, so a new spill must be listed here with its reason).
KNOWN_SPILLS: set[tuple[str, str, int]] = set()
AOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _aot_problem_tensors(dtype, gated, mode, E):
    T, M, F = AOT_SHAPE["T"], AOT_SHAPE["M"], AOT_SHAPE["F"]
    x = torch.empty((T, M), dtype=dtype)
    wi_0, wi_1 = torch.empty((F, M), dtype=dtype), torch.empty((F, M), dtype=dtype) if gated else None
    wo = torch.empty((M, F), dtype=dtype)
    router = torch.empty((F, E)) if mode == ROUTE_SELF else None
    experts = torch.empty((1, E, F))
    probs = torch.empty((T, E)) if mode == ROUTE_GIVEN else None
    return x, wi_0, wi_1, wo, router, experts, probs


def _aot_launches(dtype, gated, mode, E, activation="gelu_new", top_k=None, renormalize=False):
    """[(kernel name, kernel, args, constexprs)] of one forward + backward, from the launch plan (CPU tensors)."""
    x, wi_0, wi_1, wo, router, experts, probs = _aot_problem_tensors(dtype, gated, mode, E)
    (T, M), F = x.shape, wi_0.shape[0]
    prob = plan_problem(
        T, M, F, E, dtype_name(dtype), gated=gated, has_router=router is not None, has_probs=probs is not None,
        activation=activation, top_k=top_k, renormalize=renormalize,
    )  # fmt: skip
    cpu = torch.device("cpu")
    tensors = dict(x=x, dy=x, wi_0=wi_0, wi_1=wi_1, wo=wo, router=router, experts=experts, probs=probs)
    plans = [
        up_launch(prob),
        down_launch(prob, True),
        down_backward_launch(prob, True, mode != ROUTE_NONE, True),
    ]
    if mode != ROUTE_NONE:
        plans.append(router_backward_launch(prob))
    plans.append(up_backward_launch(prob, True, mode == ROUTE_SELF))
    out = []
    for buffers, launch in plans:
        tensors |= allocate(buffers, cpu)
        out.append((launch.fn.__name__, launch.kernel, launch_args(launch, tensors, cpu), launch.constexprs))
    return out


def aot_cases(selection: str | None = None) -> list:
    """Every launch autotuning may choose, for :mod:`pemoe.kernels.triton.aot`, at T5-large FFN shape.

    All configs of every kernel, for float16, bfloat16 and float32, on the gated gelu_new
    self-routed E = 10 problem; the default configs also for E = 1 ((IA)3), E = 30, v1.0 ReLU,
    sentence routing, top-2 renormalised and the gated SiLU of Llama-family MLPs. ``selection`` (or
    ``$PEMOE_AOT_SELECTION``, which the tests set for the child process): "all" (default), "default"
    (default configs only) or "smoke" (default configs, bfloat16, E = 10 and E = 1: the quick check of the
    default test run).
    """
    from pemoe.kernels.triton.aot import AotCase

    selection = selection or os.environ.get("PEMOE_AOT_SELECTION", "all")
    name_of = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    variants = [  # (label, gated, mode, E, activation, top_k, renormalize, all configs?)
        ("gated-gelu_new-E10", True, ROUTE_SELF, 10, "gelu_new", None, False, True),
        ("gated-gelu_new-E1", True, ROUTE_NONE, 1, "gelu_new", None, False, False),
        ("gated-gelu_new-E30", True, ROUTE_SELF, 30, "gelu_new", None, False, False),
        ("relu-E10", False, ROUTE_SELF, 10, "relu", None, False, False),
        ("gated-gelu-E10-sentence", True, ROUTE_GIVEN, 10, "gelu", None, False, False),
        ("gated-gelu_new-E10-top2", True, ROUTE_SELF, 10, "gelu_new", 2, True, False),
        ("gated-silu-E10", True, ROUTE_SELF, 10, "silu", None, False, False),  # Llama-family MLPs
    ]
    cases = []
    if selection not in ("all", "default", "smoke"):
        raise ValueError(f"aot_cases: selection must be 'all', 'default' or 'smoke', got {selection!r}")
    if selection == "smoke":
        variants = variants[:2]
    for dtype in (torch.bfloat16,) if selection == "smoke" else AOT_DTYPES:
        for label, gated, mode, E, activation, top_k, renorm, all_configs in variants:
            for name, kernel, args, cx in _aot_launches(dtype, gated, mode, E, activation, top_k, renorm):
                if name == "_router_backward_kernel":
                    configs = [triton.Config({}, num_warps=ROUTER_BACKWARD_CONFIG["num_warps"], num_stages=1)]
                else:  # what autotune may choose for this launch (pruned by dtype and shape)
                    configs = kernel.early_config_prune(kernel.configs, args)
                for i, config in enumerate(configs):
                    default = i == 0
                    if not default and (not all_configs or selection != "all"):
                        continue
                    blocks = "x".join(str(v) for v in config.kwargs.values()) or f"M{cx['BLOCK_M']}"
                    cases.append(
                        AotCase(
                            name=f"{name_of[dtype]} {label} {blocks}",
                            kernel=kernel,
                            args=args,
                            constexprs={**cx, **config.kwargs},
                            num_warps=config.num_warps,
                            num_stages=config.num_stages,
                            default=default,
                        )
                    )
    return cases
