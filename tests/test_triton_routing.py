"""The in-kernel router math (pemoe.kernels.triton.routing) vs the reference router, forward and backward."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from pemoe import reference
from pemoe.kernels.triton import interpreter, routing

pytestmark = pytest.mark.skipif(not interpreter.INTERPRET, reason="needs TRITON_INTERPRET=1 (no GPU)")


@triton.jit
def _probs_kernel(
    logits_ptr, dp_ptr,  # inputs [T, E]
    p_ptr, p_soft_ptr, dlogits_ptr,  # outputs [T, E]
    T, E,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    mask = (offs_m[:, None] < T) & (offs_e[None, :] < E)
    idx = offs_m[:, None] * E + offs_e[None, :]
    logits = tl.load(logits_ptr + idx, mask=mask, other=0.0)
    p, p_soft = routing.router_probs(logits, offs_e, E, TOP_K, RENORMALIZE)
    dp = tl.load(dp_ptr + idx, mask=mask, other=0.0)
    dlogits = routing.router_probs_backward(dp, p_soft, offs_e, E, TOP_K, RENORMALIZE)
    tl.store(p_ptr + idx, p, mask=mask)
    tl.store(p_soft_ptr + idx, p_soft, mask=mask)
    tl.store(dlogits_ptr + idx, dlogits, mask=mask)


def _run(logits: torch.Tensor, dp: torch.Tensor, top_k: int | None, renormalize: bool):
    t, e = logits.shape
    p, p_soft, dlogits = (torch.empty_like(logits) for _ in range(3))
    block_e = max(16, triton.next_power_of_2(e))
    _probs_kernel[(triton.cdiv(t, 16),)](
        logits, dp, p, p_soft, dlogits, t, e, TOP_K=top_k or 0, RENORMALIZE=renormalize, BLOCK_M=16, BLOCK_E=block_e
    )
    return p, p_soft, dlogits


ROUTINGS = [(None, False), (1, False), (2, False), (2, True), (3, True)]


@pytest.mark.parametrize(
    "e,top_k,renormalize",
    # top_k > E is rejected by argument validation before any kernel runs
    [(e, k, r) for e in (1, 2, 10, 17, 60) for k, r in ROUTINGS if k is None or k <= e],
)
def test_router_probs_and_backward_match_the_reference(e, top_k, renormalize):
    t = 37
    h = torch.randn(t, 8, dtype=torch.float64)
    router = torch.randn(8, e, dtype=torch.float64, requires_grad=True)
    logits64 = (h @ router).detach().requires_grad_()
    p64 = reference.router_probs(logits64, torch.eye(e, dtype=torch.float64), top_k=top_k, renormalize=renormalize)
    dp = torch.randn(t, e, dtype=torch.float64)
    (dlogits64,) = torch.autograd.grad(p64, logits64, dp)
    p, p_soft, dlogits = _run(logits64.detach().float(), dp.float(), top_k, renormalize)
    torch.testing.assert_close(p_soft.double(), torch.softmax(logits64.detach(), -1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p.double(), p64.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dlogits.double(), dlogits64, rtol=1e-5, atol=1e-6)


def test_top_k_ties_go_to_the_lowest_index():
    logits = torch.zeros(3, 5)
    p, _, _ = _run(logits, torch.zeros(3, 5), 2, False)
    assert torch.equal(p != 0, torch.tensor([[True, True, False, False, False]] * 3))
