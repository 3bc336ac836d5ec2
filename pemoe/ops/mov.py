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
``mov_linear`` it would cost a second GEMM to recompute). s is recomputed (one small batched
matmul). p_soft ([G, E, T] float32: E/D of h's element count) is kept only for wide groups
(D >= :data:`KEEP_PROBS_MIN_DIM`, e.g. the T5 FFN site, D = d_ff, where it is ~3 % of h at E = 30 and
recomputing it would cost a [T, D] x [D, E] matmul); for narrow ones (attention heads, D = d_kv = 64:
47 % of h at E = 30) it is recomputed from h in the backward (a batched matmul and a softmax over E,
bitwise the forward's). Sentence routing passes the probabilities in from outside (``probs``,
[T, E]); their gradient is returned to autograd.

The FFN site of ``mov_ffn`` (SPEC §2) runs as :class:`MoVActFunction`: y = mov(act(z)) with the
activation inside the Function. It saves the pre-activation z (which the activation's own backward
would keep anyway) instead of h = act(z), and recomputes h in the backward (one elementwise pass):
one [T, F] tensor less per FFN site than act followed by :class:`MoVFunction`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pemoe.ops import _router
from pemoe.reference import ACTIVATIONS, compute_dtype

#: d act(z) / dz applied to an upstream gradient, per activation name of :data:`pemoe.reference.ACTIVATIONS`
#: (the same ATen kernels autograd runs for ``F.gelu`` / ``F.relu``, so the fused FFN site's gradients are
#: bitwise those of the unfused one).
ACTIVATION_GRADS = {
    "gelu_new": lambda dh, z: torch.ops.aten.gelu_backward(dh, z, approximate="tanh"),
    "gelu": lambda dh, z: torch.ops.aten.gelu_backward(dh, z),
    "relu": lambda dh, z: torch.ops.aten.threshold_backward(dh, z, 0),
    "silu": lambda dh, z: torch.ops.aten.silu_backward(dh, z),
}

# ------------------------------------------------------------------------------------------
# Forward / backward pieces on flattened tensors. Layouts: h [T, G, D]; experts [G, E, D];
# probabilities [G, E, T] (tokens innermost, so softmax over E and the merge are fast
# batched ops); sentence-routing probs [T, E] come in from outside.
# ------------------------------------------------------------------------------------------


def _routing_weights(h, router, experts, probs, p_soft, top_k, renormalize):
    """p [G, E, T] in the compute dtype (None for (IA)3)."""
    groups, num_experts, _ = experts.shape
    if probs is not None:
        return probs.to(compute_dtype(h.dtype)).t().unsqueeze(0).expand(groups, num_experts, h.shape[0])
    if router is None:
        return None
    return _router.select(p_soft, top_k, renormalize, dim=1)


def _scaling(p, experts, dtype):
    """s = einsum('get,ged->tgd'): a [T, G, D] view (of the batched matmul's [G, T, D] output) in ``dtype``,
    the activation dtype; [G, D] for (IA)3.

    For 16-bit activations the merge runs in that dtype (float32 accumulation inside the
    matmul): s is rounded once, to the precision the product h·s is rounded to anyway.
    """
    if p is None:  # (IA)3
        return experts[:, 0, :].to(dtype)
    return torch.bmm(p.to(dtype).transpose(1, 2), experts.to(dtype)).transpose(0, 1)


#: p_soft is saved for the backward when the group width D is at least this, else recomputed from h.
KEEP_PROBS_MIN_DIM = 256


def _probs_to_keep(p_soft, experts):
    return p_soft if p_soft is not None and experts.shape[2] >= KEEP_PROBS_MIN_DIM else None


def router_softmax(h, router, experts, probs, h_cd=None):
    """p_soft [G, E, T] in the compute dtype when the router reads h (None for (IA)3 / sentence routing).

    ``h_cd``: h already in the compute dtype, when the caller has made that copy anyway.
    """
    if probs is not None or router is None:
        return None
    groups, num_experts, dim = experts.shape
    if h_cd is None:
        h_cd = h.to(compute_dtype(h.dtype))
    # logits[g, e, t] = Σ_d router[d, e] · h[t, g, d], one router shared by the groups
    logits = torch.bmm(router.to(h_cd.dtype).t().expand(groups, num_experts, dim), h_cd.permute(1, 2, 0))
    return torch.softmax(logits, dim=1)


def mov_forward(h, router, experts, probs, top_k, renormalize):
    """Returns (y [T, G, D] in h's dtype, p_soft [G, E, T] float32 or None)."""
    p_soft = router_softmax(h, router, experts, probs)
    p = _routing_weights(h, router, experts, probs, p_soft, top_k, renormalize)
    return h * _scaling(p, experts, h.dtype), p_soft


def mov_backward(dy, h, router, experts, probs, p_soft, top_k, renormalize, needs):
    """Returns (dh [T, G, D], d_router [D, E], d_experts [G, E, D], d_probs [T, E]); unneeded ones None.

    ``p_soft`` None with a router that reads h: recomputed from h (see the module docstring).
    """
    need_h, need_router, need_experts, need_probs = needs
    cd = compute_dtype(h.dtype)
    G, D = h.shape[1:]
    self_routed = router is not None and probs is None
    need_adapter_terms = need_experts or need_probs or (self_routed and (need_router or need_h))
    # One compute-dtype copy of h serves the router recompute, the adapter gradients and d router: each
    # fresh [T, G, D] temporary is a pass over memory and, on the CPU, page faults on first touch.
    h_cd = h.to(cd) if need_adapter_terms or (self_routed and p_soft is None) else None
    if p_soft is None:
        p_soft = router_softmax(h, router, experts, probs, h_cd)
    p = _routing_weights(h, router, experts, probs, p_soft, top_k, renormalize)

    dh = d_router = d_experts = d_probs = None
    dlogits = None
    if need_adapter_terms:
        # [G, T, D], float32 for the adapter gradients; the mixed-dtype product promotes dy as it reads
        # it (bitwise dy.to(cd) * h_cd, without a float32 copy of dy)
        dy_h = torch.mul(h_cd, dy).transpose(0, 1)
        if need_experts:
            d_experts = dy_h.sum(1).unsqueeze(1) if p is None else torch.bmm(p, dy_h)  # [G, E, D]
        if p is not None and (need_probs or self_routed):
            dp = torch.bmm(experts.to(cd), dy_h.transpose(1, 2))  # [G, E, T] = Σ_d experts·dy·h
            del dy_h  # freed before the [T, G, D] temporaries of dh are allocated
            if probs is not None:
                d_probs = dp.sum(0).t()
            else:
                dlogits = _router.probs_backward(dp, p_soft, top_k, renormalize, dim=1)
                if need_router:  # Σ_{t,g} h[t,g,:]ᵀ dlogits[g,:,t]
                    d_router = torch.bmm(dlogits, h_cd.transpose(0, 1)).sum(0).t()
    del h_cd
    if need_h:
        # dh = dy·s (+ dlogits @ routerᵀ), written once in h's [T, G, D] layout: the product reads s through its
        # [G, T, D] matmul layout, and the router term is one 2-D GEMM over the T·G rows, accumulated in place
        # (measured on the CPU: 14 % off a bf16 training step against building dh as [G, T, D] and copying it
        # back; the [T·G, E] copy of dlogits is E/D of dh's size)
        dh = torch.mul(dy, _scaling(p, experts, dy.dtype), out=torch.empty_like(h, dtype=dy.dtype))
        if dlogits is not None:
            dlogits_rows = dlogits.permute(2, 0, 1).reshape(-1, dlogits.shape[1]).to(dh.dtype)  # [T·G, E]
            dh.view(-1, D).addmm_(dlogits_rows, router.t().to(dh.dtype))
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
        ctx.save_for_backward(h, router, experts, probs, _probs_to_keep(p_soft, experts), weight, x if save_x else None)
        ctx.top_k, ctx.renormalize = top_k, renormalize
        return y.reshape(h2d.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable  # hand-written backward: second derivatives would be wrong
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


class MoVActFunction(torch.autograd.Function):
    """y = mov(act(z)) on flattened pre-activations z [T, G·D] (the FFN site, SPEC §2), act by name.

    Saves z instead of h = act(z) and recomputes h in the backward; dz = act'(z) · dh through
    :data:`ACTIVATION_GRADS`. Same values and gradients as ``act`` followed by :class:`MoVFunction`.
    """

    @staticmethod
    def forward(ctx, z, router, experts, probs, top_k, renormalize, activation):
        groups, _, dim = experts.shape
        h = ACTIVATIONS[activation](z).view(z.shape[0], groups, dim)
        y, p_soft = mov_forward(h, router, experts, probs, top_k, renormalize)
        ctx.save_for_backward(z, router, experts, probs, _probs_to_keep(p_soft, experts))
        ctx.top_k, ctx.renormalize, ctx.activation = top_k, renormalize, activation
        return y.reshape(z.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable  # hand-written backward: second derivatives would be wrong
    def backward(ctx, dy):
        z, router, experts, probs, p_soft = ctx.saved_tensors
        need_z, need_router, need_experts, need_probs = ctx.needs_input_grad[:4]
        groups, _, dim = experts.shape
        h = ACTIVATIONS[ctx.activation](z).view(z.shape[0], groups, dim)
        dh, d_router, d_experts, d_probs = mov_backward(
            dy.reshape(h.shape),
            h,
            router,
            experts,
            probs,
            p_soft,
            ctx.top_k,
            ctx.renormalize,
            (need_z, need_router, need_experts, need_probs),
        )
        dz = None if dh is None else ACTIVATION_GRADS[ctx.activation](dh.view(z.shape), z)
        if d_router is not None:
            d_router = d_router.to(router.dtype)
        if d_experts is not None:
            d_experts = d_experts.to(experts.dtype)
        if d_probs is not None:
            d_probs = d_probs.to(probs.dtype)
        return dz, d_router, d_experts, d_probs, None, None, None
