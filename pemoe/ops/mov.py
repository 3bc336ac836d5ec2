"""MoV, ``implementation="torch"``: reformulated eager ops + a memory-saving autograd Function.

Math (SPEC §1), per token t and group g (h seen as [T, G, D]):
    p = softmax(h32 @ router)                 [T, G, E]  float32
    s = einsum('tge,ged->tgd', p, experts)    [T, G, D]  float32
    y = h * s
Backward (the base weight is frozen, so no weight gradient unless asked for):
    dp[t,g,e]      = Σ_d dy·h·experts[g,e,d]
    dlogits        = softmax/top-k backward of dp
    d experts      = Σ_t p[t,g,e]·dy·h
    d router       = Σ_{t,g} h[t,g,:]ᵀ dlogits[t,g,:]
    dh             = dy·s + dlogits @ routerᵀ,   dx = dh @ W  (mov_linear)
Saved for backward: h in the activation dtype (the op's own input for ``mov``; for
``mov_linear`` it would cost a second GEMM to recompute) and p_soft in float32. s is
recomputed (one small batched matmul). Sentence routing passes the probabilities in from
outside (``probs``, [T, E]); their gradient is returned to autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pemoe.ops import _router
from pemoe.reference import compute_dtype

# ------------------------------------------------------------------------------------------
# Forward / backward pieces on flattened tensors: h [T, G, D], p [T, G, E], experts [G, E, D]
# ------------------------------------------------------------------------------------------


def _merge(p: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """s = einsum('tge,ged->tgd') as one batched matmul over groups; returns a [T, G, D] view."""
    return torch.bmm(p.transpose(0, 1), experts).transpose(0, 1)


def _self_routing_probs(h: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    cd = compute_dtype(h.dtype)
    logits = torch.matmul(h.to(cd), router.to(cd))  # [T, G, E]
    return _router.softmax_last(logits)


def mov_forward(h, router, experts, probs, top_k, renormalize):
    """Returns (y [T, G, D] in h's dtype, p_soft or None)."""
    cd = compute_dtype(h.dtype)
    experts_cd = experts.to(cd)
    if probs is not None:  # sentence routing: [T, E], shared by all groups
        p_soft = None
        p = probs.to(cd).unsqueeze(1).expand(h.shape[0], h.shape[1], probs.shape[-1])
        scaling = _merge(p, experts_cd)
    elif router is None:  # (IA)3
        p_soft = None
        scaling = experts_cd[:, 0, :]
    else:
        p_soft = _self_routing_probs(h, router)
        scaling = _merge(_router.select(p_soft, top_k, renormalize), experts_cd)
    if h.dtype == cd:
        y = h * scaling
    else:  # multiply in the activation dtype: a mixed-dtype multiply promotes and is ~10x slower
        y = h * scaling.to(h.dtype)
    return y, p_soft


def mov_backward(dy, h, router, experts, probs, p_soft, top_k, renormalize, needs):
    """Returns (dh, d_router, d_experts, d_probs); entries not needed are None."""
    need_h, need_router, need_experts, need_probs = needs
    cd = compute_dtype(h.dtype)
    experts_cd = experts.to(cd)
    T, G, D = h.shape
    if probs is not None:
        p = probs.to(cd).unsqueeze(1).expand(T, G, probs.shape[-1])
    elif router is None:
        p = None
    else:
        p = _router.select(p_soft, top_k, renormalize)
    scaling = experts_cd[:, 0, :].expand(T, G, D) if p is None else _merge(p, experts_cd)

    dh = d_router = d_experts = d_probs = None
    dy_h = None
    if need_experts or need_router or need_probs or (need_h and router is not None and probs is None):
        dy_h = dy.to(cd) * h.to(cd)  # [T, G, D]
    if need_experts:
        if p is None:
            d_experts = dy_h.sum(0).unsqueeze(1)
        else:
            d_experts = torch.bmm(p.transpose(0, 1).transpose(1, 2), dy_h.transpose(0, 1))  # [G, E, D]
    dlogits = None
    if p is not None and dy_h is not None:
        dp = torch.bmm(dy_h.transpose(0, 1), experts_cd.transpose(1, 2)).transpose(0, 1)  # [T, G, E]
        if probs is not None:
            if need_probs:
                d_probs = dp.sum(1)
        else:
            dlogits = _router.probs_backward(dp, p_soft, top_k, renormalize)
            if need_router:
                d_router = torch.matmul(h.to(cd).reshape(T * G, D).t(), dlogits.reshape(T * G, dlogits.shape[-1]))
    if need_h:
        dh = dy.to(cd) * scaling if dy.dtype != h.dtype else dy * scaling.to(dy.dtype)
        if dlogits is not None:
            dh = dh + torch.matmul(dlogits, router.to(cd).t())
        dh = dh.to(h.dtype)
    return dh, d_router, d_experts, d_probs


# ------------------------------------------------------------------------------------------
# Autograd Function: mov (weight is None) and mov_linear (h = x Wᵀ + b computed inside)
# ------------------------------------------------------------------------------------------


class MoVFunction(torch.autograd.Function):
    """y = mov(x Wᵀ + b) (or mov(x) when weight is None) on flattened inputs x [T, K]."""

    @staticmethod
    def forward(ctx, x, weight, bias, router, experts, probs, top_k, renormalize):
        groups, _, dim = experts.shape
        h2d = x if weight is None else F.linear(x, weight, bias)
        h = h2d.view(h2d.shape[0], groups, dim)
        y, p_soft = mov_forward(h, router, experts, probs, top_k, renormalize)
        save_x = weight is not None and weight.requires_grad
        ctx.save_for_backward(h, router, experts, probs, p_soft, weight, x if save_x else None)
        ctx.top_k, ctx.renormalize = top_k, renormalize
        return y.reshape(h2d.shape)

    @staticmethod
    def backward(ctx, dy):
        h, router, experts, probs, p_soft, weight, x = ctx.saved_tensors
        need_x, need_w, need_b, need_router, need_experts, need_probs = ctx.needs_input_grad[:6]
        need_h = need_x or need_w or need_b
        dh, d_router, d_experts, d_probs = mov_backward(
            dy.reshape(h.shape),
            h,
            router,
            experts,
            probs,
            p_soft,
            ctx.top_k,
            ctx.renormalize,
            (need_h, need_router, need_experts, need_probs),
        )
        dx = dw = db = None
        if dh is not None:
            dh = dh.reshape(h.shape[0], h.shape[1] * h.shape[2])
            if weight is None:
                dx = dh
            else:
                dx = dh @ weight if need_x else None
                dw = dh.t() @ x if need_w else None
                db = dh.sum(0) if need_b else None
        if d_router is not None:
            d_router = d_router.to(router.dtype)
        if d_experts is not None:
            d_experts = d_experts.to(experts.dtype)
        if d_probs is not None:
            d_probs = d_probs.to(probs.dtype)
        return dx, dw, db, d_router, d_experts, d_probs, None, None
