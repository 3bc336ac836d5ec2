"""JAX functional API (SPEC §1), mirroring :mod:`pemoe.ops`: ``mov``, ``mov_linear``, ``mov_ffn``,
``molora_linear`` — same argument names, same weight layouts, same routing options.

Every op takes ``implementation=``:
  * ``"reference"`` — the ``jnp`` transcription in :mod:`pemoe.jax.reference` (plain autodiff);
  * ``"xla"`` — the SPEC §3 reformulations with ``jax.custom_vjp`` backwards (:mod:`pemoe.jax.xla`);
  * ``"pallas"`` — ``mov_linear`` only: the fused Pallas forward kernel (``pemoe.kernels.pallas``) with an
    explicit XLA backward (:mod:`pemoe.jax.pallas`); runs on TPU, or anywhere in the Pallas interpreter
    when ``PEMOE_PALLAS_INTERPRET=1``; top-k and sentence routing raise ``NotImplementedError``;
    ``molora_linear`` too: the one-kernel Pallas forward (top-k and sentence routing supported) and, on TPU,
    a Pallas dgrad backward kernel (adapter GEMMs over T in XLA); its forward also lowers for GPU (Pallas'
    Triton lowering, with the ``"xla"`` backward), so ``"pallas"`` runs it on "gpu" too;
    ``mov_ffn`` too: two Pallas kernels (dual GEMM with the router logits and softmax in its epilogue; wo
    GEMM with the expert merge as its prologue; top-k and sentence routing supported) with an explicit XLA
    backward from the saved h0, g and p_soft; its kernels also lower for GPU (Pallas' Triton lowering),
    so ``"pallas"`` runs ``mov_ffn`` on "gpu" too;
  * ``"triton"`` — ``mov_linear``, ``mov_ffn`` and ``molora_linear`` (both forward schedules, chosen by
    the torch launcher's model): the PyTorch side's Triton kernels (forward and backward) called through
    jax-triton (:mod:`pemoe.jax.triton`); runs on the "gpu" backend, lowers for a GPU without
    one inside ``pemoe.jax.triton.cuda_target(capability)`` (``jax.export(..., platforms=["cuda"])``) and runs in the
    Triton interpreter when ``TRITON_INTERPRET=1``; elsewhere ``NotImplementedError``;
  * ``"triton"`` for the other ops (and ``"pallas"`` where not listed) — not implemented yet: ``NotImplementedError``;
  * ``"auto"`` — the best available on the default JAX backend (``"xla"`` everywhere today); the
    choice is logged once per (op, backend) on the ``pemoe`` logger and returned by
    :func:`resolve_implementation`.
Arguments are validated at trace time, the same way for every implementation
(:mod:`pemoe.jax._checks`). All ops are traceable: call them under ``jax.jit``; ``top_k``,
``renormalize``, ``scale``, ``activation`` and ``implementation`` are static Python values.

Adapter banks, shared by all ops (the semantics of :mod:`pemoe.ops.banked`): with ``adapter_ids`` (an
integer array, [T] or the activations' leading shape; a traced array under ``jax.jit``) the adapter
parameters are stacked along a new leading axis A (MoV: experts [A, G, E, D], router [A, D, E]; MoLoRA:
lora_a [A, E, K, r], lora_b [A, E, r, N], router [A, K, E]; A is static, a shape) and token t runs the op
with adapter ``adapter_ids[t]``'s parameters and router; -1 means no adapter (the frozen base alone).
Routing options apply to every adapter alike. ``"reference"`` loops over the adapters
(:mod:`pemoe.jax.reference`), ``"xla"`` gathers each token's parameters for T <= A and otherwise runs the
bank as one op over the adapters' concatenated experts (:mod:`pemoe.jax.xla`); ``"auto"`` picks ``"xla"``;
``"pallas"`` and ``"triton"`` have no adapter-bank kernel and raise ``NotImplementedError``. Ids outside
[-1, A) raise ``ValueError`` when concrete; traced, they give NaN rows (see
:func:`pemoe.jax._checks.check_adapter_ids`).
"""

from __future__ import annotations

import logging
import math
import os

import jax

from pemoe.jax import _checks, reference, xla

__all__ = [
    "AVAILABLE",
    "BANKED",
    "PLANNED",
    "mov",
    "mov_linear",
    "mov_ffn",
    "molora_linear",
    "pallas_interpret",
    "resolve_implementation",
    "banked_implementation",
]

logger = logging.getLogger("pemoe")

#: Implementations that exist today, per op. "auto" resolves to one of them.
AVAILABLE: dict[str, tuple[str, ...]] = {
    "mov": ("reference", "xla"),
    "mov_linear": ("reference", "xla", "pallas", "triton"),
    "mov_ffn": ("reference", "xla", "pallas", "triton"),
    "molora_linear": ("reference", "xla", "pallas", "triton"),
}
#: Implementations that are planned (issue 5) but do not exist yet: they raise NotImplementedError.
PLANNED: tuple[str, ...] = ("pallas", "triton")
#: Implementations that run the ops with ``adapter_ids`` (adapter banks), every op alike.
BANKED: tuple[str, ...] = ("reference", "xla")
#: Ops whose "pallas" kernels also lower for GPU (Pallas' Triton lowering): "pallas" runs on the "gpu" backend.
PALLAS_GPU: frozenset[str] = frozenset({"mov_linear", "mov_ffn", "molora_linear"})

_announced: set[tuple[str, str, str]] = set()


def pallas_interpret() -> bool:
    """True when ``PEMOE_PALLAS_INTERPRET=1``: Pallas kernels run in the interpreter (any backend)."""
    return os.environ.get("PEMOE_PALLAS_INTERPRET", "0") == "1"


def resolve_implementation(op: str, implementation: str, backend: str | None = None) -> str:
    """Return the implementation that will run ``op`` on ``backend`` (default: ``jax.default_backend()``).

    ``"auto"`` picks ``"xla"`` on every backend today (the Pallas kernel is forward-only and unmeasured on
    a TPU) and logs the choice once per (op, backend) on the ``pemoe`` logger. ``"pallas"`` where it does
    not exist or cannot run, and ``"triton"`` where it does not exist or cannot run (it runs on "gpu", inside
    ``pemoe.jax.triton.cuda_target`` and in the Triton interpreter), raise ``NotImplementedError``; an unknown
    name raises ``ValueError``. Nothing falls back silently.
    """
    if op not in AVAILABLE:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(AVAILABLE)}")
    available = AVAILABLE[op]
    if implementation == "auto":
        backend = backend or jax.default_backend()
        chosen = "xla"
        key = (op, backend, chosen)
        if key not in _announced:
            _announced.add(key)
            logger.info("pemoe.jax.%s: implementation='auto' chose %r on %s", op, chosen, backend)
        return chosen
    if implementation in available:
        if implementation == "triton":
            from pemoe.jax import triton

            why = triton.runnable(backend or jax.default_backend())
            if why is not None:
                raise NotImplementedError(f"{op}: {why}")
        if implementation == "pallas":
            backend = backend or jax.default_backend()
            if backend != "tpu" and not (backend == "gpu" and op in PALLAS_GPU) and not pallas_interpret():
                raise NotImplementedError(
                    f"{op}: implementation='pallas' runs on TPU (Mosaic) and GPU (Pallas' Triton lowering), got "
                    f"backend {backend!r}; set "
                    "PEMOE_PALLAS_INTERPRET=1 to run the kernel in the Pallas interpreter"
                )
        return implementation
    if implementation in PLANNED:
        raise NotImplementedError(
            f"{op}: implementation={implementation!r} does not exist yet in pemoe.jax; available: "
            f"{('auto',) + available}"
        )
    raise ValueError(
        f"{op}: unknown implementation {implementation!r}; expected one of {('auto',) + available + PLANNED}"
    )


def banked_implementation(op: str, implementation: str, backend: str | None = None) -> str:
    """The implementation that runs ``op`` with ``adapter_ids``: ``"reference"`` or ``"xla"`` (``"auto"`` picks
    ``"xla"``, logged once per (op, backend)). ``"pallas"`` and ``"triton"`` have no adapter-bank kernel and raise
    ``NotImplementedError`` (never another implementation in their place); an unknown name raises ``ValueError``."""
    if implementation == "auto":
        backend = backend or jax.default_backend()
        key = (f"{op} with adapter_ids", backend, "xla")
        if key not in _announced:
            _announced.add(key)
            logger.info("pemoe.jax.%s with adapter_ids: implementation='auto' chose 'xla' on %s", op, backend)
        return "xla"
    if implementation in BANKED:
        return implementation
    if implementation in PLANNED:
        raise NotImplementedError(
            f"{op}: implementation={implementation!r} has no kernel for adapter banks (adapter_ids); "
            "use implementation='xla' (or 'auto')"
        )
    return resolve_implementation(op, implementation, backend)  # unknown: ValueError


def _flat(t: jax.Array) -> jax.Array:
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # (no -1: the batch may be empty)


def _sentence_probs(router_input, router, tokens_shape, top_k, renormalize):
    """Sentence-routing probabilities per token [T, E] (autodiff flows back to router_input and router)."""
    if router_input is None:
        return None
    p = reference.sentence_router_probs(router_input, router, tokens_shape, top_k=top_k, renormalize=renormalize)
    return _flat(p)


def mov(
    h: jax.Array,
    router: jax.Array | None,
    experts: jax.Array,
    *,
    top_k: int | None = None,
    renormalize: bool = False,
    router_input: jax.Array | None = None,
    adapter_ids: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Soft mixture of (IA)3 vectors on h [..., G·D]: h * einsum('tge,ged->tgd', softmax(h32 router), experts).

    router [D, E] float32 (None for (IA)3, E = 1); experts [G, E, D] float32. Returns h's shape and dtype.
    With ``adapter_ids``: router [A, D, E], experts [A, G, E, D] (see the module docstring).
    """
    if adapter_ids is not None:
        return _mov_banked(h, router, experts, adapter_ids, top_k, renormalize, router_input, implementation)
    _checks.check_mov(h, router, experts, top_k=top_k, renormalize=renormalize, router_input=router_input)
    impl = resolve_implementation("mov", implementation)
    if impl == "reference":
        return reference.mov(h, router, experts, top_k=top_k, renormalize=renormalize, router_input=router_input)
    probs = _sentence_probs(router_input, router, tuple(h.shape[:-1]), top_k, renormalize)
    y = xla.mov_site(_flat(h), None if probs is not None else router, experts, probs, top_k, renormalize)
    return y.reshape(h.shape)


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
    adapter_ids: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """mov(x Wᵀ + b): x [..., K], weight [N, K] (frozen, torch Linear layout), N = G·D. Returns [..., N].
    With ``adapter_ids``: router [A, D, E], experts [A, G, E, D] (see the module docstring)."""
    _checks.check_linear(x, weight, bias)
    if adapter_ids is not None:
        return _mov_linear_banked(
            x, weight, bias, router, experts, adapter_ids, top_k, renormalize, router_input, implementation
        )
    _checks.check_mov(
        x,
        router,
        experts,
        top_k=top_k,
        renormalize=renormalize,
        router_input=router_input,
        h_name="weight output",
        width=weight.shape[0],
    )
    impl = resolve_implementation("mov_linear", implementation)
    if impl == "reference":
        return reference.mov_linear(
            x, weight, router, experts, bias=bias, top_k=top_k, renormalize=renormalize, router_input=router_input
        )
    if impl == "triton":
        from pemoe.jax import triton

        probs = _sentence_probs(router_input, router, tuple(x.shape[:-1]), top_k, renormalize)
        y = triton.mov_linear(
            _flat(x),
            weight,
            bias,
            None if probs is not None else router,
            experts,
            probs,
            top_k=None if probs is not None else top_k,  # sentence routing: probs already hold the top-k
            renormalize=renormalize,
        )
        return y.reshape(x.shape[:-1] + (weight.shape[0],))
    if impl == "pallas":
        from pemoe.jax import pallas

        if router_input is not None:
            raise NotImplementedError("mov_linear: implementation='pallas' does not support sentence routing yet")
        y = pallas.mov_linear(_flat(x), weight, bias, router, experts, top_k=top_k, interpret=pallas_interpret())
        return y.reshape(x.shape[:-1] + (weight.shape[0],))
    probs = _sentence_probs(router_input, router, tuple(x.shape[:-1]), top_k, renormalize)
    h = xla.linear(_flat(x), weight, bias)  # frozen GEMM: plain autodiff (residuals are inputs)
    y = xla.mov_site(h, None if probs is not None else router, experts, probs, top_k, renormalize)
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


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
    adapter_ids: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """T5 FFN with MoV on the activation (SPEC §2).

    wi_1 given (v1.1 gated-GELU): (mov(act(x wi_0ᵀ)) * (x wi_1ᵀ)) woᵀ; else (v1.0): mov(act(x wi_0ᵀ)) woᵀ.
    x [..., M], wi_0/wi_1 [F, M], wo [M, F], router [F, E], experts [1, E, F]. With ``adapter_ids``: router
    [A, F, E], experts [A, 1, E, F] (see the module docstring).
    """
    _checks.check_ffn_weights(x, wi_0, wi_1, wo, activation=activation, activations=reference.ACTIVATIONS)
    if adapter_ids is not None:
        return _mov_ffn_banked(
            x, wi_0, wi_1, wo, router, experts, adapter_ids, activation, top_k, renormalize, router_input,
            implementation,
        )  # fmt: skip
    _checks.check_mov(
        x,
        router,
        experts,
        top_k=top_k,
        renormalize=renormalize,
        router_input=router_input,
        h_name="wi_0 output",
        width=wi_0.shape[0],
    )
    impl = resolve_implementation("mov_ffn", implementation)
    if impl == "reference":
        return reference.mov_ffn(
            x,
            wi_0,
            wo,
            router,
            experts,
            wi_1=wi_1,
            activation=activation,
            top_k=top_k,
            renormalize=renormalize,
            router_input=router_input,
        )
    x2d = _flat(x)
    probs = _sentence_probs(router_input, router, tuple(x.shape[:-1]), top_k, renormalize)
    if impl == "triton":
        from pemoe.jax import triton

        y = triton.mov_ffn(
            x2d, wi_0, wi_1, wo, None if probs is not None else router, experts, probs, activation=activation,
            top_k=None if probs is not None else top_k, renormalize=renormalize,
        )  # fmt: skip
        return y.reshape(x.shape)
    if impl == "pallas":
        from pemoe.jax import pallas

        y = pallas.mov_ffn(
            x2d, wi_0, wo, None if probs is not None else router, experts, wi_1=wi_1, activation=activation,
            probs=probs, top_k=top_k, renormalize=renormalize, interpret=pallas_interpret(),
        )  # fmt: skip
        return y.reshape(x.shape)
    a = reference.ACTIVATIONS[activation](xla.linear(x2d, wi_0))
    a = xla.mov_site(a, None if probs is not None else router, experts, probs, top_k, renormalize)
    if wi_1 is not None:
        a = a * xla.linear(x2d, wi_1)
    return xla.linear(a, wo).reshape(x.shape)


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
    adapter_ids: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """x Wᵀ + b + scale·Σ_e p_e (x A_e) B_e. x [..., K], weight [N, K] (frozen), lora_a [E, K, r],
    lora_b [E, r, N], router [K, E] (None for LoRA, E = 1), scale = alpha / r. Returns [..., N].
    With ``adapter_ids``: lora_a [A, E, K, r], lora_b [A, E, r, N], router [A, K, E] (see the module docstring)."""
    if adapter_ids is not None:
        return _molora_banked(
            x, weight, bias, lora_a, lora_b, router, adapter_ids, scale, top_k, renormalize, router_input,
            implementation,
        )  # fmt: skip
    _checks.check_molora(
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        router,
        scale=scale,
        top_k=top_k,
        renormalize=renormalize,
        router_input=router_input,
    )
    impl = resolve_implementation("molora_linear", implementation)
    if impl == "reference":
        return reference.molora_linear(
            x,
            weight,
            lora_a,
            lora_b,
            router,
            scale=scale,
            bias=bias,
            top_k=top_k,
            renormalize=renormalize,
            router_input=router_input,
        )
    probs = _sentence_probs(router_input, router, tuple(x.shape[:-1]), top_k, renormalize)
    if impl == "triton":
        from pemoe.jax import triton

        y = triton.molora_linear(
            _flat(x), weight, bias, lora_a, lora_b, None if probs is not None else router, probs, scale=scale,
            top_k=None if probs is not None else top_k,  # sentence routing: probs already hold the top-k
            renormalize=renormalize,
        )  # fmt: skip
        return y.reshape(x.shape[:-1] + (weight.shape[0],))
    if impl == "pallas":
        from pemoe.jax import pallas

        y = pallas.molora_linear(
            _flat(x),
            weight,
            lora_a,
            lora_b,
            None if probs is not None else router,
            scale=scale,
            bias=bias,
            probs=probs,
            top_k=None if probs is not None else top_k,  # sentence routing: probs already hold the top-k
            renormalize=renormalize,
            interpret=pallas_interpret(),
        )
        return y.reshape(x.shape[:-1] + (weight.shape[0],))
    y = xla.molora(
        _flat(x),
        weight,
        lora_a,
        lora_b,
        None if probs is not None else router,
        scale=scale,
        bias=bias,
        probs=probs,
        top_k=top_k,
        renormalize=renormalize,
    )
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


# ------------------------------------------------------------------------------------------
# adapter banks (``adapter_ids``): validation and dispatch; the math is in xla.banked_* / reference.banked_*
# ------------------------------------------------------------------------------------------


def _mov_bank_size(router, experts, router_layout: str) -> int:
    return _checks.check_bank_size(
        experts=_checks.unstack("experts", experts, 4, "[A, G, E, D]"),
        router=_checks.unstack("router", router, 3, router_layout),
    )


def _banked_sentence_probs(router_input, router, tokens_shape, ids, top_k, renormalize):
    """Sentence routing in a bank: each token's routing weights from its own adapter's router [A, R, E] on its
    sequence's vector, in the layout of the "xla" form (see xla.banked_router_probs); None without it."""
    if router_input is None:
        return None
    num_adapters, width, num_experts = router.shape
    cd = reference.compute_dtype(router_input.dtype)
    router_cat = router.transpose(1, 0, 2).reshape(width, num_adapters * num_experts).astype(cd)
    logits = jax.numpy.matmul(router_input.astype(cd), router_cat)  # every adapter's logits, once per sequence
    if logits.ndim == 2 and len(tokens_shape) > 1:  # [B, A·E] for tokens [B, S, ...]
        logits = logits.reshape(logits.shape[:1] + (1,) * (len(tokens_shape) - 1) + logits.shape[1:])
    logits = jax.numpy.broadcast_to(logits, tuple(tokens_shape) + logits.shape[-1:])
    return xla.banked_router_probs(logits.reshape(-1, num_adapters, num_experts), ids, top_k, renormalize)


def _mov_banked(h, router, experts, adapter_ids, top_k, renormalize, router_input, implementation):
    a = _mov_bank_size(router, experts, "[A, D, E]" if router_input is None else "[A, R, E]")
    _checks.check_mov(
        h, _checks.one_adapter(router), _checks.one_adapter(experts), top_k=top_k, renormalize=renormalize,
        router_input=router_input,
    )  # fmt: skip
    tokens = tuple(h.shape[:-1])
    ids = _checks.check_adapter_ids(adapter_ids, tokens, a)
    impl = banked_implementation("mov", implementation)
    if impl == "reference":
        return reference.banked_mov(
            h, router, experts, ids, top_k=top_k, renormalize=renormalize, router_input=router_input
        )
    probs = _banked_sentence_probs(router_input, router, tokens, ids, top_k, renormalize)
    y = xla.banked_mov_site(_flat(h), ids, None if probs is not None else router, experts, probs, top_k, renormalize)
    return y.reshape(h.shape)


def _mov_linear_banked(x, weight, bias, router, experts, adapter_ids, top_k, renormalize, router_input, impl):
    a = _mov_bank_size(router, experts, "[A, D, E]" if router_input is None else "[A, R, E]")
    _checks.check_mov(
        x, _checks.one_adapter(router), _checks.one_adapter(experts), top_k=top_k, renormalize=renormalize,
        router_input=router_input, h_name="weight output", width=weight.shape[0],
    )  # fmt: skip
    tokens = tuple(x.shape[:-1])
    ids = _checks.check_adapter_ids(adapter_ids, tokens, a)
    impl = banked_implementation("mov_linear", impl)
    if impl == "reference":
        return reference.banked_mov_linear(
            x, weight, router, experts, ids, bias=bias, top_k=top_k, renormalize=renormalize,
            router_input=router_input,
        )  # fmt: skip
    probs = _banked_sentence_probs(router_input, router, tokens, ids, top_k, renormalize)
    h = xla.linear(_flat(x), weight, bias)  # the frozen GEMM once over all tokens
    y = xla.banked_mov_site(h, ids, None if probs is not None else router, experts, probs, top_k, renormalize)
    return y.reshape(tokens + (weight.shape[0],))


def _mov_ffn_banked(
    x, wi_0, wi_1, wo, router, experts, adapter_ids, activation, top_k, renormalize, router_input, impl
):
    a = _mov_bank_size(router, experts, "[A, F, E]" if router_input is None else "[A, R, E]")
    _checks.check_mov(
        x, _checks.one_adapter(router), _checks.one_adapter(experts), top_k=top_k, renormalize=renormalize,
        router_input=router_input, h_name="wi_0 output", width=wi_0.shape[0],
    )  # fmt: skip
    tokens = tuple(x.shape[:-1])
    ids = _checks.check_adapter_ids(adapter_ids, tokens, a)
    impl = banked_implementation("mov_ffn", impl)
    if impl == "reference":
        return reference.banked_mov_ffn(
            x, wi_0, wo, router, experts, ids, wi_1=wi_1, activation=activation, top_k=top_k,
            renormalize=renormalize, router_input=router_input,
        )  # fmt: skip
    x2d = _flat(x)
    probs = _banked_sentence_probs(router_input, router, tokens, ids, top_k, renormalize)
    h = reference.ACTIVATIONS[activation](xla.linear(x2d, wi_0))
    h = xla.banked_mov_site(h, ids, None if probs is not None else router, experts, probs, top_k, renormalize)
    if wi_1 is not None:
        h = h * xla.linear(x2d, wi_1)
    return xla.linear(h, wo).reshape(x.shape)


def _molora_banked(x, weight, bias, lora_a, lora_b, router, adapter_ids, scale, top_k, renormalize, router_input, impl):
    a = _checks.check_bank_size(
        lora_a=_checks.unstack("lora_a", lora_a, 4, "[A, E, K, r]"),
        lora_b=_checks.unstack("lora_b", lora_b, 4, "[A, E, r, N]"),
        router=_checks.unstack("router", router, 3, "[A, K, E]"),
    )
    _checks.check_molora(
        x, weight, bias, _checks.one_adapter(lora_a), _checks.one_adapter(lora_b), _checks.one_adapter(router),
        scale=scale, top_k=top_k, renormalize=renormalize, router_input=router_input,
    )  # fmt: skip
    tokens = tuple(x.shape[:-1])
    ids = _checks.check_adapter_ids(adapter_ids, tokens, a)
    impl = banked_implementation("molora_linear", impl)
    if impl == "reference":
        return reference.banked_molora_linear(
            x, weight, lora_a, lora_b, router, ids, scale=scale, bias=bias, top_k=top_k, renormalize=renormalize,
            router_input=router_input,
        )  # fmt: skip
    probs = _banked_sentence_probs(router_input, router, tokens, ids, top_k, renormalize)
    y = xla.banked_molora(
        _flat(x), ids, weight, lora_a, lora_b, None if probs is not None else router, scale=scale, bias=bias,
        probs=probs, top_k=top_k, renormalize=renormalize,
    )  # fmt: skip
    return y.reshape(tokens + (weight.shape[0],))
