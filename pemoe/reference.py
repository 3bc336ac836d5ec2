"""Reference semantics: plain einsum transcriptions of SPEC §1.

These functions are the ground truth for every kernel in pemoe. They favour clarity over
speed (``molora_linear`` builds the [T, E, N] tensor the authors' code builds) and rely on
ordinary autograd for their gradients. They do not validate arguments; ``pemoe.ops`` does.

Numerics: router logits, softmax and the expert merge run in float32 (float64 when the
inputs are float64); the frozen base GEMM runs in the activation dtype; outputs have the
activation dtype.

Shapes (T = tokens, all leading dims flattened):
    router_probs(router_in [T, R], router [R, E])                -> p [T, E] float32
    mov(h [..., G*D], router [D, E], experts [G, E, D])          -> [..., G*D]
    mov_linear(x [..., K], weight [N, K], router, experts)        -> [..., N]
    mov_ffn(x [..., M], wi_0 [F, M], wo [M, F], router [F, E], experts [1, E, F]) -> [..., M]
    molora_linear(x [..., K], weight [N, K], lora_a [E, K, r], lora_b [E, r, N], router [K, E]) -> [..., N]
    molora_adapter(x [..., K], lora_a, lora_b, router, base [..., N])  -> [..., N]  (no frozen weight)
(IA)3 and LoRA are the E = 1 cases (``ia3``, ``lora_linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "ACTIVATIONS",
    "compute_dtype",
    "router_probs",
    "sentence_router_probs",
    "mov",
    "mov_linear",
    "mov_ffn",
    "molora_linear",
    "molora_adapter",
    "ia3",
    "lora_linear",
]

ACTIVATIONS = {
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),  # T5 v1.1 (gated-GELU)
    "gelu": F.gelu,
    "relu": F.relu,  # T5 v1.0
    "silu": F.silu,  # Llama, Mistral, Qwen (gated: silu(x gate_projᵀ) * (x up_projᵀ))
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Router/merge dtype: float32, or float64 for float64 inputs."""
    return torch.promote_types(torch.float32, dtype)


def router_probs(
    router_in: torch.Tensor,
    router: torch.Tensor,
    *,
    top_k: int | None = None,
    renormalize: bool = False,
) -> torch.Tensor:
    """p = softmax(router_in32 @ router); top-k keeps the k largest (renormalised on request)."""
    cd = compute_dtype(router_in.dtype)
    p = torch.softmax(router_in.to(cd) @ router.to(cd), dim=-1)
    if top_k is not None:
        mask = torch.zeros_like(p).scatter_(-1, p.topk(top_k, dim=-1).indices, 1.0)
        p = p * mask
        if renormalize:
            p = p / p.sum(dim=-1, keepdim=True)
    return p


def sentence_router_probs(
    router_input: torch.Tensor,
    router: torch.Tensor,
    tokens_shape: tuple[int, ...],
    *,
    top_k: int | None = None,
    renormalize: bool = False,
) -> torch.Tensor:
    """Sentence routing: p from one router vector per sequence, broadcast to tokens_shape + (E,).

    router_input is [B, R] for tokens [B, S, ...], or any shape broadcastable to tokens_shape + (R,).
    """
    p = router_probs(router_input, router, top_k=top_k, renormalize=renormalize)
    if p.dim() == 2 and len(tokens_shape) > 1:  # [B, E] for tokens [B, S, ...]
        p = p.reshape(p.shape[:1] + (1,) * (len(tokens_shape) - 1) + p.shape[1:])
    return p.expand(tokens_shape + (p.shape[-1],))


def mov(
    h: torch.Tensor,
    router: torch.Tensor | None,
    experts: torch.Tensor,
    *,
    top_k: int | None = None,
    renormalize: bool = False,
    router_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = h * einsum('tge,ged->tgd', softmax(h32 @ router), experts), per group of width D."""
    groups, num_experts, dim = experts.shape
    cd = compute_dtype(h.dtype)
    hg = h.reshape(h.shape[:-1] + (groups, dim)).to(cd)  # [..., G, D]
    if router is None:  # (IA)3: E = 1, p == 1
        p = torch.ones(hg.shape[:-1] + (1,), dtype=cd, device=h.device)
    elif router_input is None:
        p = router_probs(hg, router, top_k=top_k, renormalize=renormalize)  # [..., G, E]
    else:
        p = sentence_router_probs(router_input, router, tuple(h.shape[:-1]), top_k=top_k, renormalize=renormalize)
        p = p.unsqueeze(-2).expand(hg.shape[:-1] + (num_experts,))  # same p for every group
    scaling = torch.einsum("...ge,ged->...gd", p, experts.to(cd))
    return (hg * scaling).reshape(h.shape).to(h.dtype)


def mov_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    router: torch.Tensor | None,
    experts: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    top_k: int | None = None,
    renormalize: bool = False,
    router_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """mov(x @ weight.T + bias): MoV on a linear's output (T5 attention k and v)."""
    h = F.linear(x, weight, bias)
    return mov(h, router, experts, top_k=top_k, renormalize=renormalize, router_input=router_input)


def mov_ffn(
    x: torch.Tensor,
    wi_0: torch.Tensor,
    wo: torch.Tensor,
    router: torch.Tensor | None,
    experts: torch.Tensor,
    *,
    wi_1: torch.Tensor | None = None,
    activation: str = "gelu_new",
    top_k: int | None = None,
    renormalize: bool = False,
    router_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """T5 FFN with MoV on the activation: (mov(act(x wi_0ᵀ)) [* x wi_1ᵀ]) woᵀ."""
    a = ACTIVATIONS[activation](F.linear(x, wi_0))
    a = mov(a, router, experts, top_k=top_k, renormalize=renormalize, router_input=router_input)
    if wi_1 is not None:
        a = a * F.linear(x, wi_1)
    return F.linear(a, wo)


def _molora_delta(x, lora_a, lora_b, router, top_k, renormalize, router_input):
    """Σ_e p_e (x A_e) B_e [..., N] in the compute dtype (unscaled), from the [..., E, N] per-expert outputs."""
    cd = compute_dtype(x.dtype)
    x32 = x.to(cd)
    if router is None:  # LoRA: E = 1
        p = torch.ones(x.shape[:-1] + (1,), dtype=cd, device=x.device)
    elif router_input is None:
        p = router_probs(x32, router, top_k=top_k, renormalize=renormalize)
    else:
        p = sentence_router_probs(router_input, router, tuple(x.shape[:-1]), top_k=top_k, renormalize=renormalize)
    per_expert = torch.einsum("...k,ekr,ern->...en", x32, lora_a.to(cd), lora_b.to(cd))  # [..., E, N]
    return torch.einsum("...e,...en->...n", p, per_expert)


def molora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    router: torch.Tensor | None,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    top_k: int | None = None,
    renormalize: bool = False,
    router_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x Wᵀ + b + scale * Σ_e p_e (x A_e) B_e, the per-expert outputs mixed (not A, B merged)."""
    base = F.linear(x, weight, bias)
    delta = _molora_delta(x, lora_a, lora_b, router, top_k, renormalize, router_input)
    return (base.to(delta.dtype) + scale * delta).to(x.dtype)


def molora_adapter(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    router: torch.Tensor | None,
    *,
    scale: float,
    base: torch.Tensor | None = None,
    top_k: int | None = None,
    renormalize: bool = False,
    router_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoLoRA without its frozen linear: y = base + scale * Σ_e p_e (x A_e) B_e, ``base`` [..., N] the frozen
    layer's own output (e.g. a quantized linear's), none: the adapter's delta alone."""
    delta = _molora_delta(x, lora_a, lora_b, router, top_k, renormalize, router_input)
    y = scale * delta if base is None else base.to(delta.dtype) + scale * delta
    return y.to(x.dtype)


def ia3(h: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
    """(IA)3: y = h * l, l [G, 1, D] (MoV with one expert) or [N]."""
    if scaling.dim() == 1:
        return (h.to(compute_dtype(h.dtype)) * scaling).to(h.dtype)
    return mov(h, None, scaling)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoRA: y = x Wᵀ + b + scale * (x A) B with A [K, r] or [1, K, r], B [r, N] or [1, r, N]."""
    if lora_a.dim() == 2:
        lora_a, lora_b = lora_a.unsqueeze(0), lora_b.unsqueeze(0)
    return molora_linear(x, weight, lora_a, lora_b, None, scale=scale, bias=bias)
