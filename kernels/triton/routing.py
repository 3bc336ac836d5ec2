"""Router math inside Triton kernels, shared by every op (SPEC §1, "Router").

All functions work on a register tile of router logits or probabilities ``[BLOCK_M, BLOCK_E]``
in float32, one row per token, where ``BLOCK_E`` is E padded to a power of two (and to 16 when
the tile feeds ``tl.dot``); ``offs_e`` is ``tl.arange(0, BLOCK_E)`` and columns ``>= E`` are
padding. Padding never leaks: padded logits are -inf, padded probabilities 0.

Forward (``router_probs``):
    p_soft = softmax(logits)                        # float32, over the E real columns
    p      = p_soft * topk_mask(p_soft, TOP_K)      # TOP_K = 0 means all experts (no mask)
    p      = p / sum(p)                             # only when RENORMALIZE
Backward (``router_probs_backward``), from d p and the saved p_soft (the mask is recomputed):
    dq = (dp - sum(dp * q) / z) / z  with q = p_soft * mask, z = sum(q)    # RENORMALIZE only
    dq = dq * mask                                                          # TOP_K > 0 only
    d logits = p_soft * (dq - sum(p_soft * dq))
Top-k keeps, per row, the TOP_K largest probabilities; ties go to the lowest expert index
(``torch.topk`` on distinct values agrees).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def topk_mask(p, offs_e, E, TOP_K: tl.constexpr):
    """Boolean [BLOCK_M, BLOCK_E]: True on each row's TOP_K largest entries among the E real columns."""
    work = tl.where(offs_e[None, :] < E, p, -1.0)
    keep = offs_e[None, :] < 0  # all False, with p's shape after broadcasting
    for _ in tl.static_range(TOP_K):
        best = tl.max(work, axis=1)
        first = tl.min(tl.where(work == best[:, None], offs_e[None, :], p.shape[1]), axis=1)
        hit = offs_e[None, :] == first[:, None]
        keep = keep | hit
        work = tl.where(hit, -2.0, work)
    return keep


@triton.jit
def softmax(logits, offs_e, E):
    """Row softmax over the E real columns of float32 logits; padded columns get probability 0."""
    logits = tl.where(offs_e[None, :] < E, logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    num = tl.exp(logits - row_max[:, None])
    return num / tl.sum(num, axis=1)[:, None]


@triton.jit
def select(p_soft, offs_e, E, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr):
    """The routing weights actually used: p_soft, or its top-k part (renormalised on request)."""
    if TOP_K > 0:
        p = tl.where(topk_mask(p_soft, offs_e, E, TOP_K), p_soft, 0.0)
        if RENORMALIZE:
            p = p / tl.sum(p, axis=1)[:, None]
        return p
    else:
        return p_soft


@triton.jit
def router_probs(logits, offs_e, E, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr):
    """(p, p_soft) from float32 logits: p is what mixes the experts, p_soft what backward needs."""
    p_soft = softmax(logits, offs_e, E)
    return select(p_soft, offs_e, E, TOP_K, RENORMALIZE), p_soft


@triton.jit
def router_probs_backward(dp, p_soft, offs_e, E, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr):
    """d(logits) [BLOCK_M, BLOCK_E] float32 from d(p) and the saved softmax p_soft."""
    dq = dp
    if TOP_K > 0:
        keep = topk_mask(p_soft, offs_e, E, TOP_K)
        if RENORMALIZE:
            q = tl.where(keep, p_soft, 0.0)
            z = tl.sum(q, axis=1)[:, None]
            dq = (dp - tl.sum(dp * q, axis=1)[:, None] / z) / z
        dq = tl.where(keep, dq, 0.0)
    dlogits = p_soft * dq
    return dlogits - p_soft * tl.sum(dlogits, axis=1)[:, None]
