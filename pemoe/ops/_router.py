"""Router math for the ``"torch"`` implementation, with a hand-written backward.

Forward: p_soft = softmax(logits) in float32; p = p_soft, or p_soft masked to its top-k
entries (renormalised on request). Only p_soft is saved: the top-k mask and p are
recomputed from it in the backward pass (cheap: [T, E]).
"""

from __future__ import annotations

import torch


def softmax_last(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last (expert) dim.

    torch's softmax kernel is slow for a short last dim (E ~ 10: scalar inner loop), so the
    normalisation is written out; each step is a vectorised pass over [..., E].
    """
    if logits.shape[-1] == 1:
        return torch.ones_like(logits)
    e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    return e.div_(e.sum(dim=-1, keepdim=True))


def _top_k_mask(p_soft: torch.Tensor, top_k: int) -> torch.Tensor:
    return torch.zeros_like(p_soft).scatter_(-1, p_soft.topk(top_k, dim=-1).indices, 1.0)


def select(p_soft: torch.Tensor, top_k: int | None, renormalize: bool) -> torch.Tensor:
    """The routing weights actually used: p_soft, or its top-k part."""
    if top_k is None or top_k == p_soft.shape[-1]:
        return p_soft
    p = p_soft * _top_k_mask(p_soft, top_k)
    if renormalize:
        p = p / p.sum(dim=-1, keepdim=True)
    return p


def probs_backward(dp: torch.Tensor, p_soft: torch.Tensor, top_k: int | None, renormalize: bool) -> torch.Tensor:
    """d(logits) from d(p) through top-k selection and softmax (all in p_soft's dtype)."""
    dq = dp
    if top_k is not None and top_k != p_soft.shape[-1]:
        mask = _top_k_mask(p_soft, top_k)
        if renormalize:
            q = p_soft * mask
            z = q.sum(dim=-1, keepdim=True)
            dq = (dp - (dp * q).sum(dim=-1, keepdim=True) / z) / z
        dq = dq * mask
    return p_soft * (dq - (dq * p_soft).sum(dim=-1, keepdim=True))
