"""MoLoRA, ``implementation="torch"``: the SPEC §3 reformulation + a memory-saving autograd Function.

Math (SPEC §1), with A_cat = [A_1 … A_E] ([K, E·r]) and B_cat = [B_1; …; B_E] ([E·r, N]):
    p  = softmax(x32 @ router)               [T, E]    float32
    U  = x @ A_cat                           [T, E·r]  (shrink: one GEMM for every expert)
    U′ = U · p (each expert's r columns scaled by its probability)
    y  = x Wᵀ + b + U′ @ (scale · B_cat)     (expand: one GEMM of depth E·r, never [T, E, N])
Backward (W frozen):
    dU′ = dy @ (scale·B_cat)ᵀ;  d B_cat = scale · U′ᵀ dy;  dU = dU′ · p
    dp[t,e] = Σ_r dU′·U;  dlogits = softmax/top-k backward of dp
    dx = dy W + dU A_catᵀ + dlogits routerᵀ;  d A_cat = xᵀ dU;  d router = x32ᵀ dlogits
Saved: x (the op's input, kept by the caller anyway), U ([T, E·r], small) and p_soft (float32).
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


def _routing(x, router, probs, top_k, renormalize):
    """Returns (p [T, E] compute dtype or None for LoRA, p_soft or None)."""
    cd = compute_dtype(x.dtype)
    if probs is not None:
        return probs.to(cd), None
    if router is None:
        return None, None
    p_soft = _router.softmax_last(x.to(cd) @ router.to(cd))
    return _router.select(p_soft, top_k, renormalize), p_soft


def _scale_by_probs(u: torch.Tensor, p: torch.Tensor | None, rank: int) -> torch.Tensor:
    """U′[t, e·r + j] = U[t, e·r + j] · p[t, e]."""
    if p is None:
        return u
    t, num_experts = p.shape
    return (u.view(t, num_experts, rank) * p.to(u.dtype).unsqueeze(-1)).view(t, num_experts * rank)


class MoLoRAFunction(torch.autograd.Function):
    """y = molora(x, W, b, lora_a, lora_b, router) on flattened x [T, K]."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize):
        num_experts, _, rank = lora_a.shape
        dt = x.dtype
        p, p_soft = _routing(x, router, probs, top_k, renormalize)
        u = x @ _cat_a(lora_a, dt)  # [T, E·r]
        u_scaled = _scale_by_probs(u, p, rank)
        b_cat = lora_b.to(dt).reshape(num_experts * rank, -1)
        y = F.linear(x, weight, bias)
        y.addmm_(u_scaled, b_cat, alpha=scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, router, probs, p_soft, u)
        ctx.scale, ctx.top_k, ctx.renormalize = scale, top_k, renormalize
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, router, probs, p_soft, u = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_b_lora, need_router, need_probs = ctx.needs_input_grad[:7]
        num_experts, _, rank = lora_a.shape
        dt, cd = x.dtype, compute_dtype(x.dtype)
        scale = ctx.scale
        t = x.shape[0]
        if probs is not None:
            p = probs.to(cd)
        elif router is not None:
            p = _router.select(p_soft, ctx.top_k, ctx.renormalize)
        else:
            p = None
        a_cat = _cat_a(lora_a, dt)
        b_cat = lora_b.to(dt).reshape(num_experts * rank, -1)

        dx = dw = db = d_a = d_b = d_router = d_probs = None
        du_scaled = torch.mm(dy, b_cat.t()).mul_(scale)  # [T, E·r]
        if need_b_lora:
            d_b = (torch.mm(_scale_by_probs(u, p, rank).t(), dy) * scale).view_as(lora_b).to(lora_b.dtype)
        du = _scale_by_probs(du_scaled, p, rank)
        dlogits = None
        if p is not None and (need_router or need_probs or need_x):
            dp = (du_scaled.to(cd).view(t, num_experts, rank) * u.to(cd).view(t, num_experts, rank)).sum(-1)
            if probs is not None:
                d_probs = dp.to(probs.dtype) if need_probs else None
            else:
                dlogits = _router.probs_backward(dp, p_soft, ctx.top_k, ctx.renormalize)
        if need_x:
            dx = torch.mm(dy, weight)
            dx.addmm_(du, a_cat.t())
            if dlogits is not None:
                dx += (dlogits @ router.to(cd).t()).to(dt)
        if need_a:
            d_a = torch.mm(x.t(), du).view(-1, num_experts, rank).permute(1, 0, 2).to(lora_a.dtype)
        if need_router and dlogits is not None:
            d_router = torch.mm(x.to(cd).t(), dlogits).to(router.dtype)
        if need_w:
            dw = torch.mm(dy.t(), x)
        if need_b:
            db = dy.sum(0)
        return dx, dw, db, d_a, d_b, d_router, d_probs, None, None, None
