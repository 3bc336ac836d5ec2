"""Analysis of the fused MoV linear kernels (:mod:`.mov_linear`), off the runtime path: the HBM-traffic
model (bytes every launch moves, checked against the interpreter's counted traffic in the tests) and the
ahead-of-time compile cases (``aot_cases()``: every launch autotuning may choose, for :mod:`.aot`).

``python -m pemoe.kernels.triton.aot pemoe.kernels.triton.mov_linear_analysis`` prints the compile report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from pemoe.kernels.triton.mov_linear import (
    BACKWARD_CONFIGS,
    FORWARD_CONFIGS,
    REDUCE_ROWS,
    ROUTING_NONE,
    ROUTING_SENTENCE,
    ROUTING_TOKEN,
    SUPPORTED_DTYPES,
    backward_reads_h,
    candidate_configs,
    default_config,
    group_rows,
    mov_linear_bwd_kernel,
    mov_linear_fwd_kernel,
)

# ------------------------------------------------------------------------------------------
# HBM-traffic model
# ------------------------------------------------------------------------------------------

#: L2 capacity the model assumes for "fits in L2" (H100: 50 MiB; A100: 40 MiB).
L2_BYTES = {80: 40 * 2**20, 90: 50 * 2**20}


@dataclass
class KernelTraffic:
    """Bytes one kernel (or torch op) reads and writes.

    ``issued`` is what the kernel's loads and stores request (every program's tiles: the number the
    interpreter's ``count_traffic`` reports); ``hbm`` is the DRAM traffic when the operands re-read by
    several programs are served from L2 (see :func:`hbm_traffic`).
    """

    name: str
    issued_read: int
    issued_written: int
    hbm_read: int
    hbm_written: int

    @property
    def hbm(self) -> int:
        return self.hbm_read + self.hbm_written

    @property
    def issued(self) -> int:
        return self.issued_read + self.issued_written


@dataclass
class TrafficReport:
    forward: list[KernelTraffic]
    backward: list[KernelTraffic]
    forward_minimum: int  # inputs once, output once (+ p_soft when training)
    backward_minimum: int
    forward_unfused: int  # GEMM writes h; router/softmax and merge passes read it
    backward_unfused: int

    @property
    def forward_hbm(self) -> int:
        return sum(k.hbm for k in self.forward)

    @property
    def backward_hbm(self) -> int:
        return sum(k.hbm for k in self.backward)


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def hbm_traffic(
    T: int,
    K: int,
    N: int,
    G: int,
    E: int,
    dtype: torch.dtype,
    config: dict | None = None,
    backward_config: dict | None = None,
    *,
    routing: str = "token",
    training: bool = True,
    bias: bool = False,
    needs: tuple[bool, bool, bool] = (True, True, True),
    capability: int = 90,
    h_from_gemm: bool | None = None,
) -> TrafficReport:
    """Bytes read and written by each kernel of the forward and the backward pass.

    routing: "token", "sentence" or "none" ((IA)3). ``config``/``backward_config``: the tile
    configurations (dicts with BLOCK_M, BLOCK_N); None means the default (first legal) one.
    needs = (dh, d experts, d routing) as in the backward launcher. ``h_from_gemm``: where the backward gets h
    (None: the plan's default, :func:`.mov_linear.backward_reads_h`): one torch GEMM writes h [T, N] (its
    own entry: reads x, W and bias once, writes h) and the backward kernel reads it once, or the kernel
    recomputes each h tile from x and W.

    Issued bytes follow the kernels' loads and stores exactly (masked lanes excluded): x is read once
    per column tile, W once per row tile, router and experts once per program. HBM bytes assume those
    re-reads hit L2 when x and W together fit in half the L2 (T5 shapes do); otherwise the forward reads
    x once (a group's rows fit half the L2: :func:`.mov_linear.group_rows`) and W once per group of row
    tiles (``config["GROUP_M"]`` row tiles when the configuration forces it), and the backward (whose
    consecutive programs share a W column tile) reads W once and x once, or once per column tile when x
    alone overflows half the L2.
    The minimum counts every input once and every output once; the unfused sequence is the torch
    implementation's order of passes: GEMM writes h, a router pass reads h and writes p, a merge pass
    reads h, p and writes y (and the backward reads the saved h instead of recomputing it).
    """
    D = N // G
    es, f32 = _itemsize(dtype), 4
    block_e = max(16, triton.next_power_of_2(E))
    m_bucket = max(16, triton.next_power_of_2(T))
    mode = {"none": ROUTING_NONE, "token": ROUTING_TOKEN, "sentence": ROUTING_SENTENCE}[routing]
    h_from_gemm = backward_reads_h(mode, D, block_e) if h_from_gemm is None else h_from_gemm

    def pick(configs, given, backward):
        if given is not None:
            return given
        c = candidate_configs(configs, D, block_e, m_bucket, es, backward, mode, backward and h_from_gemm)[0]
        return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}

    fc, bc = pick(FORWARD_CONFIGS, config, False), pick(BACKWARD_CONFIGS, backward_config, True)
    l2_fits = (T * K + N * K) * es <= L2_BYTES[capability] // 2
    bias_b = N * es if bias else 0
    adapters = G * E * D * f32 + (D * E * f32 if mode == ROUTING_TOKEN else 0)
    save_p = training and mode == ROUTING_TOKEN
    probs_b = T * E * f32 if mode == ROUTING_SENTENCE else 0

    # ---- forward kernel
    pm, pn = math.ceil(T / fc["BLOCK_M"]), math.ceil(N / fc["BLOCK_N"])
    experts_issued = pm * (G * E * D * f32 if mode != ROUTING_NONE else N * f32)
    router_issued = pm * pn * D * E * f32 if mode == ROUTING_TOKEN else 0
    probs_issued = probs_b * G if mode == ROUTING_SENTENCE else 0  # once per head (a tile repeats it per head)
    issued_r = T * K * es * pn + N * K * es * pm + bias_b * pm + experts_issued + router_issued + probs_issued
    issued_w = T * N * es + (T * G * E * f32 if save_p else 0)
    group_m = fc.get("GROUP_M") or max(1, group_rows(K, es, L2_BYTES[capability]) // fc["BLOCK_M"])
    w_hbm = N * K * es * (1 if l2_fits else math.ceil(pm / group_m))
    experts_min = G * E * D * f32 if mode != ROUTING_NONE else N * f32
    hbm_r = T * K * es + w_hbm + bias_b + experts_min + (D * E * f32 if mode == ROUTING_TOKEN else 0) + probs_b
    forward = [KernelTraffic("mov_linear_fwd_kernel", issued_r, issued_w, hbm_r, issued_w)]

    # ---- backward kernel + torch finishing ops
    need_dh, need_experts, need_routing = needs
    need_routing = need_routing and mode != ROUTING_NONE
    chunks, bpn = math.ceil(T / REDUCE_ROWS), math.ceil(N / bc["BLOCK_N"])
    # row tiles the backward programs of one column visit: each chunk's rows in BLOCK_M tiles
    row_tiles = sum(math.ceil(min(REDUCE_ROWS, T - c * REDUCE_ROWS) / bc["BLOCK_M"]) for c in range(chunks))
    # token routing reading h with D = 128 runs two passes over each chunk (mov_linear._bwd_token_halves): d experts,
    # then dh and d router; each pass reads h, dy and p_soft (the second from L1 or L2), the second the adapters
    two_passes = h_from_gemm and mode == ROUTING_TOKEN and D > 64
    passes = (int(need_experts) + int(need_dh or need_routing)) if two_passes else 1
    adapter_reads = (need_dh or need_routing) if two_passes else 1
    if h_from_gemm:  # h once (each program its tiles), dy once, per pass
        b_issued_r = 2 * T * N * es * passes
    else:  # x per column tile, W and bias per row tile, dy once
        b_issued_r = T * K * es * bpn + N * K * es * row_tiles + bias_b * row_tiles + T * N * es
    b_issued_r += chunks * (G * E * D * f32 if mode != ROUTING_NONE else N * f32) * adapter_reads
    if mode == ROUTING_TOKEN:  # router per program, p_soft once per pass
        b_issued_r += chunks * bpn * D * E * f32 * adapter_reads + T * G * E * f32 * passes
    if mode == ROUTING_SENTENCE:
        b_issued_r += probs_b * G
    part_experts = chunks * (G * E * D if mode != ROUTING_NONE else N) * f32 if need_experts else 0
    part_router = chunks * bpn * D * E * f32 if (need_routing and mode == ROUTING_TOKEN) else 0
    part_probs = T * bpn * E * f32 if (need_routing and mode == ROUTING_SENTENCE) else 0
    b_issued_w = (T * N * es if need_dh else 0) + part_experts + part_router + part_probs
    xb_hbm = T * K * es * (1 if T * K * es <= L2_BYTES[capability] // 2 else bpn)
    h_source_hbm = T * N * es if h_from_gemm else xb_hbm + N * K * es + bias_b
    b_hbm_r = h_source_hbm + T * N * es + adapters + (T * G * E * f32 if mode == ROUTING_TOKEN else 0) + probs_b
    backward = [KernelTraffic("mov_linear_bwd_kernel", b_issued_r, b_issued_w, b_hbm_r, b_issued_w)]
    if h_from_gemm and T:
        gemm_r = T * K * es + N * K * es + bias_b
        backward.insert(0, KernelTraffic("h = x·Wᵀ + b (torch GEMM)", gemm_r, T * N * es, gemm_r, T * N * es))
    # zero-filled workspaces (token: [C, G, D, E]; sentence: [G, T, E]) and the second reduction stage
    zero_fill = (chunks * G * D * E * f32 if part_router else 0) + (G * T * E * f32 if part_probs else 0)
    if zero_fill:
        backward.append(KernelTraffic("zero-fill workspaces (torch)", 0, zero_fill, 0, zero_fill))
    if part_experts:
        out = G * E * D * f32 if mode != ROUTING_NONE else N * f32
        backward.append(KernelTraffic("d_experts = Σ partials (torch)", part_experts, out, part_experts, out))
    if part_router:
        full = chunks * G * D * E * f32
        backward.append(KernelTraffic("d_router = Σ partials (torch)", full, D * E * f32, full, D * E * f32))
    if part_probs:
        full = G * T * E * f32
        backward.append(KernelTraffic("d_probs = Σ partials (torch)", full, T * E * f32, full, T * E * f32))
    if need_dh:
        backward.append(
            KernelTraffic(
                "dx = dh·W (torch.matmul)", T * N * es + N * K * es, T * K * es, T * N * es + N * K * es, T * K * es
            )
        )
        if bias:
            backward.append(KernelTraffic("d_bias = Σ dh (torch)", T * N * es, N * es, T * N * es, N * es))

    # ---- minimum and unfused references
    p_b = T * G * E * f32 if mode == ROUTING_TOKEN else 0
    fwd_min = T * K * es + N * K * es + bias_b + adapters + probs_b + T * N * es + (p_b if training else 0)
    d_adapters = (G * E * D * f32 if need_experts else 0) + (D * E * f32 if part_router else 0)
    d_adapters += T * E * f32 if part_probs else 0
    bwd_min = T * N * es + T * K * es + N * K * es + adapters + p_b + probs_b + (T * K * es if need_dh else 0)
    bwd_min += d_adapters
    fwd_unfused = T * K * es + N * K * es + bias_b + T * N * es  # GEMM → h
    if mode == ROUTING_TOKEN:
        fwd_unfused += T * N * es + D * E * f32 + 2 * p_b  # router + softmax pass: read h, write p
    fwd_unfused += T * N * es + p_b + probs_b + G * E * D * f32 + T * N * es  # merge: read h, p; write y
    # unfused backward: read h (saved), dy, p; write dh; then dx GEMM
    bwd_unfused = 2 * T * N * es + p_b + probs_b + adapters + T * N * es + d_adapters + T * N * es + N * K * es
    bwd_unfused += T * K * es
    return TrafficReport(forward, backward, fwd_min, bwd_min, fwd_unfused, bwd_unfused)


# ------------------------------------------------------------------------------------------
# Where the backward gets h: recomputed in its own small tiles, saved by the forward, or one big GEMM
# ------------------------------------------------------------------------------------------

#: Roofline assumptions beyond :data:`.molora_linear_analysis.H100` (data, not measured here): the L2 read
#: bandwidth of an H100 SXM (~5.5 TB/s in published microbenchmarks), and the share of the 16-bit tensor peak
#: that tiles under 64 rows reach (mma.sync: no wgmma) — float32 activations use the FMA rate either way.
L2_BYTES_PER_S = 5.5e12
MMA_SYNC_SHARE = 0.6


@dataclass(frozen=True)
class BackwardStrategy:
    """One way for the backward to get h = x Wᵀ + b, modelled on an H100: ``forward_extra`` bytes the forward
    writes beyond today's (saving h), the DRAM bytes, L2-requested bytes and FLOPs of getting h and running the
    epilogue (dh, partial sums; the dx GEMM and the reductions are the same for every strategy and left out),
    ``seconds`` the modelled time of those bytes and FLOPs (forward extra included), and ``saved`` the
    activation memory held from the forward to the backward beyond x and p_soft."""

    name: str
    forward_extra: int
    dram: int
    l2_requested: int
    flops: int
    seconds: float
    saved: int


def backward_strategies(
    T: int, K: int, N: int, G: int, E: int, dtype: torch.dtype, *, capability: int = 90, routing: str = "token"
) -> list[BackwardStrategy]:
    """The three ways to get h in the backward, at problem x [T, K], W [N, K], E experts, ``routing`` "token"
    or "none" ((IA)3, E = 1):

    * ``recompute (fused)``: the backward kernel without H_FROM_GEMM: each program recomputes its
      [BLOCK_M, BLOCK_N] h tile (its default configuration: 16-32-row tiles for token routing, so no
      wgmma) — one GEMM's FLOPs at mma.sync speed, and x and W requested from L2 once per column tile and
      row tile (:func:`hbm_traffic`'s issued bytes), which small tiles make large;
    * ``save h``: the forward also writes h [T, N] in the activation dtype; the backward reads it instead of
      x and W: no GEMM, memory-bound, and T·N more activation bytes held per site;
    * ``recompute (GEMM)``: one plain GEMM in 128 × 128 tiles (wgmma) writes h, then the same epilogue as
      ``save h`` reads it: one more launch, h through DRAM twice, full tensor speed (the plan's default,
      :func:`.mov_linear.backward_reads_h`, where its default tile is spill-free).

    Each: launch gap + max(FLOPs / peak, L2 bytes / L2 bandwidth, DRAM bytes / HBM bandwidth) per launch.
    """
    from pemoe.kernels.triton.molora_linear_analysis import H100

    es, f32, D = _itemsize(dtype), 4, N // G
    fp32 = dtype == torch.float32
    peak = H100.float32_flops if fp32 else H100.tensor_flops
    gemm_flops = 2 * T * N * K
    if routing not in ("token", "none"):
        raise ValueError(f"routing: expected 'token' or 'none', got {routing!r}")
    report = hbm_traffic(T, K, N, G, E, dtype, capability=capability, h_from_gemm=False, routing=routing)
    fused = report.backward[0]
    plan = _plan(T, K, N, G, E, dtype, h_from_gemm=False, routing=routing)
    bm = default_config(plan, backward=True).kwargs["BLOCK_M"]
    small_peak = peak if fp32 or bm >= 64 else peak * MMA_SYNC_SHARE

    def launch(flops: float, rate: float, l2: float, dram: float) -> float:
        return H100.launch_gap_s + max(flops / rate, l2 / L2_BYTES_PER_S, dram / H100.hbm_bytes_per_s)

    h_bytes = T * N * es
    # the epilogue alone (dh and the partial sums from h, dy, p_soft and the adapters): what the fused kernel
    # writes, and reads but x and W
    token = routing == "token"
    adapters = (G * E * D + D * E * token) * f32
    p_soft = T * G * E * f32 * token
    epilogue_dram = fused.hbm_written + 2 * h_bytes + p_soft + adapters  # h and dy
    epilogue_l2 = epilogue_dram + adapters * (math.ceil(T / REDUCE_ROWS) * math.ceil(N / 128) - 1)
    if token and D > 64:  # two passes over each chunk (mov_linear._bwd_token_halves): h, dy and p_soft twice
        epilogue_l2 += 2 * h_bytes + p_soft
    xw = T * K * es + N * K * es
    epilogue = launch(0, peak, epilogue_l2, epilogue_dram)
    save_forward = h_bytes / H100.hbm_bytes_per_s
    big_l2 = T * K * es * math.ceil(N / 128) + N * K * es * math.ceil(T / 128) + h_bytes
    gemm = launch(gemm_flops, peak, big_l2, xw + h_bytes)
    return [
        BackwardStrategy(
            "recompute (fused)", 0, fused.hbm, fused.issued, gemm_flops,
            launch(gemm_flops, small_peak, fused.issued, fused.hbm), 0,
        ),
        BackwardStrategy("save h", h_bytes, epilogue_dram, epilogue_l2, 0, save_forward + epilogue, h_bytes),
        BackwardStrategy(
            "recompute (GEMM)", 0, xw + h_bytes + epilogue_dram, big_l2 + epilogue_l2, gemm_flops, gemm + epilogue, 0
        ),
    ]  # fmt: skip


def _plan(
    T: int, K: int, N: int, G: int, E: int, dtype: torch.dtype, h_from_gemm: bool | None = None, routing: str = "token"
):
    from pemoe.kernels.triton.mov_linear import plan_problem

    D = N // G
    router = (D, E) if routing == "token" else None
    return plan_problem(
        T, K, N, (G, E, D), router_shape=router, probs_shape=None, top_k=None, renormalize=False,
        itemsize=_itemsize(dtype), h_from_gemm=h_from_gemm,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------
# Ahead-of-time compile cases
# ------------------------------------------------------------------------------------------

#: Example problems for the AOT compiles: (name, T, K, G, D, E, routing, top_k, renormalize). T5-large
#: k/v (E = 10), its (IA)3 (E = 1), MoV-60, top-2 renormalised and sentence-routed versions, and a D = 128 site
#: (E = 10 and (IA)3).
AOT_SHAPES = (
    ("t5-large E=10", 2048, 1024, 16, 64, 10, "token", 0, False),
    ("t5-large ia3", 2048, 1024, 16, 64, 1, "none", 0, False),
    ("t5-large E=60", 2048, 1024, 16, 64, 60, "token", 0, False),
    ("t5-large E=10 top2r", 2048, 1024, 16, 64, 10, "token", 2, True),
    ("t5-large E=10 sent", 2048, 1024, 16, 64, 10, "sentence", 0, False),
    ("d128 E=10", 2048, 4096, 32, 128, 10, "token", 0, False),
    ("d128 ia3", 2048, 4096, 32, 128, 1, "none", 0, False),
)


def aot_cases(
    dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES,
    shapes: tuple = AOT_SHAPES,
    all_configs: bool = True,
    h_read_everywhere: bool = False,
) -> list:
    """Every configuration autotuning may choose (after pruning) for each example shape and dtype,
    forward and backward (training variants: p_soft saved, every gradient needed); the first legal
    configuration of each list is the default. ``all_configs=False`` keeps only the defaults. The backward
    comes in two variants: ``bwd-fused`` recomputes h (every shape: ``BACKWARD_H_FROM_GEMM = False`` selects it
    everywhere) and ``bwd`` reads it (H_FROM_GEMM), listed where the plan reads h by default
    (:func:`.mov_linear.backward_reads_h`); ``h_read_everywhere`` lists it for the other shapes too, with no
    case marked default there (the compiles that show why the plan recomputes h at those shapes)."""
    from pemoe.kernels.triton.aot import AotCase

    cases = []
    for label, T, K, G, D, E, routing_name, top_k, renormalize in shapes:
        mode = {"none": ROUTING_NONE, "token": ROUTING_TOKEN, "sentence": ROUTING_SENTENCE}[routing_name]
        N, chunks = G * D, triton.cdiv(T, REDUCE_ROWS)
        block_e = max(16, triton.next_power_of_2(E))
        m_bucket = max(16, triton.next_power_of_2(T))
        for dtype in dtypes:
            fp32 = dtype == torch.float32
            act = dict(
                x_ptr=torch.empty(T, K, dtype=dtype),
                w_ptr=torch.empty(N, K, dtype=dtype),
                bias_ptr=None,
                router_ptr=torch.empty(D, E) if mode == ROUTING_TOKEN else None,
                experts_ptr=torch.empty(G, E, D),
                probs_ptr=torch.empty(T, E) if mode == ROUTING_SENTENCE else None,
            )
            sizes = dict(T=T, N=N, K=K, G=G, E=E, M_BUCKET=m_bucket)
            x_strides = dict(stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1)
            grouping = dict(GROUP_ROWS=group_rows(K, dtype.itemsize, L2_BYTES[90]))
            common = dict(
                HAS_BIAS=False, ROUTING=mode, TOP_K=top_k, RENORMALIZE=renormalize,
                MAIN_PRECISION="ieee" if fp32 else "tf32", EPILOGUE_PRECISION="ieee",
                HEAD_DIM=D, BLOCK_E=block_e,
            )  # fmt: skip
            p_soft = torch.empty(T, G, E) if mode == ROUTING_TOKEN else None
            fwd_outputs = dict(y_ptr=torch.empty(T, N, dtype=dtype), p_soft_ptr=p_soft)
            fwd_args = act | fwd_outputs | sizes | x_strides | grouping
            bwd_args = (
                act
                | dict(p_soft_ptr=p_soft, dy_ptr=torch.empty(T, N, dtype=dtype), dh_ptr=torch.empty(T, N, dtype=dtype))
                | dict(h_ptr=torch.empty(T, N, dtype=dtype))
                | dict(
                    d_experts_part_ptr=torch.empty(chunks, G, E, D),
                    d_router_part_ptr=torch.empty(chunks, G, D, E) if mode == ROUTING_TOKEN else None,
                    d_probs_part_ptr=torch.empty(G, T, E) if mode == ROUTING_SENTENCE else None,
                )
                | sizes
                | x_strides
                | dict(stride_dym=N, stride_dyn=1)
            )
            needs = dict(NEED_DH=True, NEED_D_EXPERTS=True, NEED_D_ROUTING=mode != ROUTING_NONE)
            needs |= dict(REDUCE_ROWS=REDUCE_ROWS)
            kernels = (
                ("fwd", mov_linear_fwd_kernel, FORWARD_CONFIGS, fwd_args, dict(SAVE_P_SOFT=mode == ROUTING_TOKEN)),
                ("bwd", mov_linear_bwd_kernel, BACKWARD_CONFIGS, bwd_args, needs | dict(H_FROM_GEMM=True)),
                (
                    "bwd-fused",
                    mov_linear_bwd_kernel,
                    BACKWARD_CONFIGS,
                    bwd_args | dict(h_ptr=None),
                    needs | dict(H_FROM_GEMM=False),
                ),
            )
            plan_reads_h = backward_reads_h(mode, D, block_e)
            for kind, kernel, configs, args, extra in kernels:
                backward, h_read = kind != "fwd", kind == "bwd"
                if h_read and not (plan_reads_h or h_read_everywhere):
                    continue
                legal = candidate_configs(configs, D, block_e, m_bucket, dtype.itemsize, backward, mode, h_read)
                planned = plan_reads_h or not h_read
                for i, c in enumerate(legal if all_configs else legal[:1]):
                    tiles = "x".join(str(c.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                    cases.append(
                        AotCase(
                            name=f"{kind} {label} {str(dtype).removeprefix('torch.')} {tiles}",
                            kernel=kernel,
                            args=args,
                            constexprs=common | extra | c.kwargs,
                            num_warps=c.num_warps,
                            num_stages=c.num_stages,
                            default=i == 0 and planned,
                        )
                    )
    return cases
