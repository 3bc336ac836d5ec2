"""MoLoRA, ``implementation="torch"``: the SPEC §3 reformulation + a memory-saving autograd Function.

Math (SPEC §1), with A_cat = [A_1 … A_E] ([K, E·r]) and B_cat = [B_1; …; B_E] ([E·r, N]):
    p  = softmax(x32 @ router)               [T, E]    float32
    U  = x @ A_cat                           [T, E·r]  (shrink: one GEMM for every expert)
    U′ = U · p (each expert's r columns scaled by its probability)
    y  = x Wᵀ + b + U′ @ (scale · B_cat)     (expand: one GEMM of depth E·r, never [T, E, N])
For float32 inputs the shrink and the router logits are one GEMM, x @ [A_cat | router].
The expand accumulates into the base output in place (``addmm_``): measured on the CPU, this
is cheaper than one GEMM over the concatenated K, [x | U′] @ [Wᵀ ; scale·B_cat], which must
first copy x and W.
Backward (W frozen):
    dU′ = dy @ (scale·B_cat)ᵀ;  d B_cat = scale · U′ᵀ dy;  dU = dU′ · p
    dp[t,e] = Σ_r dU′·U;  dlogits = softmax/top-k backward of dp
    dx = dy W + [dU | dlogits] @ [A_cat | router]ᵀ       (one extra GEMM of depth E·r + E)
    [d A_cat | d router] = xᵀ [dU | dlogits]              (one GEMM, run as ([dU | dlogits]ᵀ x)ᵀ: the
                                                           skinny-output form is ~1.5x faster on the CPU)
Saved: x (the op's input, kept by the caller anyway), U ([T, E·r], small) and the router logits
([E, T] in the compute dtype; for float32 x they share U's storage, the one GEMM's output). p_soft
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


def _shrink_and_logits(x, lora_a, router):
    """U = x @ A_cat [T, E·r] in x's dtype and router logits [E, T] in the compute dtype."""
    cd = compute_dtype(x.dtype)
    a_cat = _cat_a(lora_a, x.dtype)
    if router is None:
        return x @ a_cat, None
    if x.dtype == cd:  # exact: one GEMM for the shrink and the router
        ul = x @ torch.cat([a_cat, router.to(cd)], dim=1)
        return ul[:, : a_cat.shape[1]], ul[:, a_cat.shape[1] :].t()
    # router in float32 from 16-bit x: the x32 copy is the price of SPEC §5's float32 router.
    # (x32 @ router with router column-major is the fastest layout measured for this skinny GEMM.)
    logits = torch.mm(x.to(cd), router.to(cd).t().contiguous().t())
    return x @ a_cat, logits.t().contiguous()


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


class MoLoRAFunction(torch.autograd.Function):
    """y = molora(x, W, b, lora_a, lora_b, router) on flattened x [T, K]."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize):
        num_experts, _, rank = lora_a.shape
        u, logits = _shrink_and_logits(x, lora_a, None if probs is not None else router)
        p_soft = None if logits is None else torch.softmax(logits, dim=0)
        p = _weights(probs, p_soft, top_k, renormalize, compute_dtype(x.dtype))
        y = F.linear(x, weight, bias)
        b_cat = lora_b.to(x.dtype).reshape(num_experts * rank, -1)
        y.addmm_(_scale_by_probs(u, p, rank), b_cat, alpha=scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, router, probs, logits, u)
        ctx.scale, ctx.top_k, ctx.renormalize = scale, top_k, renormalize
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, router, probs, logits, u = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_b_lora, need_router, need_probs = ctx.needs_input_grad[:7]
        num_experts, k, rank = lora_a.shape
        dt, cd = x.dtype, compute_dtype(x.dtype)
        t = x.shape[0]
        p_soft = None if logits is None else torch.softmax(logits, dim=0)
        p = _weights(probs, p_soft, ctx.top_k, ctx.renormalize, cd)
        b_cat = lora_b.to(dt).reshape(num_experts * rank, -1)

        dx = dw = db = d_a = d_b = d_router = d_probs = None
        if need_b_lora:
            d_b = torch.mm(_scale_by_probs(u, p, rank).t(), dy).to(lora_b.dtype).mul_(ctx.scale).view_as(lora_b)
        du_scaled = torch.mm(dy, b_cat.t()).mul_(ctx.scale)  # dU′ [T, E·r]
        du = _scale_by_probs(du_scaled, p, rank)
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
            dx = torch.mm(dy, weight).addmm_(d_cols, a_cols.t())
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
        return dx, dw, db, d_a, d_b, d_router, d_probs, None, None, None
