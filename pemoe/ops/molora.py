"""MoLoRA, ``implementation="torch"``: the SPEC §3 reformulation + a memory-saving autograd Function.

Math (SPEC §1), with A_cat = [A_1 … A_E] ([K, E·r]) and B_cat = [B_1; …; B_E] ([E·r, N]):
    p  = softmax(x32 @ router)               [T, E]    float32
    U  = x @ A_cat                           [T, E·r]  (shrink: one GEMM for every expert)
    U′ = U · p (each expert's r columns scaled by its probability)
    y  = x Wᵀ + b + U′ @ (scale · B_cat)     (expand: one GEMM of depth E·r, never [T, E, N])
For float32 inputs the shrink and the router logits are one GEMM, x @ [A_cat | router]; from
:data:`FUSED_COLUMNS_MIN_TOKENS` tokens on, that GEMM is the base GEMM's extra output columns,
x @ [Wᵀ | A_cat | router], and y is the first N columns of that output: a strided tensor (row stride
N + E·r + E, padded to :data:`FUSED_COLUMNS_MULTIPLE`), not a view, so in-place ops on it are allowed.
The expand accumulates into the base output in place (``addmm_``): measured on the CPU, this
is cheaper than one GEMM over the concatenated K, [x | U′] @ [Wᵀ ; scale·B_cat], which must
first copy x and W.
Without a frozen weight (the adapter-only op, for bases that run their own forward, e.g. quantized linears),
y = base + U′ @ (scale · B_cat): the expand accumulates into a copy of the base layer's output.
Backward (W frozen):
    dU′ = dy @ (scale·B_cat)ᵀ;  d B_cat = scale · U′ᵀ dy;  dU = dU′ · p
    dp[t,e] = Σ_r dU′·U;  dlogits = softmax/top-k backward of dp
    dx = dy W + [dU | dlogits] @ [A_cat | router]ᵀ       (one extra GEMM of depth E·r + E)
    [d A_cat | d router] = xᵀ [dU | dlogits]              (one GEMM, run as ([dU | dlogits]ᵀ x)ᵀ: the
                                                           skinny-output form is ~1.5x faster on the CPU)
Saved: x (the op's input, kept by the caller anyway), U ([T, E·r], small; float32 when a router reads
16-bit x, as are dU′ and dp in the backward: the softmax backward's cancellation needs them exact to
float32) and the router logits ([E, T] in the compute dtype; for float32 x they share U's storage, the
one GEMM's output). p_soft
is recomputed from the logits in the backward (a softmax over [E, T]: bitwise the forward's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pemoe.ops import _router
from pemoe.reference import compute_dtype


def _cat_a(lora_a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[E, K, r] -> A_cat [K, E·r]."""
    num_experts, k, rank = lora_a.shape
    return lora_a.to(dtype).permute(1, 0, 2).reshape(k, num_experts * rank)


#: From this many tokens on, float32 x's shrink and router run as extra output columns of the base GEMM.
#: A skinny [K, E·r + E] GEMM runs at well under half the base GEMM's FLOP rate on the CPU (T5-large,
#: T = 2048, float32, 2 cores: x @ [A_cat | router] 1.33 ms, x Wᵀ 21 ms, x [Wᵀ | A_cat | router] 1.03x
#: x Wᵀ); the price is a copy of W per call, which few tokens do not amortise (forward vs the separate
#: GEMMs, same machine: 1.83x / 1.43x the linear at T = 16, even at T = 256, 1.15x / 1.18x at T = 512).
#: For 16-bit x the router must stay float32 (SPEC §5) and fusing the shrink alone measured no faster.
FUSED_COLUMNS_MIN_TOKENS = 512
#: The fused GEMM's output width is padded to a multiple of this (64-byte rows in float32): MKL's sgemm
#: at N = 1074 costs 1.17x N = 1024, at N = 1088 1.04x.
FUSED_COLUMNS_MULTIPLE = 16


def _columns(out: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """out[:, start:stop] sharing out's storage, as a tensor of its own rather than an autograd view.

    A custom Function may not return a view of a tensor it made (autograd forbids in-place ops on such an
    output); a tensor set to the same storage, offset and strides is an ordinary output.
    """
    return out.new_empty(0).set_(
        out.untyped_storage(), out.storage_offset() + start, (out.shape[0], stop - start), (out.stride(0), 1)
    )


def _fused_forward(x, weight, bias, a_cat, router):
    """(y [T, N] strided, U [T, E·r], router logits [E, T] or None) from one GEMM x @ [Wᵀ | A_cat (| router)].

    ``router`` (already in x's dtype) is None when the logits are computed elsewhere.
    """
    n, k = weight.shape
    extra = [a_cat.t()] if router is None else [a_cat.t(), router.t()]
    n_extra = sum(e.shape[0] for e in extra)
    pad = -(n + n_extra) % FUSED_COLUMNS_MULTIPLE
    w_fused = torch.cat([weight, *extra, weight.new_zeros(pad, k)])
    b_fused = None if bias is None else torch.cat([bias, bias.new_zeros(n_extra + pad)])
    out = F.linear(x, w_fused, b_fused)
    er = a_cat.shape[1]
    u = out[:, n : n + er].contiguous()  # own storage: saving it must not keep out (and y) alive
    logits = None if router is None else out[:, n + er : n + n_extra].t().contiguous()
    return _columns(out, 0, n), u, logits


def shrink_operand(lora_a: torch.Tensor, router: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The shrink GEMM's right operand for x of ``dtype``: [A_cat (| router) | 0] [K, W] in the compute dtype
    (float32 for 16-bit x, which the router reads in float32: :func:`_router_logits`), zero columns padding
    W = E·r (+ E) to a multiple of :data:`SHRINK_COLUMNS_MULTIPLE`; for 16-bit x without a router, A_cat
    [K, E·r] in ``dtype``. The GEMM's first E·r columns are U, the next E the router logits."""
    cd = compute_dtype(dtype)
    if router is None and dtype != cd:
        return _cat_a(lora_a, dtype)
    a_cat = _cat_a(lora_a, cd)
    columns = [a_cat] if router is None else [a_cat, router.to(cd)]
    pad = -sum(c.shape[1] for c in columns) % SHRINK_COLUMNS_MULTIPLE
    if pad:
        columns.append(a_cat.new_zeros(a_cat.shape[0], pad))
    return columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)


def _shrink_and_logits(x, lora_a, router, operand=None):
    """U = x @ A_cat [T, E·r] and router logits [E, T] in the compute dtype; U in x's dtype without a router.

    With a router, U is float32 for 16-bit x too: dp = Σ_r dU′·U feeds the softmax backward, whose
    dp - Σ_e p·dp cancels, and 16-bit U or dU′ there breaks the tolerance rule for d router at few tokens.
    The float32 copy of x the router needs anyway makes U one more block of the same float32 GEMM.
    ``operand``: :func:`shrink_operand` (lora_a, router, x.dtype) where the caller keeps one, else built here."""
    w = shrink_operand(lora_a, router, x.dtype) if operand is None else operand
    er = lora_a.shape[0] * lora_a.shape[2]
    if router is None:
        return (x @ w)[:, :er], None
    if x.dtype == compute_dtype(x.dtype):  # exact: one GEMM for the shrink and the router
        ul = x @ w
        return ul[:, :er], ul[:, er : er + router.shape[1]].t()
    return _router_logits(x, w, er, router.shape[1])


#: The shrink GEMM's output width is padded with zero columns to a multiple of this (64-byte rows in float32).
#: A narrow output runs far below MKL's rate (one thread, [2048, 512] x [512, 4] 1.23 ms, padded to 16
#: columns 0.48 ms; [2048, 1024] x [1024, 10] 0.73 ms, padded 0.50 ms), and with 64-byte output rows a
#: batched GEMM over several adapters' operands (``bmm``) sums as each adapter's own GEMM does (the bank's
#: batched decode, :func:`pemoe.ops.banked._batched_molora`), where unpadded widths change the float32 order.
SHRINK_COLUMNS_MULTIPLE = 16


#: x is converted to float32 for the router in slices of this many tokens, through one reused buffer
#: (a whole float32 copy of x is a fresh [T, K] allocation and a pass through memory per call).
ROUTER_CHUNK_TOKENS = 256


def _router_logits(x, padded, er, num_experts):
    """(U = x @ A_cat [T, E·r], router logits [E, T]) in float32 from 16-bit x (SPEC §5): one float32 GEMM
    x32 @ [A_cat | router | 0] (``padded``, :func:`shrink_operand`); converting x is the price of the float32
    router."""
    cd = padded.dtype
    k = padded.shape[0]
    tokens = x.shape[0]
    out = x.new_empty(tokens, padded.shape[1], dtype=cd)
    x32 = x.new_empty(min(tokens, ROUTER_CHUNK_TOKENS), k, dtype=cd)
    for start in range(0, tokens, ROUTER_CHUNK_TOKENS):
        rows = slice(start, start + ROUTER_CHUNK_TOKENS)
        chunk = x32[: x[rows].shape[0]].copy_(x[rows])
        torch.mm(chunk, padded, out=out[rows])
    return out[:, :er].contiguous(), out[:, er : er + num_experts].t().contiguous()


def _weights(probs, p_soft, top_k, renormalize, cd):
    """Routing weights p [E, T] in the compute dtype; None for LoRA."""
    if probs is not None:
        return probs.to(cd).t()
    if p_soft is None:
        return None
    return _router.select(p_soft, top_k, renormalize, dim=0)


def _scale_by_probs(u: torch.Tensor, p: torch.Tensor | None, rank: int) -> torch.Tensor:
    """U′[t, e·r + j] = U[t, e·r + j] · p[e, t]."""
    if p is None:
        return u
    num_experts, t = p.shape
    return (u.view(t, num_experts, rank) * p.t().to(u.dtype).unsqueeze(-1)).view(t, num_experts * rank)


def _adapter_output(x: torch.Tensor, base: torch.Tensor | None, n: int) -> torch.Tensor:
    """The adapter-only op's output before the expand accumulates into it: a copy of ``base`` [T, N] (the frozen
    layer's own output; never written in place), zeros without one."""
    return x.new_zeros((x.shape[0], n)) if base is None else base.clone(memory_format=torch.contiguous_format)


def expand_into(
    y: torch.Tensor,
    u: torch.Tensor,
    logits: torch.Tensor | None,
    probs: torch.Tensor | None,
    lora_b: torch.Tensor,
    scale: float,
    top_k: int | None,
    renormalize: bool,
) -> None:
    """The expand, in place: y += scale · U′ @ B_cat, U′ = U scaled by the routing weights (from ``probs``
    [T, E], or the router ``logits`` [E, T], or none for LoRA) and rounded once to y's dtype. ``u`` [T, E·r]
    is :func:`_shrink_and_logits`' (float32 where a router reads 16-bit x)."""
    num_experts, rank, _ = lora_b.shape
    p_soft = None if logits is None else torch.softmax(logits, dim=0)
    p = _weights(probs, p_soft, top_k, renormalize, compute_dtype(y.dtype))
    b_cat = lora_b.to(y.dtype).reshape(num_experts * rank, -1)
    y.addmm_(_scale_by_probs(u, p, rank).to(y.dtype), b_cat, alpha=scale)


class MoLoRAFunction(torch.autograd.Function):
    """y = molora(x, W, b, lora_a, lora_b, router) on flattened x [T, K]; with ``weight`` None the adapter-only
    op: y = base + the adapter's delta, ``base`` [T, N] the frozen layer's own output (or None: zeros)."""

    @staticmethod
    def forward(ctx, x, weight, bias, base, lora_a, lora_b, router, probs, scale, top_k, renormalize):
        cd = compute_dtype(x.dtype)
        router_reads_x = router if probs is None else None
        # (not under torch.compile: sharing the GEMM output's storage is a graph break for Dynamo, and
        # Inductor plans its own GEMMs)
        fuse = x.dtype == cd and x.shape[0] >= FUSED_COLUMNS_MIN_TOKENS and not torch.compiler.is_compiling()
        if weight is not None and fuse:
            y, u, logits = _fused_forward(
                x, weight, bias, _cat_a(lora_a, x.dtype), None if router_reads_x is None else router_reads_x.to(cd)
            )
        else:
            u, logits = _shrink_and_logits(x, lora_a, router_reads_x)
            y = F.linear(x, weight, bias) if weight is not None else _adapter_output(x, base, lora_b.shape[2])
        expand_into(y, u, logits, probs, lora_b, scale, top_k, renormalize)
        ctx.save_for_backward(x, weight, lora_a, lora_b, router, probs, logits, u)
        ctx.scale, ctx.top_k, ctx.renormalize = scale, top_k, renormalize
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # hand-written backward: second derivatives would be wrong
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, router, probs, logits, u = ctx.saved_tensors
        need_x, need_w, need_b, need_base, need_a, need_b_lora, need_router, need_probs = ctx.needs_input_grad[:8]
        num_experts, k, rank = lora_a.shape
        dt, cd = x.dtype, compute_dtype(x.dtype)
        t = x.shape[0]
        p_soft = None if logits is None else torch.softmax(logits, dim=0)
        p = _weights(probs, p_soft, ctx.top_k, ctx.renormalize, cd)
        # U is float32 where the router reads 16-bit x (see _shrink_and_logits): dU′ then is too
        ud = u.dtype
        b_cat = lora_b.to(ud).reshape(num_experts * rank, -1)
        dy_u = dy.to(ud)

        dx = dw = db = d_a = d_b = d_router = d_probs = None
        if need_b_lora:
            # not on the router's path: U′ rounded to the activation dtype, as the forward's expand reads it
            u_scaled = _scale_by_probs(u, p, rank).to(dt)
            d_b = torch.mm(u_scaled.t(), dy).to(lora_b.dtype).mul_(ctx.scale).view_as(lora_b)
        du_scaled = torch.mm(dy_u, b_cat.t()).mul_(ctx.scale)  # dU′ [T, E·r]
        du = _scale_by_probs(du_scaled, p, rank).to(dt)
        dlogits = None  # [E, T]
        if p is not None and (need_probs or (probs is None and (need_router or need_x))):
            dp = (du_scaled.to(cd).view(t, num_experts, rank) * u.to(cd).view(t, num_experts, rank)).sum(-1).t()
            if probs is not None:
                d_probs = dp.t().to(probs.dtype)
            else:
                dlogits = _router.probs_backward(dp, p_soft, ctx.top_k, ctx.renormalize, dim=0)
        # [dU | dlogits] against [A_cat | router]: one GEMM each for dx and for the adapter gradients
        d_cols = du if dlogits is None else torch.cat([du, dlogits.t().to(dt)], dim=1)
        if need_x:
            a_cols = _cat_a(lora_a, dt) if dlogits is None else torch.cat([_cat_a(lora_a, dt), router.to(dt)], dim=1)
            dx = torch.mm(d_cols, a_cols.t()) if weight is None else torch.mm(dy, weight).addmm_(d_cols, a_cols.t())
        if need_a or (need_router and dlogits is not None):
            d_params = torch.mm(d_cols.t(), x).to(cd).t()  # [K, E·r (+ E)] = xᵀ d_cols
            if need_a:
                d_a = d_params[:, : num_experts * rank].reshape(k, num_experts, rank).permute(1, 0, 2)
                d_a = d_a.to(lora_a.dtype)
            if need_router and dlogits is not None:
                d_router = d_params[:, num_experts * rank :].to(router.dtype)
        if need_w:
            dw = torch.mm(dy.t(), x)
        if need_b:
            db = dy.sum(0)
        d_base = dy if need_base else None
        return dx, dw, db, d_base, d_a, d_b, d_router, d_probs, None, None, None
