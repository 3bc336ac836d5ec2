"""The reference ops vs an independent per-token Python loop (scalar math, no einsum)."""

from __future__ import annotations

import math

import pytest
import torch

from pemoe import reference


def _softmax(logits: list[float]) -> list[float]:
    m = max(logits)
    e = [math.exp(v - m) for v in logits]
    return [v / sum(e) for v in e]


def _route(vec: list[float], router: torch.Tensor, top_k, renormalize) -> list[float]:
    num_experts = router.shape[1]
    logits = [sum(vec[i] * router[i, e].item() for i in range(len(vec))) for e in range(num_experts)]
    p = _softmax(logits)
    if top_k is not None:
        keep = sorted(range(num_experts), key=lambda e: -p[e])[:top_k]
        p = [p[e] if e in keep else 0.0 for e in range(num_experts)]
        if renormalize:
            z = sum(p)
            p = [v / z for v in p]
    return p


def loop_mov(h, router, experts, top_k=None, renormalize=False, sentence=None):
    groups, num_experts, dim = experts.shape
    out = torch.empty_like(h)
    for t in range(h.shape[0]):
        for g in range(groups):
            vec = [h[t, g * dim + d].item() for d in range(dim)]
            if router is None:
                p = [1.0]
            else:
                p = _route(sentence[t].tolist() if sentence is not None else vec, router, top_k, renormalize)
            for d in range(dim):
                s = sum(p[e] * experts[g, e, d].item() for e in range(num_experts))
                out[t, g * dim + d] = vec[d] * s
    return out


def loop_molora(x, weight, bias, lora_a, lora_b, router, scale, top_k=None, renormalize=False):
    num_experts, k, rank = lora_a.shape
    n = weight.shape[0]
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    for t in range(x.shape[0]):
        vec = x[t].tolist()
        p = [1.0] if router is None else _route(vec, router, top_k, renormalize)
        for j in range(n):
            acc = sum(vec[i] * weight[j, i].item() for i in range(k)) + bias[j].item()
            for e in range(num_experts):
                u = [sum(vec[i] * lora_a[e, i, q].item() for i in range(k)) for q in range(rank)]
                acc += scale * p[e] * sum(u[q] * lora_b[e, q, j].item() for q in range(rank))
            out[t, j] = acc
    return out


@pytest.mark.parametrize("e,top_k,renormalize", [(1, None, False), (3, None, False), (4, 2, False), (4, 2, True)])
def test_mov_vs_loop(e, top_k, renormalize):
    g, d, t = 2, 5, 4
    h = torch.randn(t, g * d, dtype=torch.float64)
    router = None if e == 1 else torch.randn(d, e, dtype=torch.float64)
    experts = 1 + 0.5 * torch.randn(g, e, d, dtype=torch.float64)
    got = reference.mov(h, router, experts, top_k=top_k, renormalize=renormalize)
    torch.testing.assert_close(got, loop_mov(h, router, experts, top_k, renormalize), rtol=1e-12, atol=1e-12)


def test_mov_sentence_routing_vs_loop():
    g, d, e, b, s, r = 2, 3, 4, 2, 3, 5
    h = torch.randn(b, s, g * d, dtype=torch.float64)
    router_input = torch.randn(b, r, dtype=torch.float64)
    router = torch.randn(r, e, dtype=torch.float64)
    experts = 1 + 0.5 * torch.randn(g, e, d, dtype=torch.float64)
    got = reference.mov(h, router, experts, router_input=router_input)
    per_token = router_input.repeat_interleave(s, dim=0)
    want = loop_mov(h.reshape(b * s, -1), router, experts, sentence=per_token).reshape(h.shape)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("e,top_k,renormalize", [(1, None, False), (3, None, False), (3, 2, True)])
def test_molora_vs_loop(e, top_k, renormalize):
    t, k, n, r = 3, 6, 5, 2
    x = torch.randn(t, k, dtype=torch.float64)
    weight, bias = torch.randn(n, k, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    lora_a, lora_b = torch.randn(e, k, r, dtype=torch.float64), torch.randn(e, r, n, dtype=torch.float64)
    router = None if e == 1 else torch.randn(k, e, dtype=torch.float64)
    got = reference.molora_linear(
        x, weight, lora_a, lora_b, router, scale=8.0, bias=bias, top_k=top_k, renormalize=renormalize
    )
    want = loop_molora(x, weight, bias, lora_a, lora_b, router, 8.0, top_k, renormalize)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_mov_ffn_vs_loop():
    t, m, f, e = 3, 4, 6, 3
    x = torch.randn(t, m, dtype=torch.float64)
    wi_0, wi_1, wo = (
        torch.randn(f, m, dtype=torch.float64),
        torch.randn(f, m, dtype=torch.float64),
        torch.randn(m, f, dtype=torch.float64),
    )
    router, experts = torch.randn(f, e, dtype=torch.float64), 1 + 0.5 * torch.randn(1, e, f, dtype=torch.float64)
    got = reference.mov_ffn(x, wi_0, wo, router, experts, wi_1=wi_1, activation="relu")
    a = loop_mov((x @ wi_0.T).clamp_min(0), router, experts)
    torch.testing.assert_close(got, (a * (x @ wi_1.T)) @ wo.T, rtol=1e-12, atol=1e-12)


def test_ia3_and_lora_are_the_one_expert_cases():
    h = torch.randn(5, 6, dtype=torch.float64)
    scaling = torch.randn(2, 1, 3, dtype=torch.float64)
    torch.testing.assert_close(reference.ia3(h, scaling), h * scaling.reshape(-1))
    torch.testing.assert_close(reference.ia3(h, scaling.reshape(-1)), h * scaling.reshape(-1))
    x, w = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    a, b = torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(reference.lora_linear(x, w, a, b, scale=2.0), x @ w.T + 2.0 * (x @ a) @ b)


def test_router_probs_float32_for_low_precision_inputs():
    h = torch.randn(4, 8, dtype=torch.bfloat16)
    p = reference.router_probs(h, torch.randn(8, 3))
    assert p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(4))
    p2 = reference.router_probs(h, torch.randn(8, 3), top_k=1)
    assert ((p2 > 0).sum(-1) == 1).all()
