"""Model families of ``pemoe train`` / ``pemoe eval``: what differs between T5 and a decoder-only causal LM.

The loop, the checkpoints and rank classification are the same for every model; a :class:`ModelFamily` supplies
the rest:

* :meth:`~ModelFamily.encode`: (input, target) strings -> a :class:`~pemoe.train.data.Batch` whose ``labels``
  [B, T] line up with the logits [B, T, V] of :meth:`~ModelFamily.logits` (-100 where no target token is
  predicted), so the training loss is cross-entropy(logits, labels) summed over the target tokens, and a
  candidate's rank-classification score is Σ_t log p(labels_t | ·) over its target tokens (end-of-sequence
  included; optionally divided by their count) for both families;
* :meth:`~ModelFamily.model_inputs` / :meth:`~ModelFamily.logits`: the forward call (teacher forcing, no
  key/value cache), seeing through a DDP wrapper;
* :meth:`~ModelFamily.fsdp_units`: the modules FSDP2 shards one by one before the root.

:class:`T5Family`: the encoder reads input + eos; the decoder reads the target shifted right behind the start
token and predicts target + eos (:func:`pemoe.train.data.encode_batch`).

:class:`CausalLMFamily` (transformers' Llama, Mistral, Qwen2/3, Gemma 1–3, GPT-2): one sequence
``[start] + input + target + [eos]`` (start: the tokenizer's beginning-of-sequence id, else its eos id, as
GPT-2 does; it lets an empty input still predict its first target token), right-padded; position t predicts
token t + 1, so ``labels[:, t]`` = ``input_ids[:, t + 1]`` where that token is a target token (or the final
eos) and -100 on the start + input part and on padding: the loss is on the target tokens only. Right padding
leaves the unpadded positions' logits unchanged (causal attention never looks ahead; positions count from 0).

:func:`build_causal_lm` builds the causal model: ``--init tiny-llama`` (random, offline) or a local
transformers folder whose ``config.json`` names a supported ``model_type`` (:data:`CAUSAL_MODEL_TYPES`).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from pemoe.train.data import Batch, encode_batch
from pemoe.train.tokenizer import Tokenizer

__all__ = [
    "CAUSAL_MODEL_TYPES",
    "CAUSAL_PRESETS",
    "CausalLMFamily",
    "ModelFamily",
    "T5Family",
    "build_causal_lm",
    "encode_causal_batch",
    "model_type_of",
]

# config.json model_type values whose models pemoe.inject places adapters in (pemoe.placements)
CAUSAL_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2")

# Random-initialised causal LMs for --init (vocab_size follows the tokenizer). tiny-llama: 2 layers, width 64,
# grouped-query attention (4 query heads share 2 key/value heads of dim 16), SwiGLU MLP of width 128.
CAUSAL_PRESETS = {
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    ),
}


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (itself otherwise)."""
    return getattr(model, "module", model)


class ModelFamily(Protocol):
    """What ``pemoe train`` needs to know about a model family (see the module docstring)."""

    name: str

    def encode(
        self,
        tokenizer: Tokenizer,
        inputs: Sequence[str],
        targets: Sequence[str],
        *,
        max_input_len: int,
        max_target_len: int,
    ) -> Batch:
        """Tokenise, truncate and right-pad (input, target) pairs; labels aligned with :meth:`logits`."""
        ...

    def model_inputs(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor | bool]:
        """Keyword arguments of ``model(**kwargs)`` for ``batch`` (teacher forcing, no key/value cache)."""
        ...

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Logits [B, T, V] aligned with ``batch.labels`` [B, T]."""
        ...

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """The modules FSDP2 shards one by one before the root (each a repeated block of the backbone)."""
        ...


class T5Family:
    """pemoe's or transformers' T5 (encoder-decoder): :func:`pemoe.train.data.encode_batch`."""

    name = "t5"

    def __init__(self, decoder_start_id: int = 0) -> None:
        self.decoder_start_id = decoder_start_id

    def encode(
        self,
        tokenizer: Tokenizer,
        inputs: Sequence[str],
        targets: Sequence[str],
        *,
        max_input_len: int,
        max_target_len: int,
    ) -> Batch:
        return encode_batch(
            tokenizer,
            inputs,
            targets,
            max_input_len=max_input_len,
            max_target_len=max_target_len,
            decoder_start_id=self.decoder_start_id,
        )

    def model_inputs(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor | bool]:
        from pemoe.models.t5 import T5

        kwargs: dict[str, torch.Tensor | bool] = dict(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            decoder_input_ids=batch.decoder_input_ids,
            decoder_attention_mask=batch.decoder_attention_mask,
        )
        if not isinstance(_unwrap(model), T5):
            kwargs["use_cache"] = False  # transformers: no key/value cache in teacher forcing
        return kwargs

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**self.model_inputs(model, batch)).logits

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """Each relative-attention-bias table (the pemoe T5 stack reads it outside its block), then each block."""
        model = _unwrap(model)
        units: list[nn.Module] = []
        for module in model.modules():
            table = getattr(module, "relative_attention_bias", None)
            if isinstance(table, nn.Embedding):
                units.append(table)
        for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
            if stack is not None:
                units.extend(stack.block)
        return units


def encode_causal_batch(
    tokenizer: Tokenizer,
    inputs: Sequence[str],
    targets: Sequence[str],
    *,
    max_input_len: int,
    max_target_len: int,
) -> Batch:
    """``[start] + input + target + [eos]`` per pair, right-padded with the pad id; ``labels[:, t]`` is the
    token at t + 1 where that is a target token (the final eos included), else -100.

    ``max_input_len`` counts the start token and ``max_target_len`` the eos (as T5's lengths count the eos):
    the input is cut to ``max_input_len - 1`` tokens, the target to ``max_target_len - 1``. Shapes:
    ``input_ids``, ``attention_mask``, ``labels`` [B, L] with L the longest sequence."""
    start = getattr(tokenizer, "bos_id", None)
    start = tokenizer.eos_id if start is None else start
    src = [[start] + tokenizer.encode(s)[: max_input_len - 1] for s in inputs]
    tgt = [tokenizer.encode(t)[: max_target_len - 1] + [tokenizer.eos_id] for t in targets]
    if len(src) != len(tgt):
        raise ValueError(f"{len(src)} inputs but {len(tgt)} targets")
    b, length = len(src), max(len(s) + len(t) for s, t in zip(src, tgt, strict=True))
    input_ids = torch.full((b, length), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    labels = torch.full((b, length), -100, dtype=torch.long)
    for i, (s, t) in enumerate(zip(src, tgt, strict=True)):
        n = len(s) + len(t)
        input_ids[i, :n] = torch.tensor(s + t)
        attention_mask[i, :n] = 1
        labels[i, len(s) - 1 : n - 1] = torch.tensor(t)  # position len(s) - 1 + j predicts t[j]
    num_target = int((labels != -100).sum())
    return Batch(
        input_ids,
        attention_mask,
        None,
        None,
        labels,
        num_input_tokens=int(attention_mask.sum()) - num_target,
        num_target_tokens=num_target,
    )


class CausalLMFamily:
    """A transformers decoder-only causal LM (``AutoModelForCausalLM``): :func:`encode_causal_batch`."""

    name = "causal"

    def encode(
        self,
        tokenizer: Tokenizer,
        inputs: Sequence[str],
        targets: Sequence[str],
        *,
        max_input_len: int,
        max_target_len: int,
    ) -> Batch:
        return encode_causal_batch(
            tokenizer, inputs, targets, max_input_len=max_input_len, max_target_len=max_target_len
        )

    def model_inputs(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor | bool]:
        return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**self.model_inputs(model, batch)).logits

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """Each decoder layer: the first ``nn.ModuleList`` under the model (``model.layers``; GPT-2's
        ``transformer.h``)."""
        for module in _unwrap(model).modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                return list(module)
        return []


def model_type_of(model_dir: pathlib.Path) -> str | None:
    """``model_type`` of a transformers folder's ``config.json`` (None when it has none)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--model {model_dir}: config.json is not readable JSON: {e}") from e
    return config.get("model_type") if isinstance(config, dict) else None


def _config_dict(config) -> dict:
    """A transformers config as plain JSON values (what the run's identity and fingerprint compare)."""
    return json.loads(config.to_json_string(use_diff=True))


def build_causal_lm(
    *, init: str | None, model_dir: pathlib.Path | None, tokenizer: Tokenizer, seed: int, max_len: int
) -> tuple[nn.Module, dict]:
    """A float32 causal LM and its config as a dict: ``init`` names a :data:`CAUSAL_PRESETS` shape
    (random weights from ``seed``, vocabulary = the tokenizer's, pad/eos/bos = the tokenizer's ids), else
    ``model_dir`` is a local transformers folder (``from_pretrained``, local files only). ``max_len`` (the
    longest encoded sequence, ``max_input_len + max_target_len``) must fit the model's positions."""
    import transformers

    if init is not None:
        fields = dict(CAUSAL_PRESETS[init])
        model_type = fields.pop("model_type")
        config_cls = transformers.AutoConfig.for_model(model_type).__class__
        start = getattr(tokenizer, "bos_id", None)
        config = config_cls(
            **fields,
            vocab_size=tokenizer.vocab_size,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.eos_id,
            bos_token_id=tokenizer.eos_id if start is None else start,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        assert model_dir is not None
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), local_files_only=True, dtype=torch.float32
        )
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and max_len > positions:
        raise ValueError(
            f"max_input_len + max_target_len = {max_len} tokens exceed the model's {positions} positions "
            "(lower --max-input-len / --max-target-len)"
        )
    return model.to(torch.float32), _config_dict(config)
