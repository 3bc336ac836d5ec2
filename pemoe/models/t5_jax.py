"""A functional JAX T5 forward (the "JAX twin" of :mod:`pemoe.models.t5`), adapters included.

    params = params_from_torch(model)                        # pemoe or transformers T5, injected or not
    logits = t5_logits(params, model.config, input_ids, decoder_input_ids, attention_mask,
                       adapter=pemoe.adapters.adapter_config(model))

``params`` is a flat dict ``{name: jnp array}`` (a pytree) keyed by transformers' parameter names
(``shared.weight``, ``encoder.block.{i}.layer.0.SelfAttention.q.weight``, …, ``lm_head.weight`` for an
untied head) plus pemoe's model-independent adapter names (:func:`pemoe.adapters.adapter_state_dict`):
``<site>.experts`` / ``<site>.router`` for MoV at ``k`` / ``v``, ``…DenseReluDense.mov.experts`` /
``.router`` for MoV on the FFN activation, ``<site>.lora_a`` / ``.lora_b`` / ``.router`` for MoLoRA at
``q``, ``k``, ``v``, ``o``, ``wi_0`` / ``wi_1`` / ``wi``, ``wo``. A site's adapter is found by its names;
the router is absent for one expert ((IA)3 / LoRA). Adapter sites run :mod:`pemoe.jax.ops`.

T5 conventions as in the torch model: RMS norm with float32 statistics, no 1/sqrt(d_kv) in attention,
bucketed relative position bias from each stack's first block (bidirectional encoder, causal decoder,
none in cross-attention), float32 scores and softmax, tied head rescaled by d_model**-0.5.

Adapter banks (the torch bank's semantics, :mod:`pemoe.banks`): with ``adapter_ids`` [B] (one adapter index
per sequence, -1: the bare base model) every adapter parameter is stacked along a leading adapter axis A, as
``params_from_torch`` reads it from a torch model holding a bank; every site then runs :mod:`pemoe.jax.ops`
with the sequence's index broadcast over its tokens (encoder and decoder alike).

Not covered: sentence routing (``NotImplementedError``), decoder padding masks, generation (greedy
decoding would call :func:`t5_logits` on the growing prefix; there is no key/value cache here).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pemoe.jax import ops as jax_ops
from pemoe.jax import reference as jax_reference
from pemoe.models.t5 import T5Config

__all__ = ["params_from_torch", "params_from_state_dict", "t5_logits"]

_UNUSED_KEYS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_UNUSED_CROSS_BIAS = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"


# ---------------------------------------------------------------------------------------------
# parameters


def _canonical(name: str) -> str:
    """Torch module path -> params name: drop the wrappers that injection adds (``.base``, ``.site``) and
    map transformers' FFN activation wrapper (``DenseReluDense.act``) to the ``mov`` slot."""
    name = name.replace(".base.weight", ".weight").replace(".base.bias", ".bias").replace(".site.", ".")
    return name.replace("DenseReluDense.act.", "DenseReluDense.mov.")


def params_from_state_dict(state_dict: Mapping | str | pathlib.Path) -> dict[str, jax.Array]:
    """A params dict from a transformers-format state dict (torch tensors or arrays) or ``.safetensors`` path.

    The embedding may be ``shared.weight`` or ``encoder.embed_tokens.weight``; a stored ``lm_head.weight``
    equal to the embedding (tied head) is dropped. Names of injected models are canonicalised (see the
    module docstring). Values are copied as they are (no dtype change).
    """
    if isinstance(state_dict, (str, pathlib.Path)):
        from safetensors.numpy import load_file

        state_dict = load_file(str(state_dict))
    arrays, bfloat16 = {}, set()
    for k, v in state_dict.items():
        if hasattr(v, "detach"):  # torch tensor; NumPy has no bfloat16: go through float32 (exact)
            v = v.detach().cpu()
            if str(v.dtype) == "torch.bfloat16":
                bfloat16.add(_canonical(k))
                v = v.float()
            v = v.numpy()
        arrays[_canonical(k)] = np.asarray(v)
    emb = arrays.pop("shared.weight", None)
    for alias in _UNUSED_KEYS:
        t = arrays.pop(alias, None)
        emb = t if emb is None else emb
    if emb is None:
        raise ValueError("T5 state dict has no embedding ('shared.weight' or 'encoder.embed_tokens.weight')")
    arrays["shared.weight"] = emb
    arrays.pop(_UNUSED_CROSS_BIAS, None)
    head = arrays.get("lm_head.weight")
    if head is not None and head.shape == emb.shape and np.array_equal(head, emb):
        del arrays["lm_head.weight"]
    return {k: jnp.asarray(v).astype(jnp.bfloat16) if k in bfloat16 else jnp.asarray(v) for k, v in arrays.items()}


def params_from_torch(model) -> dict[str, jax.Array]:
    """A params dict from a pemoe or transformers T5 (``torch.nn.Module``), injected adapters included."""
    return params_from_state_dict(model.state_dict())


class _Params:
    """Read access to the params dict that names a missing parameter and records what was used."""

    def __init__(self, params: Mapping[str, jax.Array]) -> None:
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of arrays keyed by parameter name, got {type(params).__name__}")
        self.params, self.used = params, set()

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def __getitem__(self, name: str) -> jax.Array:
        if name not in self.params:
            raise KeyError(f"t5_logits: parameter {name!r} is missing from params")
        self.used.add(name)
        return self.params[name]

    def get(self, name: str) -> jax.Array | None:
        return self[name] if name in self.params else None

    def check_all_used(self) -> None:
        unused = sorted(set(self.params) - self.used)
        if unused:
            raise ValueError(
                f"t5_logits: params has {len(unused)} parameter(s) this config does not use: {unused[:6]} "
                "(wrong name, or a config that does not match the weights)"
            )


# ---------------------------------------------------------------------------------------------
# building blocks


def _relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of each relative position (key − query), as :func:`pemoe.models.t5.relative_position_bucket`,
    in NumPy (positions are static), float32 logarithms like the torch model."""
    bucket = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).astype(np.int64) * num_buckets
        distance = np.abs(relative_position)
    else:
        distance = np.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    scaled = np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)
    log_bin = np.log(scaled) / np.float32(math.log(max_distance / max_exact))
    far = np.minimum(max_exact + (log_bin * np.float32(num_buckets - max_exact)).astype(np.int64), num_buckets - 1)
    return bucket + np.where(distance < max_exact, distance, far)


def _layer_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMS norm: weight * x / sqrt(mean(x²) + eps), statistics in float32."""
    variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    h = x.astype(jnp.float32) * jax.lax.rsqrt(variance + eps)
    if weight.dtype in (jnp.float16, jnp.bfloat16):
        h = h.astype(weight.dtype)
    return weight * h


def _clamp_fp16(h: jax.Array) -> jax.Array:
    if h.dtype == jnp.float16:
        big = float(jnp.finfo(jnp.float16).max) - 1000
        h = jnp.clip(h, -big, big)
    return h


class _Forward:
    """One forward pass: params access, config and adapter options shared by the building blocks."""

    def __init__(self, params: _Params, config: T5Config, adapter, implementation: str, adapter_ids=None) -> None:
        self.p, self.c, self.adapter, self.impl = params, config, adapter, implementation
        self.adapter_ids = adapter_ids

    def _ids(self, x: jax.Array) -> jax.Array | None:
        """The sequences' adapter indices [B] broadcast over x's tokens [B, S] (None without a bank)."""
        if self.adapter_ids is None:
            return None
        return jnp.broadcast_to(self.adapter_ids.reshape(-1, 1), x.shape[:2])

    def _routing(self, site: str) -> dict:
        if self.adapter is None:
            raise ValueError(
                f"t5_logits: params hold adapter parameters at {site!r}; pass adapter= the injected "
                "AdapterConfig (pemoe.adapters.adapter_config(model)) for its top_k / renormalize / alpha"
            )
        return dict(top_k=self.adapter.top_k, renormalize=self.adapter.renormalize, implementation=self.impl)

    def _site_routing(self, site: str, x: jax.Array) -> dict:
        return dict(self._routing(site), adapter_ids=self._ids(x))

    def linear(self, name: str, x: jax.Array) -> jax.Array:
        """A linear site ``name`` (torch layout [N, K]): plain, MoV (mov_linear) or MoLoRA (molora_linear)."""
        p = self.p
        weight, bias = p[f"{name}.weight"], p.get(f"{name}.bias")
        if f"{name}.experts" in p:
            return jax_ops.mov_linear(
                x, weight, p.get(f"{name}.router"), p[f"{name}.experts"], bias=bias, **self._site_routing(name, x)
            )
        if f"{name}.lora_a" in p:
            routing = self._site_routing(name, x)
            lora_a, lora_b = p[f"{name}.lora_a"], p[f"{name}.lora_b"]
            scale = self.adapter.alpha / self.adapter.rank
            return jax_ops.molora_linear(
                x, weight, lora_a, lora_b, p.get(f"{name}.router"), scale=scale, bias=bias, **routing
            )
        return jax_reference.linear(x, weight, bias)

    def attention(self, name: str, x: jax.Array, bias: jax.Array, memory: jax.Array | None = None) -> jax.Array:
        """x [B, Q, d_model], bias float32 broadcastable to [B, H, Q, K], memory [B, K, d_model] or None."""
        c = self.c

        def heads(t: jax.Array) -> jax.Array:  # [B, S, H·D] -> [B, H, S, D]
            return t.reshape(t.shape[0], t.shape[1], c.num_heads, c.d_kv).transpose(0, 2, 1, 3)

        source = x if memory is None else memory
        q, k, v = (
            heads(self.linear(f"{name}.q", x)),
            heads(self.linear(f"{name}.k", source)),
            heads(self.linear(f"{name}.v", source)),
        )
        scores = jnp.matmul(q, k.transpose(0, 1, 3, 2)).astype(jnp.float32) + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.matmul(probs, v).transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
        return self.linear(f"{name}.o", out)

    def ffn(self, name: str, x: jax.Array) -> jax.Array:
        """v1.1 ``wo(act(x wi_0ᵀ) * x wi_1ᵀ)``, v1.0 ``wo(act(x wiᵀ))``; MoV site ``{name}.mov`` -> mov_ffn."""
        c, p = self.c, self.p
        first = f"{name}.wi_0" if c.is_gated else f"{name}.wi"
        if f"{name}.mov.experts" in p:
            routing = self._site_routing(f"{name}.mov", x)
            return jax_ops.mov_ffn(
                x,
                p[f"{first}.weight"],
                p[f"{name}.wo.weight"],
                p.get(f"{name}.mov.router"),
                p[f"{name}.mov.experts"],
                wi_1=p[f"{name}.wi_1.weight"] if c.is_gated else None,
                activation=c.activation,
                **routing,
            )
        h = jax_reference.ACTIVATIONS[c.activation](self.linear(first, x))
        if c.is_gated:
            h = h * self.linear(f"{name}.wi_1", x)
        return self.linear(f"{name}.wo", h.astype(p[f"{name}.wo.weight"].dtype))

    def stack(self, which: str, ids: jax.Array, mask: jax.Array | None, memory=None, memory_mask=None) -> jax.Array:
        c, p = self.c, self.p
        is_decoder = which == "decoder"
        h = jnp.take(p["shared.weight"], ids, axis=0)
        length = ids.shape[1]
        pos = np.arange(length)
        buckets = _relative_position_bucket(
            pos[None, :] - pos[:, None],
            bidirectional=not is_decoder,
            num_buckets=c.relative_attention_num_buckets,
            max_distance=c.relative_attention_max_distance,
        )
        table = p[f"{which}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        self_bias = jnp.take(table, jnp.asarray(buckets), axis=0).transpose(2, 0, 1)[None].astype(jnp.float32)
        neg = jnp.finfo(jnp.float32).min
        if is_decoder:
            future = pos[None, :] > pos[:, None]
            self_bias = jnp.where(jnp.asarray(future), neg, self_bias)
        self_bias = self_bias + _padding_bias(mask)
        cross_bias = _padding_bias(memory_mask)
        num = c.num_decoder_layers if is_decoder else c.num_layers
        for i in range(num):
            prefix = f"{which}.block.{i}.layer"
            eps = c.layer_norm_epsilon
            a = self.attention(
                f"{prefix}.0.SelfAttention", _layer_norm(h, p[f"{prefix}.0.layer_norm.weight"], eps), self_bias
            )
            h = _clamp_fp16(h + a)
            if is_decoder:
                normed = _layer_norm(h, p[f"{prefix}.1.layer_norm.weight"], eps)
                h = _clamp_fp16(h + self.attention(f"{prefix}.1.EncDecAttention", normed, cross_bias, memory))
            last = 2 if is_decoder else 1
            normed = _layer_norm(h, p[f"{prefix}.{last}.layer_norm.weight"], eps)
            h = _clamp_fp16(h + self.ffn(f"{prefix}.{last}.DenseReluDense", normed))
        return _layer_norm(h, p[f"{which}.final_layer_norm.weight"], c.layer_norm_epsilon)


def _padding_bias(mask: jax.Array | None) -> jax.Array:
    """[B, K] 1/0 (or bool) key mask -> additive float32 [B, 1, 1, K] (0 or float32 min)."""
    if mask is None:
        return jnp.zeros((), jnp.float32)
    keep = jnp.asarray(mask).astype(bool)[:, None, None, :]
    return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# the model


def t5_logits(
    params: Mapping[str, jax.Array],
    config: T5Config,
    input_ids: jax.Array,
    decoder_input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    implementation: str = "xla",
    *,
    adapter=None,
    adapter_ids: jax.Array | None = None,
) -> jax.Array:
    """Logits [B, T, vocab] of a T5 encoder–decoder (see the module docstring for ``params``).

    input_ids [B, S] (int), decoder_input_ids [B, T] (int), attention_mask [B, S] (1 keep / 0 pad) masks
    encoder keys and cross-attention keys. ``implementation`` is passed to every pemoe.jax op at the
    adapter sites. ``adapter``: the injected :class:`pemoe.adapters` config (``adapter_config(model)``),
    required when params hold adapter parameters (top_k, renormalize, alpha / rank). ``config`` and
    ``adapter`` are static: under ``jax.jit`` close over them (``functools.partial``). ``adapter_ids`` [B]
    (integer; may be traced): one adapter index per sequence of a bank (see the module docstring); the ops
    refuse ids outside [-1, A) when concrete.

    Raises KeyError naming a parameter the config needs and params lacks, ValueError naming params the
    config does not use, NotImplementedError for sentence routing.
    """
    if not isinstance(config, T5Config):
        raise TypeError(f"config must be a pemoe.models.T5Config, got {type(config).__name__}")
    if adapter is not None and getattr(adapter, "router_input", "token") != "token":
        raise NotImplementedError(
            f"t5_logits: router_input={adapter.router_input!r} (sentence routing) is not supported"
        )
    for arg, value in (("input_ids", input_ids), ("decoder_input_ids", decoder_input_ids)):
        if jnp.ndim(value) != 2:
            raise ValueError(f"{arg} must have shape [B, length], got {list(jnp.shape(value))}")
    if input_ids.shape[0] != decoder_input_ids.shape[0]:
        raise ValueError(
            f"input_ids [B, S] and decoder_input_ids [B, T] must share B, got {input_ids.shape[0]} and "
            f"{decoder_input_ids.shape[0]}"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask must have input_ids' shape {list(input_ids.shape)}, got {list(attention_mask.shape)}"
        )
    if adapter_ids is not None:
        if not isinstance(adapter_ids, (jax.Array, np.ndarray)) or not jnp.issubdtype(adapter_ids.dtype, jnp.integer):
            raise TypeError(
                f"adapter_ids must be an integer array [B], got {getattr(adapter_ids, 'dtype', adapter_ids)!r}"
            )
        if tuple(adapter_ids.shape) != (input_ids.shape[0],):
            raise ValueError(
                f"adapter_ids must have shape [B] = [{input_ids.shape[0]}] (one adapter index per sequence), got "
                f"{list(adapter_ids.shape)}"
            )
        adapter_ids = jnp.asarray(adapter_ids)
    p = _Params(params)
    run = _Forward(p, config, adapter, implementation, adapter_ids)
    memory = run.stack("encoder", input_ids, attention_mask)
    h = run.stack("decoder", decoder_input_ids, None, memory=memory, memory_mask=attention_mask)
    if config.tie_word_embeddings:
        h = h * config.d_model**-0.5
        head = p["shared.weight"]
    else:
        head = p["lm_head.weight"]
    logits = jnp.matmul(h, head.T)
    p.check_all_used()
    return logits
