"""Reference semantics in JAX: plain ``jnp`` transcriptions of SPEC §1 (ground truth of the JAX side).

Line for line the same math as :mod:`pemoe.reference` (PyTorch), on the same weights and layouts:
frozen weights in torch ``Linear`` layout [N, K]; router [in, E]; experts [G, E, D];
lora_a [E, K, r]; lora_b [E, r, N]. Gradients come from ordinary JAX autodiff. No argument
validation here; :mod:`pemoe.jax.ops` validates.

Numerics: router logits, softmax and the expert merge run in float32 (float64 for float64
inputs, which need ``jax_enable_x64``); the frozen base GEMM runs in the activation dtype;
outputs have the activation dtype. ``molora_linear`` builds the [T, E, N] tensor the authors'
code builds — clarity over speed.

Shapes (T = tokens, all leading dims flattened):
    router_probs(router_in [T, R], router [R, E])                -> p [T, E] float32
    mov(h [..., G*D], router [D, E], experts [G, E, D])          -> [..., G*D]
    mov_linear(x [..., K], weight [N, K], router, experts)        -> [..., N]
    mov_ffn(x [..., M], wi_0 [F, M], wo [M, F], router [F, E], experts [1, E, F]) -> [..., M]
    molora_linear(x [..., K], weight [N, K], lora_a [E, K, r], lora_b [E, r, N], router [K, E]) -> [..., N]

Adapter banks (``banked_*``): the same ops with per-token adapters, ``adapter_ids`` [T] (one int per token,
-1 = the base alone) and the parameters stacked along a leading axis A (experts [A, G, E, D], router
[A, in, E], lora_a [A, E, K, r], lora_b [A, E, r, N]): a loop over the A adapters, each running the
single-adapter op above on every token with its parameters, whose rows are kept for the tokens naming it
(the others keep the base output). Ids outside [-1, A) give NaN rows (the contract of the "xla" forms
under tracing).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "ACTIVATIONS",
    "compute_dtype",
    "linear",
    "top_k_mask",
    "router_probs",
    "sentence_router_probs",
    "mov",
    "mov_linear",
    "mov_ffn",
    "molora_linear",
    "banked_mov",
    "banked_mov_linear",
    "banked_mov_ffn",
    "banked_molora_linear",
]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": lambda t: jax.nn.gelu(t, approximate=True),  # T5 v1.1 (gated-GELU)
    "gelu": lambda t: jax.nn.gelu(t, approximate=False),
    "relu": jax.nn.relu,  # T5 v1.0
    "silu": jax.nn.silu,  # Llama, Mistral, Qwen
}


def compute_dtype(dtype) -> jnp.dtype:
    """Router/merge dtype: float32, or float64 for float64 inputs."""
    return jnp.promote_types(jnp.float32, dtype)


def linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x @ weight.T + bias with weight in torch Linear layout [N, K], in x's dtype."""
    y = jnp.matmul(x, weight.T)
    return y if bias is None else y + bias.astype(y.dtype)


def top_k_mask(p: jax.Array, top_k: int) -> jax.Array:
    """1.0 at the k largest entries of the last axis, 0.0 elsewhere (p's dtype)."""
    indices = jax.lax.top_k(p, top_k)[1]
    return jax.nn.one_hot(indices, p.shape[-1], dtype=p.dtype).sum(axis=-2)


def router_probs(
    router_in: jax.Array, router: jax.Array, *, top_k: int | None = None, renormalize: bool = False
) -> jax.Array:
    """p = softmax(router_in32 @ router); top-k keeps the k largest (renormalised on request)."""
    cd = compute_dtype(router_in.dtype)
    p = jax.nn.softmax(jnp.matmul(router_in.astype(cd), router.astype(cd)), axis=-1)
    if top_k is not None:
        p = p * jax.lax.stop_gradient(top_k_mask(p, top_k))
        if renormalize:
            p = p / p.sum(axis=-1, keepdims=True)
    return p


def sentence_router_probs(
    router_input: jax.Array,
    router: jax.Array,
    tokens_shape: tuple[int, ...],
    *,
    top_k: int | None = None,
    renormalize: bool = False,
) -> jax.Array:
    """Sentence routing: p from one router vector per sequence, broadcast to tokens_shape + (E,).

    router_input is [B, R] for tokens [B, S, ...], or any shape broadcastable to tokens_shape + (R,).
    """
    p = router_probs(router_input, router, top_k=top_k, renormalize=renormalize)
    if p.ndim == 2 and len(tokens_shape) > 1:  # [B, E] for tokens [B, S, ...]
        p = p.reshape(p.shape[:1] + (1,) * (len(tokens_shape) - 1) + p.shape[1:])
    return jnp.broadcast_to(p, tuple(tokens_shape) + (p.shape[-1],))


def mov(
    h: jax.Array,
    router: jax.Array | None,
    experts: jax.Array,
    *,
    top_k: int | None = None,
    renormalize: bool = False,
    router_input: jax.Array | None = None,
) -> jax.Array:
    """y = h * einsum('tge,ged->tgd', softmax(h32 @ router), experts), per group of width D."""
    groups, num_experts, dim = experts.shape
    cd = compute_dtype(h.dtype)
    hg = h.reshape(h.shape[:-1] + (groups, dim)).astype(cd)  # [..., G, D]
    if router is None:  # (IA)3: E = 1, p == 1
        p = jnp.ones(hg.shape[:-1] + (1,), dtype=cd)
    elif router_input is None:
        p = router_probs(hg, router, top_k=top_k, renormalize=renormalize)  # [..., G, E]
    else:
        p = sentence_router_probs(router_input, router, tuple(h.shape[:-1]), top_k=top_k, renormalize=renormalize)
        p = jnp.broadcast_to(p[..., None, :], hg.shape[:-1] + (num_experts,))  # same p for every group
    scaling = jnp.einsum("...ge,ged->...gd", p.astype(cd), experts.astype(cd))
    return (hg * scaling).reshape(h.shape).astype(h.dtype)


def mov_linear(
    x: jax.Array,
    weight: jax.Array,
    router: jax.Array | None,
    experts: jax.Array,
    *,
    bias: jax.Array | None = None,
    top_k: int | None = None,
    renormalize: bool = False,
    router_input: jax.Array | None = None,
) -> jax.Array:
    """mov(x @ weight.T + bias): MoV on a linear's output (T5 attention k and v)."""
    h = linear(x, weight, bias)
    return mov(h, router, experts, top_k=top_k, renormalize=renormalize, router_input=router_input)


def mov_ffn(
    x: jax.Array,
    wi_0: jax.Array,
    wo: jax.Array,
    router: jax.Array | None,
    experts: jax.Array,
    *,
    wi_1: jax.Array | None = None,
    activation: str = "gelu_new",
    top_k: int | None = None,
    renormalize: bool = False,
    router_input: jax.Array | None = None,
) -> jax.Array:
    """T5 FFN with MoV on the activation: (mov(act(x wi_0ᵀ)) [* x wi_1ᵀ]) woᵀ."""
    a = ACTIVATIONS[activation](linear(x, wi_0))
    a = mov(a, router, experts, top_k=top_k, renormalize=renormalize, router_input=router_input)
    if wi_1 is not None:
        a = a * linear(x, wi_1)
    return linear(a, wo)


def molora_linear(
    x: jax.Array,
    weight: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    router: jax.Array | None,
    *,
    scale: float,
    bias: jax.Array | None = None,
    top_k: int | None = None,
    renormalize: bool = False,
    router_input: jax.Array | None = None,
) -> jax.Array:
    """y = x Wᵀ + b + scale * Σ_e p_e (x A_e) B_e, the per-expert outputs mixed (not A, B merged)."""
    cd = compute_dtype(x.dtype)
    base = linear(x, weight, bias)
    x32 = x.astype(cd)
    if router is None:  # LoRA: E = 1
        p = jnp.ones(x.shape[:-1] + (1,), dtype=cd)
    elif router_input is None:
        p = router_probs(x32, router, top_k=top_k, renormalize=renormalize)
    else:
        p = sentence_router_probs(router_input, router, tuple(x.shape[:-1]), top_k=top_k, renormalize=renormalize)
    per_expert = jnp.einsum("...k,ekr,ern->...en", x32, lora_a.astype(cd), lora_b.astype(cd))  # [..., E, N]
    delta = jnp.einsum("...e,...en->...n", p.astype(cd), per_expert)
    return (base.astype(cd) + scale * delta).astype(x.dtype)


# ------------------------------------------------------------------------------------------
# Adapter banks: a loop over the adapters through the single-adapter ops
# ------------------------------------------------------------------------------------------


def _bank_loop(ids: jax.Array, num_adapters: int, base: jax.Array, adapter_fn: Callable[[int], jax.Array]) -> jax.Array:
    """``base`` [..., N] with the rows of every token of adapter a replaced by adapter_fn(a) (same shape);
    NaN rows for ids outside [-1, A)."""
    out = base.reshape(ids.shape[0], base.shape[-1])
    for a in range(num_adapters):
        out = jnp.where((ids == a)[:, None], adapter_fn(a).reshape(out.shape), out)
    bad = (ids < -1) | (ids >= num_adapters)
    return jnp.where(bad[:, None], jnp.nan, out).reshape(base.shape)


def _pick(t: jax.Array | None, a: int) -> jax.Array | None:
    return None if t is None else t[a]


def banked_mov(h, router, experts, adapter_ids, *, top_k=None, renormalize=False, router_input=None) -> jax.Array:
    """mov with per-token adapters: adapter_ids [T], router [A, D, E] or None, experts [A, G, E, D]."""

    def adapter(a):
        return mov(h, _pick(router, a), experts[a], top_k=top_k, renormalize=renormalize, router_input=router_input)

    return _bank_loop(adapter_ids, experts.shape[0], h, adapter)


def banked_mov_linear(
    x, weight, router, experts, adapter_ids, *, bias=None, top_k=None, renormalize=False, router_input=None
) -> jax.Array:
    """mov_linear with per-token adapters (base tokens: x Wᵀ + b)."""
    h = linear(x, weight, bias)
    return banked_mov(h, router, experts, adapter_ids, top_k=top_k, renormalize=renormalize, router_input=router_input)


def banked_mov_ffn(
    x, wi_0, wo, router, experts, adapter_ids, *, wi_1=None, activation="gelu_new", top_k=None, renormalize=False,
    router_input=None,
) -> jax.Array:  # fmt: skip
    """mov_ffn with per-token adapters (base tokens: the FFN without MoV)."""
    a = ACTIVATIONS[activation](linear(x, wi_0))
    a = banked_mov(a, router, experts, adapter_ids, top_k=top_k, renormalize=renormalize, router_input=router_input)
    if wi_1 is not None:
        a = a * linear(x, wi_1)
    return linear(a, wo)


def banked_molora_linear(
    x, weight, lora_a, lora_b, router, adapter_ids, *, scale, bias=None, top_k=None, renormalize=False,
    router_input=None,
) -> jax.Array:  # fmt: skip
    """molora_linear with per-token adapters: lora_a [A, E, K, r], lora_b [A, E, r, N], router [A, K, E] or None
    (base tokens: x Wᵀ + b)."""

    def adapter(a):
        return molora_linear(
            x, weight, lora_a[a], lora_b[a], _pick(router, a), scale=scale, bias=bias, top_k=top_k,
            renormalize=renormalize, router_input=router_input,
        )  # fmt: skip

    return _bank_loop(adapter_ids, lora_a.shape[0], linear(x, weight, bias), adapter)
