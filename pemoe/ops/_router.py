"""Router math for the ``"torch"`` implementation, with a hand-written backward.

Forward: p_soft = softmax(logits) in float32; p = p_soft, or p_soft masked to its top-k
entries (renormalised on request). Only p_soft is saved: the top-k mask and p are
recomputed from it in the backward pass (cheap: [T, E]).

Every function takes the expert dimension ``dim``: the ops keep probabilities in an
[..., E, T] layout so that the reductions over E run across contiguous token rows (torch's
softmax over a short innermost dim, E ~ 10, has a scalar inner loop and is ~15x slower).
"""

from __future__ import annotations

import torch


def _top_k_mask(p_soft: torch.Tensor, top_k: int, dim: int) -> torch.Tensor:
    return torch.zeros_like(p_soft).scatter_(dim, p_soft.topk(top_k, dim=dim).indices, 1.0)


def select(p_soft: torch.Tensor, top_k: int | None, renormalize: bool, dim: int) -> torch.Tensor:
    """The routing weights actually used: p_soft, or its top-k part."""
    if top_k is None or top_k == p_soft.shape[dim]:
        return p_soft
    p = p_soft * _top_k_mask(p_soft, top_k, dim)
    if renormalize:
        p = p / p.sum(dim=dim, keepdim=True)
    return p


def probs_backward(
    dp: torch.Tensor, p_soft: torch.Tensor, top_k: int | None, renormalize: bool, dim: int
) -> torch.Tensor:
    """d(logits) from d(p) through top-k selection and softmax (all in p_soft's dtype)."""
    dq = dp
    if top_k is not None and top_k != p_soft.shape[dim]:
        mask = _top_k_mask(p_soft, top_k, dim)
        if renormalize:
            q = p_soft * mask
            z = q.sum(dim=dim, keepdim=True)
            dq = (dp - (dp * q).sum(dim=dim, keepdim=True) / z) / z
        dq = dq * mask
    dlogits = p_soft * dq
    return dlogits.sub_(p_soft * dlogits.sum(dim=dim, keepdim=True))
