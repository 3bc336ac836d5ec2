"""Functional API (SPEC §1): ``mov``, ``mov_linear``, ``mov_ffn``, ``molora_linear``, and ``molora_adapter`` (MoLoRA
on top of a frozen layer that runs its own forward, SPEC §2).

Every op takes ``implementation=``:
  * ``"reference"`` — the einsum transcription in :mod:`pemoe.reference` (plain autograd);
  * ``"torch"`` — reformulated eager ops with a memory-saving ``torch.autograd.Function``
    (the CPU default; runs on any device);
  * ``"triton"`` — fused Triton kernels (``pemoe.kernels.triton``; ``mov_linear``, ``mov_ffn``,
    ``molora_linear``) on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``; they enter
    autograd as ``torch.library`` custom ops (``torch.ops.pemoe.triton_<op>``), so
    ``torch.compile(fullgraph=True)`` traces a model using them without a graph break, as it traces
    ``"torch"`` (plain aten ops);
  * ``"auto"`` — the best available for the inputs' device; the choice is logged on the
    ``pemoe`` logger and returned by :func:`resolve_implementation`.
Arguments are validated the same way for every implementation (see :mod:`pemoe._checks`; a call whose argument
signature, :func:`pemoe._checks.signature`, passed the checks before skips them, since they read nothing
else), and every implementation treats them alike:
  * adapter parameters (experts, routers, lora_a, lora_b) may be of any floating dtype; the router,
    softmax and expert math runs in float32 (float64 for float64 parameters, except in ``"triton"``,
    which computes in float32) and their gradients come back in their own dtype;
  * the frozen base weights (``weight``, ``wi_0``, ``wi_1``, ``wo``) get no gradient (SPEC §3): one that
    requires grad while autograd records is refused with a ``ValueError`` (freeze it or call under
    ``torch.no_grad()``); ``x``, ``bias`` and ``router_input`` are differentiable;
  * under ``torch.autocast`` the fused linear ops (``mov_linear``, ``mov_ffn``, ``molora_linear``) cast x
    and the frozen weights to the autocast dtype, as ``nn.Linear`` does, and return that dtype;
  * values are not inspected: a NaN or inf in the inputs or parameters propagates to the outputs of the
    tokens it touches (checking would cost a device-to-host read per call).

Adapter banks, shared by all ops: with ``adapter_ids`` (an integer tensor, [T] or the activations' leading
shape) the adapter parameters are stacked along a new leading axis A (MoV: experts [A, G, E, D], router
[A, D, E]; MoLoRA: lora_a [A, E, K, r], lora_b [A, E, r, N], router [A, K, E]) and token t runs the op with
adapter ``adapter_ids[t]``'s parameters; -1 means no adapter (the frozen base alone). Without it the
parameters have their single-adapter shapes. ``"reference"`` loops over the adapters, ``"torch"`` groups the
tokens by adapter (see :mod:`pemoe.ops.banked`); ``"auto"`` picks ``"torch"``; ``"triton"`` runs forward-only
adapter-bank kernels (:mod:`pemoe.kernels.triton.mov_banked` for the MoV ops, segment-grouped
:mod:`pemoe.kernels.triton.molora_banked` for ``molora_linear`` and ``molora_adapter``) and refuses, with
``NotImplementedError``, inputs that require grad while autograd records (use ``"torch"`` to train).
``adapter_ids`` may also be an :class:`AdapterGroups` (the ids with their per-adapter token counts and sorting
permutation, validated once when built): a model calling many ops on one batch builds it once and every op
reuses it, where a plain tensor's counts are read on the host and its ids sorted at every call.

Routing options shared by all ops: ``top_k`` (keep the k most probable experts; no
renormalisation unless ``renormalize=True``) and ``router_input`` (sentence routing: the
router reads one vector per sequence, [B, R] for inputs [B, S, ·], instead of the token's
own activation; ``router`` is then [R, E]).
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F

from pemoe import _checks, reference
from pemoe.ops import banked
from pemoe.ops._dispatch import AVAILABLE, logger, resolve_implementation, triton_runs_on
from pemoe.ops.banked import AdapterGroups
from pemoe.ops.molora import MoLoRAFunction
from pemoe.ops.mov import MoVActFunction, MoVFunction

__all__ = [
    "AVAILABLE",
    "AdapterGroups",
    "mov",
    "mov_linear",
    "mov_ffn",
    "molora_linear",
    "molora_adapter",
    "resolve_implementation",
]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


#: Device types torch.autocast knows (others, e.g. "meta", are never autocast).
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _autocast_aware(*frozen: str):
    """Under ``torch.autocast`` for the activations' device type, the op runs as torch's own linear layers do:
    the activations and the frozen weights (``frozen``) are cast to the autocast dtype (float64 is left as
    autocast leaves it), adapter parameters keep their dtype, and the implementation runs with autocast off,
    so every implementation sees the same dtypes and returns the autocast dtype."""

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def op(*args, **kwargs):
            x = args[0] if args else kwargs.get("x")  # every such op takes the activations x first
            device_type = x.device.type if isinstance(x, torch.Tensor) else None
            if device_type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
                return fn(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            dtype = torch.get_autocast_dtype(device_type)
            for name in ("x", *frozen):
                t = bound.arguments.get(name)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (dtype, torch.float64):
                    bound.arguments[name] = t.to(dtype)
            with torch.autocast(device_type, enabled=False):
                return fn(*bound.args, **bound.kwargs)

        return op

    return wrap


def _float32(*adapter_params: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Adapter parameters as the Triton kernels take them: float32 (a differentiable cast where they are not;
    their gradients come back in their own dtype)."""
    return [None if t is None else t.float() for t in adapter_params]


def _sentence_probs(router_input, router, tokens_shape, top_k, renormalize):
    """Sentence-routing probabilities per token [T, E] (autograd flows back to router_input)."""
    if router_input is None:
        return None
    p = reference.sentence_router_probs(router_input, router, tokens_shape, top_k=top_k, renormalize=renormalize)
    return p.reshape(-1, p.shape[-1])


def _first(t: torch.Tensor | None) -> torch.Tensor | None:
    """Adapter 0 of a stacked parameter: the per-adapter shape the single-adapter checks validate."""
    return None if t is None else t[0]


_announced_banked: set[tuple[str, str]] = set()
#: Ops with Triton kernels for adapter banks (forward only: :mod:`pemoe.kernels.triton.mov_banked`,
#: :mod:`pemoe.kernels.triton.molora_banked`).
_BANKED_TRITON = ("mov", "mov_linear", "mov_ffn", "molora_linear", "molora_adapter")


def _banked_implementation(op: str, implementation: str, device: torch.device) -> str:
    """The implementation of ``op`` with ``adapter_ids``: ``"reference"``, ``"torch"`` (``"auto"`` picks
    ``"torch"`` on every device, logged once per op and device type) or ``"triton"`` for the ops of
    :data:`_BANKED_TRITON` where the kernels run; elsewhere ``"triton"`` raises ``NotImplementedError`` rather
    than running another implementation."""
    if implementation == "triton" and op in _BANKED_TRITON:
        why = triton_runs_on(device)
        if why is not None:
            raise NotImplementedError(f"{op}: implementation='triton' cannot run here: {why}")
        return "triton"
    if implementation == "triton":
        raise NotImplementedError(
            f"{op}: implementation='triton' has no kernel for adapter banks (adapter_ids) yet; "
            "use implementation='torch' (grouped by adapter) or 'auto'"
        )
    if implementation == "auto":
        if (op, device.type) not in _announced_banked:
            _announced_banked.add((op, device.type))
            logger.info("pemoe.ops.%s with adapter_ids: implementation='auto' chose 'torch' on %s", op, device.type)
        return "torch"
    return resolve_implementation(op, implementation, device)


def _mov_bank_size(router: torch.Tensor | None, experts: torch.Tensor, router_layout: str) -> int:
    return _checks.check_bank_size(
        experts=_checks.unstack("experts", experts, 4, "[A, G, E, D]"),
        router=_checks.unstack("router", router, 3, router_layout),
    )


def _molora_bank_size(lora_a: torch.Tensor, lora_b: torch.Tensor, router: torch.Tensor | None) -> int:
    return _checks.check_bank_size(
        lora_a=_checks.unstack("lora_a", lora_a, 4, "[A, E, K, r]"),
        lora_b=_checks.unstack("lora_b", lora_b, 4, "[A, E, r, N]"),
        router=_checks.unstack("router", router, 3, "[A, K, E]"),
    )


def mov(
    h: torch.Tensor,
    router: torch.Tensor | None,
    experts: torch.Tensor,
    *,
    top_k: int | None = None,
    renormalize: bool = False,
    router_input: torch.Tensor | None = None,
    adapter_ids: torch.Tensor | AdapterGroups | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """Soft mixture of (IA)3 vectors on h [..., G·D]: h * einsum('tge,ged->tgd', softmax(h32 router), experts).

    router [D, E] float32 (None for (IA)3, E = 1); experts [G, E, D] float32. Returns h's shape and dtype.
    """
    if adapter_ids is not None:
        return _mov_banked(h, router, experts, adapter_ids, top_k, renormalize, router_input, implementation)
    key = _checks.signature("mov", h, router, experts, top_k, renormalize, router_input)
    if not _checks.passed(key):
        _checks.check_mov(h, router, experts, top_k=top_k, renormalize=renormalize, router_input=router_input)
        _checks.check_same_device(h=h, router=router, experts=experts, router_input=router_input)
        _checks.remember(key)
    impl = resolve_implementation("mov", implementation, h.device)
    if impl == "reference":
        return reference.mov(h, router, experts, top_k=top_k, renormalize=renormalize, router_input=router_input)
    probs = _sentence_probs(router_input, router, tuple(h.shape[:-1]), top_k, renormalize)
    y = MoVFunction.apply(_flat(h), None, None, router, experts, probs, top_k, renormalize)
    return y.reshape(h.shape)


@_autocast_aware("weight", "bias")
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
    adapter_ids: torch.Tensor | AdapterGroups | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """mov(x Wᵀ + b): x [..., K], weight [N, K] (frozen), N = G·D. Returns [..., N] in x's dtype."""
    if adapter_ids is not None:
        return _mov_linear_banked(
            x, weight, bias, router, experts, adapter_ids, top_k, renormalize, router_input, implementation
        )
    key = _checks.signature("mov_linear", x, weight, bias, router, experts, top_k, renormalize, router_input)
    if not _checks.passed(key):
        _checks.check_linear(x, weight, bias)
        _checks.check_mov(
            x, router, experts, top_k=top_k, renormalize=renormalize, router_input=router_input,
            h_name="weight output", width=weight.shape[0],
        )  # fmt: skip
        _checks.check_same_device(
            x=x, weight=weight, bias=bias, router=router, experts=experts, router_input=router_input
        )
        _checks.check_frozen(weight=weight)
        _checks.remember(key)
    impl = resolve_implementation("mov_linear", implementation, x.device)
    if impl == "reference":
        return reference.mov_linear(
            x, weight, router, experts, bias=bias, top_k=top_k, renormalize=renormalize, router_input=router_input
        )
    probs = _sentence_probs(router_input, router, tuple(x.shape[:-1]), top_k, renormalize)
    if impl == "triton":
        from pemoe.kernels.triton import mov_linear as kernel

        router, experts, probs = _float32(router, experts, probs)
        y = kernel.mov_linear(_flat(x), weight, bias, router, experts, probs, top_k, renormalize)
    else:
        y = MoVFunction.apply(_flat(x), weight, bias, router, experts, probs, top_k, renormalize)
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


@_autocast_aware("wi_0", "wi_1", "wo")
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
    adapter_ids: torch.Tensor | AdapterGroups | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """T5 FFN with MoV on the activation (SPEC §2).

    wi_1 given (v1.1 gated-GELU): (mov(act(x wi_0ᵀ)) * (x wi_1ᵀ)) woᵀ; else (v1.0): mov(act(x wi_0ᵀ)) woᵀ.
    x [..., M], wi_0/wi_1 [F, M], wo [M, F], router [F, E], experts [1, E, F].
    """
    key = _checks.signature(
        "mov_ffn", x, wi_0, wi_1, wo, router, experts, activation, top_k, renormalize, router_input,
        _ids_like(adapter_ids),
    )  # fmt: skip
    if not _checks.passed(key):
        _checks.check_ffn_weights(x, wi_0, wi_1, wo, activation=activation, activations=reference.ACTIVATIONS)
    if adapter_ids is not None:
        return _mov_ffn_banked(
            x, wi_0, wi_1, wo, router, experts, adapter_ids, activation, top_k, renormalize, router_input,
            implementation, key,
        )  # fmt: skip
    if not _checks.passed(key):
        _checks.check_mov(
            x, router, experts, top_k=top_k, renormalize=renormalize, router_input=router_input,
            h_name="wi_0 output", width=wi_0.shape[0],
        )  # fmt: skip
        _checks.check_same_device(
            x=x, wi_0=wi_0, wi_1=wi_1, wo=wo, router=router, experts=experts, router_input=router_input
        )
        _checks.check_frozen(wi_0=wi_0, wi_1=wi_1, wo=wo)
        _checks.remember(key)
    impl = resolve_implementation("mov_ffn", implementation, x.device)
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
        from pemoe.kernels.triton import mov_ffn as kernel

        router, experts, probs = _float32(router, experts, probs)
        y = kernel.mov_ffn(x2d, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize)
        return y.reshape(x.shape)
    # the activation runs inside the Function, which keeps x·wi_0ᵀ instead of act(x·wi_0ᵀ) for the backward
    a = MoVActFunction.apply(F.linear(x2d, wi_0), router, experts, probs, top_k, renormalize, activation)
    if wi_1 is not None:
        a = a * F.linear(x2d, wi_1)
    return F.linear(a, wo).reshape(x.shape)


@_autocast_aware("weight", "bias")
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
    adapter_ids: torch.Tensor | AdapterGroups | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """x Wᵀ + b + scale·Σ_e p_e (x A_e) B_e. x [..., K], weight [N, K] (frozen), lora_a [E, K, r],
    lora_b [E, r, N], router [K, E] (None for LoRA, E = 1), scale = alpha / r. Returns [..., N].

    With ``"torch"``, float32 x of :data:`pemoe.ops.molora.FUSED_COLUMNS_MIN_TOKENS` tokens or more gets an
    output whose rows are strided (the first N columns of one GEMM's [T, N + E·r + E (padded)] output, which
    also holds the shrink and the router logits): views that keep the last dimension work, in-place ops
    work; call ``.contiguous()`` where a contiguous tensor is needed."""
    if adapter_ids is not None:
        return _molora_banked(
            "molora_linear", x, weight, bias, None, lora_a, lora_b, router, adapter_ids, scale, top_k, renormalize,
            router_input, implementation,
        )  # fmt: skip
    key = _checks.signature(
        "molora_linear", x, weight, bias, lora_a, lora_b, router, scale, top_k, renormalize, router_input
    )
    if not _checks.passed(key):
        _checks.check_molora(
            x, weight, bias, lora_a, lora_b, router, scale=scale, top_k=top_k, renormalize=renormalize,
            router_input=router_input,
        )  # fmt: skip
        _checks.check_same_device(
            x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, router=router, router_input=router_input
        )
        _checks.check_frozen(weight=weight)
        _checks.remember(key)
    impl = resolve_implementation("molora_linear", implementation, x.device)
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
        from pemoe.kernels.triton import molora_linear as kernel

        lora_a, lora_b, router, probs = _float32(lora_a, lora_b, router, probs)
        y = kernel.molora_linear(
            _flat(x), weight, bias, lora_a, lora_b, router, probs, float(scale), top_k, renormalize
        )
    else:
        y = MoLoRAFunction.apply(
            _flat(x), weight, bias, None, lora_a, lora_b, router, probs, float(scale), top_k, renormalize
        )
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


@_autocast_aware("base")
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
    adapter_ids: torch.Tensor | AdapterGroups | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """MoLoRA without its frozen linear: base + scale·Σ_e p_e (x A_e) B_e, for a frozen layer that runs its own
    forward (a quantized linear: bitsandbytes, torchao). x [..., K], lora_a [E, K, r], lora_b [E, r, N],
    router [K, E] (None for LoRA, E = 1), ``base`` [..., N] in x's dtype: the frozen layer's output (None: the
    delta alone). Router, shrink, per-expert scaling and expand in one pass, never a [T, E, N] tensor; the
    expand accumulates into (a copy of) ``base``. Returns [..., N] in x's dtype; ``base`` gets the gradient dy.
    """
    if adapter_ids is not None:
        return _molora_banked(
            "molora_adapter", x, None, None, base, lora_a, lora_b, router, adapter_ids, scale, top_k, renormalize,
            router_input, implementation,
        )  # fmt: skip
    key = _checks.signature("molora_adapter", x, base, lora_a, lora_b, router, scale, top_k, renormalize, router_input)
    if not _checks.passed(key):
        _checks.check_molora_adapter(
            x, base, lora_a, lora_b, router, scale=scale, top_k=top_k, renormalize=renormalize,
            router_input=router_input,
        )  # fmt: skip
        _checks.check_same_device(
            x=x, base=base, lora_a=lora_a, lora_b=lora_b, router=router, router_input=router_input
        )
        _checks.remember(key)
    impl = resolve_implementation("molora_adapter", implementation, x.device)
    if impl == "reference":
        return reference.molora_adapter(
            x,
            lora_a,
            lora_b,
            router,
            scale=scale,
            base=base,
            top_k=top_k,
            renormalize=renormalize,
            router_input=router_input,
        )
    n = lora_b.shape[2]
    probs = _sentence_probs(router_input, router, tuple(x.shape[:-1]), top_k, renormalize)
    base2d = None if base is None else base.reshape(-1, n)
    if impl == "triton":
        from pemoe.kernels.triton import molora_linear as kernel

        lora_a, lora_b, router, probs = _float32(lora_a, lora_b, router, probs)
        y = kernel.molora_adapter(_flat(x), base2d, lora_a, lora_b, router, probs, float(scale), top_k, renormalize)
    else:
        y = MoLoRAFunction.apply(
            _flat(x), None, None, base2d, lora_a, lora_b, router, probs, float(scale), top_k, renormalize
        )
    return y.reshape(x.shape[:-1] + (n,))


# ------------------------------------------------------------------------------------------
# adapter banks (``adapter_ids``): validation and dispatch; the math is in pemoe.ops.banked
# ------------------------------------------------------------------------------------------


def _bank_ids(
    adapter_ids: object, tokens: tuple[int, ...], num_adapters: int
) -> tuple[torch.Tensor, banked.AdapterGroups | None]:
    """(ids [T] int64, the :class:`banked.AdapterGroups` when given one): a plain tensor is checked here (its
    range read on the host); groups were validated when built, only their token count and bank size here."""
    if not isinstance(adapter_ids, banked.AdapterGroups):
        return _checks.check_adapter_ids(adapter_ids, tokens, num_adapters), None
    count = math.prod(tokens)
    if adapter_ids.ids.numel() != count:
        raise ValueError(
            f"adapter_ids must have shape [T] = [{count}] or the activations' leading shape {list(tokens)} (one "
            f"adapter index per token), got AdapterGroups for tokens of shape {list(adapter_ids.tokens_shape)}"
        )
    if adapter_ids.num_adapters != num_adapters:
        raise ValueError(
            f"adapter_ids: AdapterGroups built for a bank of {adapter_ids.num_adapters} adapter(s), but the "
            f"stacked parameters hold {num_adapters}"
        )
    return adapter_ids.ids, adapter_ids


def _ids_like(adapter_ids: object) -> object:
    """What a call's :func:`pemoe._checks.signature` records of ``adapter_ids``: the ids tensor of an
    :class:`AdapterGroups` (its type, shape and device), else the argument itself."""
    return adapter_ids.ids if isinstance(adapter_ids, banked.AdapterGroups) else adapter_ids


def _groups(ids: torch.Tensor, given: banked.AdapterGroups | None, num_adapters: int) -> banked.AdapterGroups:
    """The segments of ``ids`` for the ``"torch"`` implementation: the given groups, else counted now."""
    return given if given is not None else banked.AdapterGroups.of(ids, num_adapters)


def _mov_banked(h, router, experts, adapter_ids, top_k, renormalize, router_input, implementation):
    key = _checks.signature("mov", h, router, experts, top_k, renormalize, router_input, _ids_like(adapter_ids))
    known = _checks.passed(key)
    if not known:
        _mov_bank_size(router, experts, "[A, D, E]" if router_input is None else "[A, R, E]")
        _checks.check_mov(
            h, _first(router), experts[0], top_k=top_k, renormalize=renormalize, router_input=router_input
        )
    a = experts.shape[0]
    tokens = tuple(h.shape[:-1])
    ids, groups = _bank_ids(adapter_ids, tokens, a)
    if not known:
        _checks.check_same_device(h=h, router=router, experts=experts, router_input=router_input, adapter_ids=ids)
        _checks.remember(key)
    impl = _banked_implementation("mov", implementation, h.device)
    ri = banked.token_router_input(router_input, tokens)
    if impl == "triton":
        kernel, probs = _banked_triton("mov", h, ids, router, experts, ri, router_input, top_k, renormalize)
        router, experts, probs = _float32(router, experts, probs)
        return kernel.mov(_flat(h), ids, router, experts, probs, top_k, renormalize).reshape(h.shape)
    if impl == "reference":
        return banked.reference_mov(_flat(h), ids, router, experts, ri, top_k, renormalize).reshape(h.shape)
    y = banked.grouped_mov(_flat(h), _groups(ids, groups, a), router, experts, ri, top_k, renormalize)
    return y.reshape(h.shape)


def _mov_linear_banked(x, weight, bias, router, experts, adapter_ids, top_k, renormalize, router_input, impl):
    key = _checks.signature(
        "mov_linear", x, weight, bias, router, experts, top_k, renormalize, router_input, _ids_like(adapter_ids)
    )
    known = _checks.passed(key)
    if not known:
        _checks.check_linear(x, weight, bias)
        _mov_bank_size(router, experts, "[A, D, E]" if router_input is None else "[A, R, E]")
        _checks.check_mov(
            x, _first(router), experts[0], top_k=top_k, renormalize=renormalize, router_input=router_input,
            h_name="weight output", width=weight.shape[0],
        )  # fmt: skip
    a = experts.shape[0]
    tokens = tuple(x.shape[:-1])
    ids, groups = _bank_ids(adapter_ids, tokens, a)
    if not known:
        _checks.check_same_device(
            x=x, weight=weight, bias=bias, router=router, experts=experts, router_input=router_input, adapter_ids=ids
        )
        _checks.check_frozen(weight=weight)
        _checks.remember(key)
    impl = _banked_implementation("mov_linear", impl, x.device)
    ri = banked.token_router_input(router_input, tokens)
    if impl == "triton":
        kernel, probs = _banked_triton(
            "mov_linear", x, ids, router, experts, ri, router_input, top_k, renormalize, bias=bias
        )
        router, experts, probs = _float32(router, experts, probs)
        y = kernel.mov_linear_banked(_flat(x), weight, bias, ids, router, experts, probs, top_k, renormalize)
        return y.reshape(tokens + (weight.shape[0],))
    if impl == "reference":
        y = banked.reference_mov_linear(_flat(x), weight, bias, ids, router, experts, ri, top_k, renormalize)
    else:
        y = banked.grouped_mov_linear(
            _flat(x), weight, bias, _groups(ids, groups, a), router, experts, ri, top_k, renormalize
        )
    return y.reshape(tokens + (weight.shape[0],))


def _mov_ffn_banked(
    x, wi_0, wi_1, wo, router, experts, adapter_ids, activation, top_k, renormalize, router_input, impl, key
):
    """``key``: the call's :func:`pemoe._checks.signature` (its FFN weights are checked by the caller)."""
    known = _checks.passed(key)
    if not known:
        _mov_bank_size(router, experts, "[A, F, E]" if router_input is None else "[A, R, E]")
        _checks.check_mov(
            x, _first(router), experts[0], top_k=top_k, renormalize=renormalize, router_input=router_input,
            h_name="wi_0 output", width=wi_0.shape[0],
        )  # fmt: skip
    a = experts.shape[0]
    tokens = tuple(x.shape[:-1])
    ids, groups = _bank_ids(adapter_ids, tokens, a)
    if not known:
        _checks.check_same_device(
            x=x, wi_0=wi_0, wi_1=wi_1, wo=wo, router=router, experts=experts, router_input=router_input,
            adapter_ids=ids,
        )  # fmt: skip
        _checks.check_frozen(wi_0=wi_0, wi_1=wi_1, wo=wo)
        _checks.remember(key)
    impl = _banked_implementation("mov_ffn", impl, x.device)
    ri = banked.token_router_input(router_input, tokens)
    if impl == "triton":
        kernel, probs = _banked_triton("mov_ffn", x, ids, router, experts, ri, router_input, top_k, renormalize)
        router, experts, probs = _float32(router, experts, probs)
        y = kernel.mov_ffn_banked(_flat(x), wi_0, wi_1, wo, ids, router, experts, probs, activation, top_k, renormalize)
        return y.reshape(x.shape)
    fn = banked.reference_mov_ffn if impl == "reference" else banked.grouped_mov_ffn
    ids_or_groups = ids if impl == "reference" else _groups(ids, groups, a)
    y = fn(_flat(x), wi_0, wi_1, wo, ids_or_groups, router, experts, ri, activation, top_k, renormalize)
    return y.reshape(x.shape)


def _banked_triton(op, x, ids, router, experts, ri, router_input, top_k, renormalize, bias=None):
    """The MoV bank kernels' module and sentence routing's per-token probabilities [T, E] (None for token
    routing), after refusing inputs that require grad while autograd records: the kernels are forward only."""
    given = {"h" if op == "mov" else "x": x, "bias": bias, "router": router, "experts": experts}
    _forward_only(op, **given, router_input=router_input)
    from pemoe.kernels.triton import mov_banked

    probs = None if ri is None else banked.token_sentence_probs(ri, router, ids, top_k, renormalize)
    return mov_banked, probs


def _molora_banked(
    op, x, weight, bias, base, lora_a, lora_b, router, adapter_ids, scale, top_k, renormalize, router_input, impl
):
    """molora_linear (``weight`` given) or molora_adapter (``weight`` None, ``base`` the frozen layer's output)
    with per-token adapters."""
    key = _checks.signature(
        op, x, weight, bias, base, lora_a, lora_b, router, scale, top_k, renormalize, router_input,
        _ids_like(adapter_ids),
    )  # fmt: skip
    known = _checks.passed(key)
    if not known:
        _molora_bank_size(lora_a, lora_b, router)
        common = dict(scale=scale, top_k=top_k, renormalize=renormalize, router_input=router_input)
        if weight is not None:
            _checks.check_molora(x, weight, bias, lora_a[0], lora_b[0], _first(router), **common)
        else:
            _checks.check_molora_adapter(x, base, lora_a[0], lora_b[0], _first(router), **common)
    a = lora_a.shape[0]
    tokens = tuple(x.shape[:-1])
    ids, groups = _bank_ids(adapter_ids, tokens, a)
    if not known:
        _checks.check_same_device(
            x=x, weight=weight, bias=bias, base=base, lora_a=lora_a, lora_b=lora_b, router=router,
            router_input=router_input, adapter_ids=ids,
        )  # fmt: skip
        _checks.check_frozen(weight=weight)
        _checks.remember(key)
    impl = _banked_implementation(op, impl, x.device)
    if impl == "triton":
        _forward_only(op, x=x, bias=bias, base=base, lora_a=lora_a, lora_b=lora_b, router=router,
                      router_input=router_input)  # fmt: skip
    ri = banked.token_router_input(router_input, tokens)
    n = lora_b.shape[-1]
    x2d = _flat(x)
    if impl == "triton":
        y = _molora_banked_triton(x2d, weight, bias, base, ids, lora_a, lora_b, router, ri, scale, top_k, renormalize)
    elif weight is not None:
        if impl == "reference":
            y = banked.reference_molora_linear(
                x2d, weight, bias, ids, lora_a, lora_b, router, ri, float(scale), top_k, renormalize
            )
        else:
            base2d = F.linear(x2d, weight, bias)
            g = _groups(ids, groups, a)
            y = banked.grouped_molora(
                x2d, base2d, g, lora_a, lora_b, router, ri, float(scale), top_k, renormalize, base_owned=True
            )
    else:
        base2d = None if base is None else base.reshape(-1, n)
        fn = banked.reference_molora_adapter if impl == "reference" else banked.grouped_molora
        ids_or_groups = ids if impl == "reference" else _groups(ids, groups, a)
        y = fn(x2d, base2d, ids_or_groups, lora_a, lora_b, router, ri, float(scale), top_k, renormalize)
    return y.reshape(tokens + (n,))


def _forward_only(op: str, **tensors: torch.Tensor | None) -> None:
    """The adapter-bank Triton kernels have no backward: refuse inputs that require grad while autograd records
    (never another implementation in their place)."""
    from pemoe.kernels.triton.autograd import refuse_grad

    hint = "use implementation='torch' (grouped by adapter, differentiable) to train, or call under torch.no_grad()"
    refuse_grad(f"{op}: implementation='triton' with adapter banks (adapter_ids)", hint, **tensors)


def _molora_banked_triton(x2d, weight, bias, base, ids, lora_a, lora_b, router, ri, scale, top_k, renormalize):
    """molora_linear (``weight`` given) or molora_adapter with per-token adapters through the segment-grouped
    Triton kernels; sentence routing's per-token probabilities come from :func:`banked.token_sentence_probs`."""
    from pemoe.kernels.triton import molora_banked as kernel

    probs = None if ri is None else banked.token_sentence_probs(ri, router, ids, top_k, renormalize)
    lora_a, lora_b, router, probs = _float32(lora_a, lora_b, router, probs)
    args = (ids, lora_a, lora_b, router, probs, float(scale), top_k, renormalize)
    if weight is not None:
        return kernel.molora_linear(x2d, weight, bias, *args)
    base2d = None if base is None else base.reshape(-1, lora_b.shape[-1])
    return kernel.molora_adapter(x2d, base2d, *args)
