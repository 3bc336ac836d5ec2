"""A compact PyTorch T5 (encoder–decoder) that loads transformers-format weights.

Covers T5 v1.0 (ReLU FFN ``wi``/``wo``, tied head), T5 v1.1 / LM-adapted / T0 (gated-GELU FFN
``wi_0``/``wi_1``/``wo``, untied head). Parameter names are exactly those of transformers'
``T5ForConditionalGeneration`` (``shared``, ``encoder.block.{i}.layer.0.SelfAttention.q``, …,
``lm_head``), so its state dicts and safetensors files load as they are, and adapter sites have the
same paths in both models.

T5 conventions kept here:
  * RMS layer norm without mean subtraction or bias, variance in float32;
  * no 1/sqrt(d_kv) in attention: scores = q·kᵀ + relative position bias (+ mask), where the bias
    (bucketed relative positions, bidirectional in the encoder, causal in the decoder) is computed by
    the first block of each stack and shared by all its blocks; cross-attention has no position bias;
  * a tied head (v1.0) rescales the decoder output by d_model**-0.5 before the shared embedding.

Adapter sites (SPEC §2) are the ``nn.Linear`` modules ``q``, ``k``, ``v``, ``o`` of every attention and
``wi_0`` / ``wi`` / ``wo`` of every FFN, which :func:`pemoe.adapters.inject` replaces with
:class:`~pemoe.layers.MoVLinear` (fused ``mov_linear``) or :class:`~pemoe.layers.MoLoRALinear`
(fused ``molora_linear``), and the FFN's ``mov`` slot: when it holds a :class:`~pemoe.layers.MoV`
site, the FFN runs as the fused :func:`pemoe.ops.mov_ffn`. With FFN dropout active (training with
``dropout_rate > 0``), the fused op has no place for the dropout between the activation and ``wo``,
so the FFN then runs the same math unfused (``ops.mov`` on the activation, dropout, ``wo``) and says
so once on the ``pemoe`` logger.

Scores and softmax run in float32 whatever the activation dtype (transformers' eager attention
runs them in the activation dtype; in float32 both are the same computation).
"""

from __future__ import annotations

import logging
import math
import pathlib
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from pemoe import ops, reference

__all__ = ["T5Config", "T5", "Seq2SeqOutput", "relative_position_bucket"]

logger = logging.getLogger("pemoe")

# feed_forward_proj -> (gated, activation name in pemoe.reference.ACTIVATIONS); as transformers reads them
FEED_FORWARD_PROJ = {
    "relu": (False, "relu"),
    "gelu": (False, "gelu"),
    "gated-gelu": (True, "gelu_new"),
    "gated-gelu_new": (True, "gelu_new"),
    "gated-relu": (True, "relu"),
}


@dataclass
class T5Config:
    """T5 dimensions and conventions (field names as in transformers' ``T5Config``).

    ``tie_word_embeddings``: True (v1.0) shares ``lm_head`` with ``shared`` and rescales the decoder
    output by d_model**-0.5; False (v1.1) has its own ``lm_head`` and no rescale.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    dropout_rate: float = 0.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"T5Config.{name} must be a positive int, got {v!r}")
        if self.feed_forward_proj not in FEED_FORWARD_PROJ:
            raise ValueError(
                f"T5Config.feed_forward_proj must be one of {sorted(FEED_FORWARD_PROJ)}, got {self.feed_forward_proj!r}"
            )

    @property
    def is_gated(self) -> bool:
        return FEED_FORWARD_PROJ[self.feed_forward_proj][0]

    @property
    def activation(self) -> str:
        return FEED_FORWARD_PROJ[self.feed_forward_proj][1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf_config) -> T5Config:
        """From a transformers ``T5Config``. transformers ≥ 5 always sets ``tie_word_embeddings=True``
        and keeps the checkpoint's value as ``scale_decoder_outputs``; that value is the one used."""
        kwargs = {f.name: getattr(hf_config, f.name) for f in fields(cls) if hasattr(hf_config, f.name)}
        kwargs["tie_word_embeddings"] = bool(getattr(hf_config, "scale_decoder_outputs", hf_config.tie_word_embeddings))
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            v = kwargs.get(name)
            if isinstance(v, (list, tuple)):
                v = v[0]
            if v is None:
                kwargs.pop(name, None)
            else:
                kwargs[name] = int(v)
        return cls(**kwargs)


@dataclass
class Seq2SeqOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# building blocks


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each relative position (key position − query position).

    Half of the buckets (per direction when bidirectional) hold exact distances 0 … max_exact−1;
    the rest are logarithmically wider bins up to max_distance; farther positions share the last bin.
    A causal (unidirectional) stack maps every future position to bucket 0.
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_bin = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_bin * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding with its default normal(0, 1) init, skipped on the meta device (no data there; under
    ``torch.device("meta")`` the decomposed init would otherwise allocate a real [num, dim] tensor)."""
    weight = torch.empty(num, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(num, dim, _weight=weight)


class T5LayerNorm(nn.Module):
    """RMS norm: weight * x / sqrt(mean(x²) + eps); statistics in float32, no bias, no centring."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d) scaling; ``bias`` carries position bias and mask.

    ``k`` and ``v`` are adapter sites (MoV: per head, after the projection); ``q``, ``o`` too (MoLoRA).
    """

    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False) -> None:
        super().__init__()
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        inner = config.inner_dim
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = _embedding(config.relative_attention_num_buckets, config.num_heads)
        self.dropout = nn.Dropout(config.dropout_rate)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # [B, S, H·D] -> [B, H, S, D]
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.d_kv).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        memory: torch.Tensor | None = None,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """x [B, Q, d_model]; bias float32 broadcastable to [B, H, Q, K]; memory [B, K, d_model] for
        cross-attention. ``cache`` (generation): self-attention appends this step's keys/values,
        cross-attention computes them once."""
        q = self._heads(self.q(x))
        if memory is not None and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            source = x if memory is None else memory
            k, v = self._heads(self.k(source)), self._heads(self.v(source))
            if cache is not None:
                if memory is None and "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        scores = torch.matmul(q, k.transpose(2, 3)).float() + bias
        probs = self.dropout(torch.softmax(scores, dim=-1).to(v.dtype))
        out = torch.matmul(probs, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.o(out)


class T5DenseReluDense(nn.Module):
    """T5 FFN: v1.1 ``wo((act(x wi_0ᵀ)) * (x wi_1ᵀ))``, v1.0 ``wo(act(x wiᵀ))``.

    ``mov`` is the MoV site on act(x wi_0ᵀ) (resp. act(x wiᵀ)); with a site the FFN is the fused
    ``ops.mov_ffn`` (see the module docstring for the dropout case).
    """

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.gated, self.activation = config.is_gated, config.activation
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.mov: nn.Module | None = None
        self._warned_unfused = False

    @property
    def input_projection(self) -> nn.Module:
        """The projection feeding the activation: ``wi_0`` (v1.1) or ``wi`` (v1.0)."""
        return self.wi_0 if self.gated else self.wi

    def _act(self, t: torch.Tensor) -> torch.Tensor:
        return reference.ACTIVATIONS[self.activation](t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        site = self.mov
        dropout_active = self.training and self.dropout.p > 0
        if site is not None and not dropout_active:
            wi_0 = self.input_projection
            return ops.mov_ffn(
                x,
                wi_0.weight,
                self.wo.weight,
                site.router,
                site.experts,
                wi_1=self.wi_1.weight if self.gated else None,
                activation=self.activation,
                top_k=site.top_k,
                renormalize=site.renormalize,
                router_input=site._resolve_router_input(None),
                adapter_ids=site._adapter_ids(x),
                implementation=site.implementation,
            )
        if site is not None and not self._warned_unfused:
            logger.info("pemoe T5 FFN: dropout p=%g is active, so the MoV FFN runs unfused (ops.mov)", self.dropout.p)
            self._warned_unfused = True
        h = self._act(self.input_projection(x))
        if site is not None:
            h = site(h)
        if self.gated:
            h = h * self.wi_1(x)
        h = self.dropout(h)
        if h.dtype != self.wo.weight.dtype:
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, h: torch.Tensor, bias: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        return h + self.dropout(self.SelfAttention(self.layer_norm(h), bias, cache=cache))


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, h: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor, cache: dict | None = None):
        return h + self.dropout(self.EncDecAttention(self.layer_norm(h), bias, memory=memory, cache=cache))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.dropout(self.DenseReluDense(self.layer_norm(h)))


def _clamp_fp16(h: torch.Tensor) -> torch.Tensor:
    """Keep float16 activations finite (as T5 implementations do for fp16 inference)."""
    if h.dtype == torch.float16:
        big = torch.finfo(torch.float16).max - 1000
        h = h.clamp(-big, big)
    return h


class T5Block(nn.Module):
    def __init__(self, config: T5Config, is_decoder: bool, has_relative_attention_bias: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [T5LayerSelfAttention(config, has_relative_attention_bias)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(config))
        layers.append(T5LayerFF(config))
        self.layer = nn.ModuleList(layers)

    def forward(self, h, self_bias, memory=None, cross_bias=None, cache: dict | None = None) -> torch.Tensor:
        h = _clamp_fp16(self.layer[0](h, self_bias, cache=None if cache is None else cache["self"]))
        if memory is not None:
            h = _clamp_fp16(self.layer[1](h, memory, cross_bias, cache=None if cache is None else cache["cross"]))
        return _clamp_fp16(self.layer[-1](h))


def _padding_bias(mask: torch.Tensor | None, device) -> torch.Tensor:
    """[B, K] 1/0 (or bool) key mask -> additive float32 [B, 1, 1, K] (0 or float32 min)."""
    if mask is None:
        return torch.zeros((), device=device)
    keep = mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return torch.zeros(keep.shape, device=device).masked_fill(~keep, torch.finfo(torch.float32).min)


class T5Stack(nn.Module):
    """Embedding (shared), blocks, final RMS norm. The first block owns the relative position bias."""

    def __init__(self, config: T5Config, embed_tokens: nn.Embedding, is_decoder: bool) -> None:
        super().__init__()
        self.config, self.is_decoder = config, is_decoder
        self.embed_tokens = embed_tokens
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList([T5Block(config, is_decoder, i == 0) for i in range(n)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def position_bias(self, query_start: int, query_len: int, key_len: int, device) -> torch.Tensor:
        """Float32 [1, H, Q, K] bias for query positions query_start … query_start+Q−1 and keys 0 … K−1."""
        c = self.config
        q_pos = torch.arange(query_start, query_start + query_len, device=device)[:, None]
        k_pos = torch.arange(key_len, device=device)[None, :]
        buckets = relative_position_bucket(
            k_pos - q_pos,
            bidirectional=not self.is_decoder,
            num_buckets=c.relative_attention_num_buckets,
            max_distance=c.relative_attention_max_distance,
        )
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(2, 0, 1).unsqueeze(0).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cache: list[dict] | None = None,
        past_length: int = 0,
    ) -> torch.Tensor:
        """Encoder: attention_mask masks padded inputs. Decoder: causal self-attention (attention_mask
        optionally masks decoder keys), cross-attention on ``memory`` with ``memory_mask``; with ``cache``
        the inputs are positions past_length … past_length+Q−1."""
        device = input_ids.device
        h = self.dropout(self.embed_tokens(input_ids))
        q_len = input_ids.shape[1]
        k_len = past_length + q_len
        self_bias = self.position_bias(past_length, q_len, k_len, device)
        if self.is_decoder:
            future = (
                torch.arange(k_len, device=device)[None, :] > torch.arange(past_length, k_len, device=device)[:, None]
            )
            self_bias = self_bias.masked_fill(future, torch.finfo(torch.float32).min)
        self_bias = self_bias + _padding_bias(attention_mask, device)
        cross_bias = _padding_bias(memory_mask, device) if memory is not None else None
        for i, block in enumerate(self.block):
            h = block(h, self_bias, memory, cross_bias, cache=None if cache is None else cache[i])
        return self.dropout(self.final_layer_norm(h))


# ---------------------------------------------------------------------------------------------
# the model


class T5(nn.Module):
    """T5 encoder–decoder with a language-model head; transformers' parameter names and outputs."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = _embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared, is_decoder=False)
        self.decoder = T5Stack(config, self.shared, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> T5:
        """A pemoe T5 with the config and weights of a transformers ``T5ForConditionalGeneration``."""
        model = cls(T5Config.from_hf(hf_model.config)).to(dtype=hf_model.shared.weight.dtype)
        model.load_hf_state_dict(hf_model.state_dict())
        return model

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor] | str | pathlib.Path) -> None:
        """Load transformers-format T5 weights: a state dict or a ``.safetensors`` file path.

        The embedding may come as ``shared.weight`` or ``encoder.embed_tokens.weight``; a tied model
        ignores a stored ``lm_head.weight`` only when it equals the embedding, an untied one requires it.
        Missing or unexpected keys and shape mismatches raise ValueError naming them.
        """
        if isinstance(state_dict, (str, pathlib.Path)):
            from safetensors.torch import load_file

            state_dict = load_file(str(state_dict))
        sd = dict(state_dict)
        emb = sd.pop("shared.weight", None)
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            t = sd.pop(alias, None)
            emb = t if emb is None else emb
        if emb is None:
            raise ValueError("T5 state dict has no embedding ('shared.weight' or 'encoder.embed_tokens.weight')")
        sd.pop("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None)  # unused in T5
        head = sd.pop("lm_head.weight", None)
        if self.config.tie_word_embeddings:
            if head is not None and not torch.equal(head, emb):
                raise ValueError(
                    "T5 state dict has an lm_head.weight different from the embedding, but the config has a tied "
                    "head (tie_word_embeddings=True); build the model with tie_word_embeddings=False"
                )
        else:
            if head is None:
                raise ValueError("T5 state dict has no lm_head.weight, required by an untied head")
            sd["lm_head.weight"] = head
        sd["shared.weight"] = emb
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(("encoder.embed", "decoder.embed"))}
        if self.config.tie_word_embeddings:
            own.pop("lm_head.weight", None)
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"T5 state dict does not match the config: missing {missing}, unexpected {unexpected}")
        for k, t in sd.items():
            if tuple(t.shape) != tuple(own[k].shape):
                raise ValueError(f"T5 state dict: {k} has shape {list(t.shape)}, the config needs {list(own[k].shape)}")
        self.load_state_dict(sd, strict=False)

    # -- forward ---------------------------------------------------------------------------------

    def _shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            h = h * self.config.d_model**-0.5
        return self.lm_head(h)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        encoder_outputs: torch.Tensor | None = None,
    ) -> Seq2SeqOutput:
        """Logits [B, T, vocab]; with ``labels`` (−100 ignored) also the mean cross-entropy ``loss``,
        and decoder inputs default to the labels shifted right behind decoder_start_token_id."""
        memory = self.encode(input_ids, attention_mask) if encoder_outputs is None else encoder_outputs
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5.forward needs decoder_input_ids or labels")
            decoder_input_ids = self._shift_right(labels)
        h = self.decoder(decoder_input_ids, decoder_attention_mask, memory=memory, memory_mask=attention_mask)
        logits = self._logits(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return Seq2SeqOutput(logits=logits, loss=loss, encoder_last_hidden_state=memory)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        *,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Greedy decoding: [B, 1 + n] token ids starting with decoder_start_token_id, n ≤ max_new_tokens.

        A sequence that produced eos_token_id is padded with pad_token_id; decoding stops when all
        have. ``use_cache=True`` keeps keys/values per decoder block (cross-attention ones computed
        once); ``use_cache=False`` recomputes the whole prefix each step (same result).
        """
        c = self.config
        memory = self.encode(input_ids, attention_mask)
        batch = input_ids.shape[0]
        tokens = torch.full((batch, 1), c.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        cache = [{"self": {}, "cross": {}} for _ in self.decoder.block] if use_cache else None
        for step in range(max_new_tokens):
            if use_cache:
                h = self.decoder(
                    tokens[:, -1:], memory=memory, memory_mask=attention_mask, cache=cache, past_length=step
                )
            else:
                h = self.decoder(tokens, memory=memory, memory_mask=attention_mask)
            nxt = self._logits(h[:, -1]).argmax(-1)
            nxt = nxt.masked_fill(finished, c.pad_token_id)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            finished |= nxt == c.eos_token_id
            if finished.all():
                break
        return tokens
