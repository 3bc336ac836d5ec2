"""The ``pemoe train`` loop (PyTorch): a frozen T5 plus adapters (or all weights), checkpoints, resume.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` examples; the loss is the token-mean
cross-entropy over the targets of the whole step (each micro-batch's token sum is divided by the step's
target-token count, so accumulation equals one large batch). Default optimizer: ``torch.optim.Adafactor``
(no momentum: torch's Adafactor has no first moment) at a constant learning rate of 3e-4, no weight
decay. Note torch's Adafactor scales each update by max(1e-3, RMS(parameter)) (as T5X's does with
``multiply_by_parameter_scale``), so parameters that start at zero (``lora_b``) first move in steps of
lr·1e-3. ``--optimizer adamw`` uses ``torch.optim.AdamW`` (betas (0.9, 0.999), weight decay 0).

Checkpoints (``<out>/checkpoints/step-XXXXXXXX/``) hold only what training changes:

* ``adapter.safetensors``: the adapter weights (:func:`pemoe.adapters.save_adapter`, loadable on its own);
  ``model.safetensors`` instead for ``--method full`` (all weights are trained then);
* ``optimizer.safetensors``: every optimizer state tensor and the torch RNG state (dropout);
* ``state.json``: step, data-stream position, the run's identity (method and adapter config, model
  fingerprint, tokenizer, data fingerprint, optimizer and batch settings), non-tensor optimizer state.

``resume`` restores all of it, so k steps + resume + (N − k) steps gives bit-identical weights to N steps
straight; a checkpoint whose identity differs from the run (another method, adapter shape, model,
tokenizer, data or optimizer setting) is refused with the differences named. A checkpoint directory is
written under a temporary name and renamed when complete.

Router health (:mod:`pemoe.router_health`, MoV / MoLoRA with E > 1): every ``router_stats_every`` steps
(default 10; 0: off) ``metrics.jsonl`` gets a line of kind "router" with, per site, the mean routing entropy,
the largest mean expert probability and the load over experts (mean probability per expert) over that step's
tokens, plus ``entropy_mean``, ``entropy_min`` and ``max_prob_max`` over the sites; a log line reports the
worst site (hooks during the step's own forward passes: no second forward). ``balance_loss`` > 0 adds
``balance_loss`` · KL(P̄ ‖ uniform) (mean over sites and micro-batches) to the training loss; it is off by
default, as in the paper, and part of the run's identity when on. The "train" lines' ``loss`` stays the
cross-entropy; the balancing term is logged as ``balance_loss``.

SIGINT (Ctrl-C): the step in progress is finished, a checkpoint is written, and :func:`train` returns
with ``interrupted=True`` (``pemoe train`` exits 130); a second SIGINT interrupts at once. The handler is
installed only when :func:`train` runs in the main thread.

Data parallel (:mod:`pemoe.train.distributed`): the same command under ``torchrun --nproc-per-node N -m pemoe
train ... [--parallel ddp|fsdp]`` splits every global batch (``batch_size`` stays the global micro-batch) over
the ranks and gives the single-process result up to float32 summation order; rank 0 writes the same files and
checkpoints (full tensors), which resume at any world size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pemoe import adapters, layers, serialization
from pemoe.models.t5 import T5, T5Config
from pemoe.train.data import Batch, Dataset, DataStream, load_dataset
from pemoe.train.distributed import PARALLEL_MODES, ParallelContext, setup
from pemoe.train.evaluate import EvalResult, rank_classification
from pemoe.train.models import (
    CAUSAL_MODEL_TYPES,
    CAUSAL_PRESETS,
    CausalLMFamily,
    ModelFamily,
    T5Family,
    model_type_of,
)
from pemoe.train.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TransformersTokenizer,
    tokenizer_from_spec,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "ModelBundle",
    "METHODS",
    "PRESETS",
    "build_model",
    "load_trained_model",
    "train",
    "CheckpointMismatch",
    "latest_checkpoint",
]

logger = logging.getLogger("pemoe")

METHODS = ("mov", "ia3", "molora", "lora", "full")
BACKBONES = ("pemoe", "transformers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OPTIMIZERS = ("adafactor", "adamw")
MODEL_META = "pemoe_model.json"  # a pemoe-format model directory: this file + model.safetensors

# Random-initialised model shapes for --init (vocab_size follows the tokenizer).
PRESETS = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"),
    "mini": dict(d_model=128, d_kv=32, d_ff=320, num_layers=3, num_heads=4, feed_forward_proj="gated-gelu"),
    "small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu"),
}

# TrainConfig fields that may change between a checkpoint and its resumed run.
RUN_TIME_FIELDS = {
    "out",
    "resume",
    "max_steps",
    "eval_data",
    "eval_every",
    "eval_batch_size",
    "checkpoint_every",
    "keep_checkpoints",
    "progress",
    "log_every",
    "implementation",
    "skip_bad_lines",
    "parallel",  # a checkpoint resumes at any world size and parallel mode
    "router_stats_every",  # statistics only: training is the same with or without them
}


@dataclass
class TrainConfig:
    """Everything ``pemoe train`` takes (see ``pemoe train --help`` for each field)."""

    data: str
    out: str
    method: str = "mov"
    num_experts: int = 10
    rank: int = 4
    alpha: float = 16.0
    top_k: int | None = None
    renormalize: bool = False
    sites: tuple[str, ...] | None = None
    model: str | None = None
    init: str | None = None
    backbone: str = "pemoe"
    tokenizer: str | None = None
    dtype: str = "float32"
    dropout: float | None = None
    optimizer: str = "adafactor"
    lr: float = 3e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    max_input_len: int = 128
    max_target_len: int = 32
    seed: int = 0
    eval_data: str | None = None
    eval_every: int = 0
    eval_batch_size: int = 64
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    skip_bad_lines: bool = False
    progress: bool = True
    log_every: int = 10
    implementation: str = "auto"
    parallel: str = "auto"  # torch.distributed mode (pemoe.train.distributed): auto, none, ddp, fsdp
    router_stats_every: int = 10  # router health every N steps (pemoe.router_health); 0: off
    balance_loss: float = 0.0  # coefficient of the load-balancing loss KL(mean p || uniform); 0: off

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if (self.model is None) == (self.init is None):
            raise ValueError("give exactly one of model (a model directory) and init (a random-initialised shape)")
        for name in ("batch_size", "grad_accum", "max_input_len", "max_target_len", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("max_steps", "eval_every", "checkpoint_every", "log_every", "router_stats_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_input_len < 2 or self.max_target_len < 2:
            raise ValueError("max_input_len and max_target_len must be >= 2 (text + end-of-sequence)")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.sites is not None:
            self.sites = tuple(self.sites)
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {list(PARALLEL_MODES)}, got {self.parallel!r}")
        if isinstance(self.balance_loss, bool) or not (
            isinstance(self.balance_loss, (int, float)) and math.isfinite(self.balance_loss) and self.balance_loss >= 0
        ):
            raise ValueError(f"balance_loss must be a finite number >= 0, got {self.balance_loss!r}")
        if self.balance_loss > 0 and (self.method not in ("mov", "molora") or self.num_experts < 2):
            raise ValueError(
                f"balance_loss needs routed adapters (method mov or molora with num_experts >= 2), got method "
                f"{self.method!r} with num_experts={self.num_experts}"
            )

    def adapter_config(self) -> adapters.AdapterConfig | None:
        common = dict(sites=self.sites, top_k=self.top_k, renormalize=self.renormalize)
        common["implementation"] = self.implementation
        if self.method == "full":
            return None
        if self.method == "mov":
            return adapters.MoVConfig(num_experts=self.num_experts, **common)
        if self.method == "ia3":
            return adapters.IA3Config(**common)
        if self.method == "molora":
            return adapters.MoLoRAConfig(num_experts=self.num_experts, rank=self.rank, alpha=self.alpha, **common)
        return adapters.LoRAConfig(rank=self.rank, alpha=self.alpha, **common)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sites"] = None if self.sites is None else list(self.sites)
        return d


# ---------------------------------------------------------------------------------------------
# models


@dataclass
class ModelBundle:
    model: nn.Module
    tokenizer: Tokenizer
    kind: str  # "pemoe" or "transformers" (T5), "causal" (a transformers causal LM)
    t5_config: dict  # the model's config as a dict (a T5Config's, or a causal LM's transformers config)
    fingerprint: str  # of the base weights as loaded (before injection / dtype change)
    decoder_start_id: int = 0
    family: ModelFamily | None = None  # encoding, forward and FSDP units (pemoe.train.models); None: T5

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = T5Family(self.decoder_start_id)


def _weights_fingerprint(model: nn.Module, config: dict, kind: str) -> str:
    """sha256 over the config, the backbone kind and, per parameter, its name, shape and first 256 values."""
    h = hashlib.sha256(json.dumps([kind, config], sort_keys=True).encode())
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        h.update(f"{name}:{list(p.shape)}".encode())
        h.update(p.detach().flatten()[:256].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


def _resolve_tokenizer(cfg: TrainConfig, model_dir: pathlib.Path | None, meta: dict | None) -> Tokenizer:
    if cfg.tokenizer is not None:
        return SentencePieceTokenizer(cfg.tokenizer)
    if meta is not None:
        return tokenizer_from_spec(meta.get("tokenizer"))
    if model_dir is not None and (model_dir / "spiece.model").is_file():
        return SentencePieceTokenizer(model_dir / "spiece.model")
    if model_dir is not None:
        logger.warning(
            "pemoe train: %s has no spiece.model and no --tokenizer was given: using the byte tokenizer, which is "
            "not this checkpoint's vocabulary (fine for random or byte-trained models only)",
            model_dir,
        )
    return ByteTokenizer()


def _init_config(spec: str, tokenizer: Tokenizer) -> dict:
    if spec in PRESETS:
        fields = dict(PRESETS[spec])
    else:
        try:
            fields = json.loads(spec)
        except json.JSONDecodeError:
            raise ValueError(
                f"init must be one of the presets {list(PRESETS) + list(CAUSAL_PRESETS)} or a JSON object of "
                f"T5Config fields, got {spec!r}"
            ) from None
        if not isinstance(fields, dict):
            raise ValueError(f"init JSON must be an object of T5Config fields, got {spec!r}")
    fields.setdefault("vocab_size", tokenizer.vocab_size)
    fields.setdefault("tie_word_embeddings", False)
    fields.setdefault("dropout_rate", 0.0)
    fields.update(pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id, decoder_start_token_id=tokenizer.pad_id)
    return T5Config(**fields).to_dict()


def _hf_from_pemoe_config(config: dict) -> nn.Module:
    from transformers import T5Config as HFConfig
    from transformers import T5ForConditionalGeneration

    c = dict(config)
    if not c.get("tie_word_embeddings", True):
        raise ValueError(
            '--backbone transformers with --init needs a tied head ("tie_word_embeddings": true in the init '
            "JSON): transformers >= 5 always ties the head of a model built from a config"
        )
    return T5ForConditionalGeneration(HFConfig(**c, attn_implementation="eager"))


def _build_causal(cfg: TrainConfig, model_dir: pathlib.Path | None) -> ModelBundle:
    """A transformers causal LM (:func:`pemoe.train.models.build_causal_lm`) with its tokenizer: ``--tokenizer``,
    else the folder's transformers tokenizer (``tokenizer.json`` / ``tokenizer_config.json``), else the byte
    tokenizer."""
    from pemoe.train.models import build_causal_lm

    if cfg.tokenizer is not None:
        tokenizer = SentencePieceTokenizer(cfg.tokenizer)
    elif model_dir is not None and any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = TransformersTokenizer(model_dir)
    else:
        if model_dir is not None:
            logger.warning(
                "pemoe train: %s has no tokenizer.json / tokenizer_config.json and no --tokenizer was given: using "
                "the byte tokenizer, which is not this checkpoint's vocabulary (fine for random or byte-trained "
                "models only)",
                model_dir,
            )
        tokenizer = ByteTokenizer()
    model, config = build_causal_lm(
        init=cfg.init,
        model_dir=model_dir,
        tokenizer=tokenizer,
        seed=cfg.seed,
        max_len=cfg.max_input_len + cfg.max_target_len,
    )
    if tokenizer.vocab_size > config["vocab_size"]:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {config['vocab_size']}"
        )
    fp = _weights_fingerprint(model, config, "causal")
    return ModelBundle(model, tokenizer, "causal", config, fp, family=CausalLMFamily())


def build_model(cfg: TrainConfig) -> ModelBundle:
    """The backbone (random-initialised from ``cfg.init`` with ``cfg.seed``, or loaded from ``cfg.model``:
    a pemoe-format directory written by ``pemoe train --method full``, a transformers T5 directory or a
    transformers causal LM directory (:data:`pemoe.train.models.CAUSAL_MODEL_TYPES`)), its tokenizer,
    fingerprint and model family; no adapters, float32 as stored."""
    if cfg.init in CAUSAL_PRESETS:
        return _build_causal(cfg, None)
    if cfg.init is not None:
        tokenizer = SentencePieceTokenizer(cfg.tokenizer) if cfg.tokenizer else ByteTokenizer()
        config = _init_config(cfg.init, tokenizer)
        torch.manual_seed(cfg.seed)
        model = T5(T5Config(**config)) if cfg.backbone == "pemoe" else _hf_from_pemoe_config(config)
        kind = cfg.backbone
    else:
        model_dir = pathlib.Path(cfg.model)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"--model {model_dir}: not a directory")
        meta = None
        if (model_dir / MODEL_META).is_file():
            meta = json.loads((model_dir / MODEL_META).read_text())
            if cfg.backbone != "pemoe":
                raise ValueError(
                    f"--model {model_dir} is a pemoe-format model: train it with --backbone pemoe "
                    "(its parameter names are transformers', but transformers >= 5 re-ties an untied head)"
                )
            tokenizer = _resolve_tokenizer(cfg, model_dir, meta)
            config = meta["config"]
            model = T5(T5Config(**config))
            model.load_hf_state_dict(model_dir / "model.safetensors")
        elif (model_dir / "config.json").is_file() and model_type_of(model_dir) in CAUSAL_MODEL_TYPES:
            return _build_causal(cfg, model_dir)
        elif (model_dir / "config.json").is_file():
            from transformers import T5ForConditionalGeneration

            if model_type_of(model_dir) != "t5":
                raise ValueError(
                    f"--model {model_dir}: config.json names model_type {model_type_of(model_dir)!r}, neither T5 nor "
                    f"a supported causal LM ({', '.join(CAUSAL_MODEL_TYPES)})"
                )

            tokenizer = _resolve_tokenizer(cfg, model_dir, None)
            hf = T5ForConditionalGeneration.from_pretrained(
                str(model_dir), local_files_only=True, attn_implementation="eager", dtype=torch.float32
            )
            config = T5Config.from_hf(hf.config).to_dict()
            model = T5.from_hf(hf) if cfg.backbone == "pemoe" else hf
        else:
            raise FileNotFoundError(f"--model {model_dir}: neither {MODEL_META} (pemoe) nor config.json (transformers)")
        kind = cfg.backbone
    if tokenizer.vocab_size > config["vocab_size"]:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {config['vocab_size']}"
        )
    model = model.to(torch.float32)
    fp = _weights_fingerprint(model, config, kind)
    return ModelBundle(model, tokenizer, kind, config, fp, int(config.get("decoder_start_token_id", 0)))


def _set_dropout(model: nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def _prepare(bundle: ModelBundle, cfg: TrainConfig, *, verbose: bool = True) -> list[tuple[str, nn.Parameter]]:
    """Inject adapters (or unfreeze everything), set dropout and dtype; the trainable (name, param) list."""
    model = bundle.model
    if cfg.dropout is not None:
        _set_dropout(model, cfg.dropout)
    ac = cfg.adapter_config()
    if ac is None:
        named, seen = [], set()
        for name, p in model.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(True)
                named.append((name, p))
    else:
        torch.manual_seed(cfg.seed)  # adapter initialisation (routers, lora_a) is reproducible
        count = adapters.inject(model, ac)
        if verbose:
            print(f"pemoe train: {type(ac).__name__} injected, {count}", file=sys.stderr)
        named = list(adapters.adapter_state_dict(model).items())
    model.to(DTYPES[cfg.dtype])  # adapter parameters stay float32 (pemoe.layers)
    return named


def _make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=0.0, foreach=False)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, foreach=False)


def load_trained_model(
    model: str,
    *,
    adapter: str | None = None,
    backbone: str = "pemoe",
    tokenizer: str | None = None,
    dtype: str = "float32",
    max_input_len: int = 128,
    max_target_len: int = 32,
) -> ModelBundle:
    """A model for evaluation: a model directory (+ an adapter file written by ``pemoe train``). The lengths are
    the evaluation's (a causal LM must have positions for ``max_input_len + max_target_len`` tokens)."""
    cfg = TrainConfig(
        data="-",
        out="-",
        model=model,
        backbone=backbone,
        tokenizer=tokenizer,
        dtype=dtype,
        max_input_len=max_input_len,
        max_target_len=max_target_len,
    )
    bundle = build_model(cfg)
    if adapter is not None:
        adapters.load_adapter(bundle.model, adapter)
    bundle.model.to(DTYPES[dtype]).eval()
    return bundle


# ---------------------------------------------------------------------------------------------
# checkpoints


class CheckpointMismatch(ValueError):
    """A checkpoint from another run configuration (method, adapter shape, model, data, ...)."""


CKPT_FORMAT = "pemoe-train-checkpoint"
CKPT_VERSION = 1


def _identity(cfg: TrainConfig, bundle: ModelBundle, data: Dataset) -> dict:
    ac = cfg.adapter_config()
    adapter_fields = {"num_experts", "rank", "alpha", "top_k", "renormalize", "sites"}  # in adapter_config
    train_config = {k: v for k, v in cfg.to_dict().items() if k not in RUN_TIME_FIELDS and k not in adapter_fields}
    if not train_config.get("balance_loss"):
        train_config.pop("balance_loss", None)  # off: the identity of runs from before the option
    return {
        "train_config": train_config,
        "adapter_config": None if ac is None else serialization._config_for_compare(ac),
        "model": {"kind": bundle.kind, "config": bundle.t5_config, "fingerprint": bundle.fingerprint},
        "tokenizer": bundle.tokenizer.spec(),
        "data": {"source": data.source, "fingerprint": data.fingerprint, "num_examples": len(data.examples)},
    }


def _diff(a: object, b: object, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [f"{path}: checkpoint {a!r} vs this run {b!r}"]


def _checkpoint_dir(out: pathlib.Path, step: int) -> pathlib.Path:
    return out / "checkpoints" / f"step-{step:08d}"


def latest_checkpoint(out: str | pathlib.Path) -> pathlib.Path | None:
    """The complete checkpoint with the highest step under ``<out>/checkpoints`` (None if none)."""
    root = pathlib.Path(out) / "checkpoints"
    done = (
        sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "state.json").is_file()) if root.is_dir() else []
    )
    return done[-1] if done else None


def _read_checkpoint_state(path: pathlib.Path, identity: dict, param_names: list[str], framework: str) -> dict:
    """``state.json`` of a complete checkpoint, checked against this run: format and version, the framework
    that wrote it (``pemoe train --framework``; absent means torch), the run identity (differences named)
    and the trainable parameter names. Raises CheckpointMismatch (FileNotFoundError if incomplete)."""
    state_file = path / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete pemoe train checkpoint (no state.json)")
    try:
        state = json.loads(state_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{state_file} is not valid JSON (truncated or damaged?): {e}") from e
    if not isinstance(state, dict) or not {"identity", "param_names", "step", "data_stream"} <= state.keys():
        raise ValueError(f"{state_file} is not a pemoe train checkpoint state (its JSON lacks the run's fields)")
    if state.get("format") != CKPT_FORMAT or state.get("version") != CKPT_VERSION:
        raise CheckpointMismatch(f"{path}: not a {CKPT_FORMAT} v{CKPT_VERSION} checkpoint")
    written_by = state.get("framework", "torch")
    if written_by != framework:
        raise CheckpointMismatch(
            f"checkpoint {path} was written by pemoe train --framework {written_by}, this run is --framework "
            f"{framework}: a checkpoint resumes only in the framework that wrote it (its optimizer state is "
            "framework-specific; its adapter.safetensors loads in either)"
        )
    diffs = _diff(state["identity"], identity)
    if diffs:
        raise CheckpointMismatch(f"checkpoint {path} is from another run configuration: " + "; ".join(diffs))
    if state["param_names"] != param_names:
        raise CheckpointMismatch(f"checkpoint {path}: its trainable parameters differ from this model's")
    return state


def read_tensors(file: pathlib.Path, framework: str = "pt") -> dict:
    """Every tensor of a checkpoint's safetensors ``file`` (``framework``: "pt" torch, "np" numpy); a file that
    is missing, truncated or damaged raises ``FileNotFoundError`` / ``ValueError`` naming it."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: not a complete pemoe train checkpoint")
    return serialization.read_safetensors(file, framework)


def _commit_checkpoint(tmp: pathlib.Path, final: pathlib.Path, keep: int) -> pathlib.Path:
    """Rename the complete checkpoint ``tmp`` to ``final`` and delete all but the ``keep`` newest."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    kept = sorted(p for p in final.parent.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _save_checkpoint(
    out: pathlib.Path,
    step: int,
    model: nn.Module,
    cfg: TrainConfig,
    named: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    stream: DataStream,
    identity: dict,
    extra: dict,
    par: ParallelContext | None = None,
) -> pathlib.Path:
    """Write a checkpoint. Distributed (``par``): every rank calls this (sharded tensors and the ranks' RNG
    states are gathered), rank 0 alone writes full tensors."""
    from safetensors.torch import save_file

    par = par if par is not None else ParallelContext()
    final = _checkpoint_dir(out, step)
    weights = {n: par.full(p) for n, p in named} if cfg.method == "full" else None
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state(), **par.rng_tensors()}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = par.full(value)
            else:
                scalars.setdefault(str(idx), {})[key] = value
    if not par.is_main or (final / "state.json").is_file():
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if weights is not None:
        save_file(weights, str(tmp / "model.safetensors"))
    else:
        adapters.save_adapter(model, tmp / "adapter.safetensors")
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {
        "format": CKPT_FORMAT,
        "version": CKPT_VERSION,
        "step": step,
        "data_stream": stream.state_dict(),
        "identity": identity,
        "param_names": [n for n, _ in named],
        "optimizer": {"class": type(optimizer).__name__, "param_groups": sd["param_groups"], "scalars": scalars},
        **extra,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    return _commit_checkpoint(tmp, final, cfg.keep_checkpoints)


def _load_checkpoint(
    path: pathlib.Path,
    model: nn.Module,
    cfg: TrainConfig,
    named: list[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    stream: DataStream,
    identity: dict,
    par: ParallelContext | None = None,
) -> dict:
    par = par if par is not None else ParallelContext()
    state = _read_checkpoint_state(path, identity, [n for n, _ in named], framework="torch")
    if cfg.method == "full":
        weights = read_tensors(path / "model.safetensors")
        with torch.no_grad():
            for n, p in named:
                if tuple(weights[n].shape) != tuple(p.shape):
                    raise CheckpointMismatch(f"checkpoint {path}: {n} has shape {list(weights[n].shape)}")
                p.copy_(par.like(weights[n], p))  # this rank's shard of a sharded parameter
    else:
        adapters.load_adapter(model, path / "adapter.safetensors")
    if state["optimizer"]["class"] != type(optimizer).__name__:
        raise CheckpointMismatch(f"checkpoint {path}: optimizer {state['optimizer']['class']}")
    tensors = read_tensors(path / "optimizer.safetensors")
    opt_state: dict[int, dict] = {}
    opt_params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, t in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = par.like(t, opt_params[int(idx)])
    for idx, sc in state["optimizer"]["scalars"].items():
        opt_state.setdefault(int(idx), {}).update(sc)
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    stream.load_state_dict(state["data_stream"])
    torch.set_rng_state(tensors["rng.torch"])
    return state


# ---------------------------------------------------------------------------------------------
# progress and metrics


class _Progress:
    """tqdm bar (if installed and enabled) with loss and tokens/s, else a plain line every log_every steps."""

    def __init__(self, total: int, initial: int, enabled: bool, log_every: int) -> None:
        self.bar = None
        self.log_every, self.total = log_every, total
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="pemoe train", unit="step", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.update(1)
        elif self.log_every and (step % self.log_every == 0 or step == self.total):
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  tokens/s {tokens_per_s:,.0f}", file=sys.stderr, flush=True
            )

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Metrics:
    """``metrics.jsonl``: one line per step (kind "train") and per evaluation (kind "eval")."""

    def __init__(self, path: pathlib.Path, keep_until_step: int) -> None:
        self.path = path
        lines = path.read_text().splitlines() if path.is_file() and keep_until_step > 0 else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= keep_until_step]
        path.write_text("".join(ln + "\n" for ln in kept))
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclass
class TrainResult:
    step: int
    interrupted: bool
    start_step: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, EvalResult]] = field(default_factory=list)
    checkpoint: pathlib.Path | None = None
    skipped_lines: list[str] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    bundle: ModelBundle | None = None
    rank: int = 0  # torch.distributed rank (0 in one process): rank 0 reports


class _StopFlag:
    """SIGINT: first one asks the loop to stop after the current step; a second raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------------------------------------
# the loop


def _evaluate(bundle: ModelBundle, cfg: TrainConfig, data: Dataset) -> EvalResult:
    return rank_classification(
        bundle.model,
        bundle.tokenizer,
        data.examples,
        batch_size=cfg.eval_batch_size,
        max_input_len=cfg.max_input_len,
        max_target_len=cfg.max_target_len,
        family=bundle.family,
    )


def _save_final(out: pathlib.Path, bundle: ModelBundle, cfg: TrainConfig, par: ParallelContext | None = None) -> None:
    """``<out>/adapter.safetensors`` (adapters) or ``<out>/model/`` (pemoe format, --method full).
    Distributed: every rank calls this (sharded weights are gathered); rank 0 writes."""
    from safetensors.torch import save_file

    par = par if par is not None else ParallelContext()
    if cfg.method != "full":
        if par.is_main:
            adapters.save_adapter(bundle.model, out / "adapter.safetensors")
        return
    full = None
    if par.mode == "fsdp":  # gather the shards; tied aliases (not in named_parameters) are left out
        names = {n for n, _ in bundle.model.named_parameters()} | {n for n, _ in bundle.model.named_buffers()}
        full = {k: par.full(v) for k, v in bundle.model.state_dict().items() if k in names}
    if not par.is_main:
        return
    model_dir = out / "model"
    model_dir.mkdir(exist_ok=True)
    if bundle.kind in ("transformers", "causal"):
        bundle.model.save_pretrained(str(model_dir), state_dict=full)
        return
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in (full or bundle.model.state_dict()).items()}
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        sd.pop(alias, None)
    if bundle.t5_config.get("tie_word_embeddings", True):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(model_dir / "model.safetensors"))
    meta = {"format": "pemoe-t5", "config": bundle.t5_config, "tokenizer": bundle.tokenizer.spec()}
    (model_dir / MODEL_META).write_text(json.dumps(meta, indent=1))


def _open_run(cfg: TrainConfig) -> tuple[pathlib.Path, Dataset, Dataset | None]:
    """Create ``cfg.out`` (refusing one with checkpoints unless resuming), load the training data (bad lines
    skipped are listed in ``<out>/skipped_lines.txt``) and the evaluation data (every example needs choices)."""
    out = pathlib.Path(cfg.out)
    if not cfg.resume and latest_checkpoint(out) is not None:
        raise ValueError(
            f"{out} already holds checkpoints ({latest_checkpoint(out).name}); continue that run with --resume "
            "or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(cfg.data, skip_bad_lines=cfg.skip_bad_lines)
    if data.skipped:
        (out / "skipped_lines.txt").write_text("".join(s + "\n" for s in data.skipped))
        print(
            f"pemoe train: skipped {len(data.skipped)} bad line(s) of {data.source} (listed in "
            f"{out / 'skipped_lines.txt'}), first: {data.skipped[0]}",
            file=sys.stderr,
        )
    eval_data = load_dataset(cfg.eval_data, skip_bad_lines=cfg.skip_bad_lines) if cfg.eval_data else None
    if eval_data is not None:
        missing = [ex.where for ex in eval_data.examples if not ex.choices]
        if missing:
            raise ValueError(f"eval data: {len(missing)} example(s) without 'choices', first at {missing[0]}")
    return out, data, eval_data


def _resume_checkpoint(cfg: TrainConfig, out: pathlib.Path) -> pathlib.Path:
    """The checkpoint ``--resume`` names (``latest``: the newest under ``<out>/checkpoints``)."""
    ckpt = latest_checkpoint(out) if cfg.resume == "latest" else pathlib.Path(cfg.resume)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {out / 'checkpoints'}")
    return ckpt


def _next_micro_batches(data: Dataset, stream: DataStream, bundle: ModelBundle, cfg: TrainConfig) -> list[Batch]:
    """The ``grad_accum`` encoded micro-batches of the next optimizer step (advances ``stream``)."""
    micro = []
    for _ in range(cfg.grad_accum):
        exs = [data.examples[i] for i in stream.next_indices()]
        micro.append(
            bundle.family.encode(
                bundle.tokenizer,
                [e.input for e in exs],
                [e.target for e in exs],
                max_input_len=cfg.max_input_len,
                max_target_len=cfg.max_target_len,
            )
        )
    return micro


def train(cfg: TrainConfig, *, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run ``pemoe train`` (see the module docstring). ``on_step(step, loss)`` is called after every
    completed optimizer step (a test hook; it may e.g. send SIGINT to this process). Under torchrun, every
    rank calls this and trains its share of each global batch (:mod:`pemoe.train.distributed`)."""
    par = setup(cfg.parallel, method=cfg.method, optimizer=cfg.optimizer, batch_size=cfg.batch_size)
    try:
        return _train(cfg, par, on_step)
    finally:
        par.close()


class _NoMetrics:
    """Ranks other than 0 write no metrics."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _router_monitor(model: nn.Module, cfg: TrainConfig):
    """A :class:`pemoe.router_health.RouterMonitor` on the model's routed sites (off between the steps that use
    it), or None: no routed site, or neither router statistics nor the balancing loss asked for."""
    from pemoe.router_health import RouterMonitor, routed_sites

    if cfg.method == "full" or not (cfg.router_stats_every or cfg.balance_loss > 0) or not routed_sites(model):
        return None
    monitor = RouterMonitor(model, balance=cfg.balance_loss > 0)
    monitor.enabled = False
    return monitor


def _write_router_stats(monitor, step: int, metrics, progress, cfg: TrainConfig, par: ParallelContext) -> None:
    """One ``kind: "router"`` metrics line (this step's tokens, this rank's share of the batch) and a log line."""
    from pemoe.router_health import stats_to_logs, uniform_entropy

    stats = monitor.stats(reset=True)
    if not stats or not par.is_main:
        return
    summary = {k.split("/", 1)[1]: v for k, v in stats_to_logs(stats, per_site=False).items()}
    metrics.write({"kind": "router", "step": step, **summary, "sites": {k: s.to_dict() for k, s in stats.items()}})
    if cfg.log_every:
        worst = max(stats, key=lambda k: stats[k].max_prob)
        experts = len(stats[worst].load)
        progress.write(
            f"step {step} router: entropy mean {summary['entropy_mean']:.3f} min {summary['entropy_min']:.3f} "
            f"(uniform {uniform_entropy(experts):.3f}); largest mean expert probability "
            f"{stats[worst].max_prob:.3f} (uniform {1 / experts:.3f}) at {worst}"
        )


def _train(cfg: TrainConfig, par: ParallelContext, on_step: Callable[[int, float], None] | None) -> TrainResult:
    out, data, eval_data = _open_run(cfg)
    bundle = build_model(cfg)
    named = _prepare(bundle, cfg, verbose=par.is_main)
    model = bundle.model
    # DDP wrapper or FSDP-sharded model (itself in one process)
    train_model, named = par.wrap(model, named, bundle.family.fsdp_units(model))
    optimizer = _make_optimizer(cfg, [p for _, p in named])
    stream = DataStream(len(data.examples), cfg.batch_size, cfg.seed)
    identity = _identity(cfg, bundle, data)
    device = next(model.parameters()).device

    step = 0
    tokens_seen = 0
    if cfg.resume:
        ckpt = _resume_checkpoint(cfg, out)
        state = _load_checkpoint(ckpt, model, cfg, named, optimizer, stream, identity, par)
        step, tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        par.restore_rng(ckpt, cfg.seed + 1, step)  # ranks >= 1: their own dropout stream
        if par.is_main:
            print(f"pemoe train: resumed from {ckpt} at step {step}", file=sys.stderr)
    else:
        torch.manual_seed(cfg.seed + 1)  # dropout stream (the init used cfg.seed)
        par.seed(cfg.seed + 1)
    result = TrainResult(step=step, interrupted=False, start_step=step, skipped_lines=list(data.skipped), rank=par.rank)
    count = layers.count_parameters(model)
    result.trainable, result.total, result.bundle = count.trainable, count.total, bundle
    if par.is_main:
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    metrics = _Metrics(out / "metrics.jsonl", step) if par.is_main else _NoMetrics()
    monitor = _router_monitor(model, cfg)
    progress = _Progress(cfg.max_steps, step, cfg.progress and par.is_main, cfg.log_every if par.is_main else 0)
    model.train()

    def checkpoint() -> pathlib.Path:
        extra = {"tokens_seen": tokens_seen, "trainable": count.trainable, "total": count.total}
        return _save_checkpoint(out, step, model, cfg, named, optimizer, stream, identity, extra, par)

    def run_eval() -> None:  # every rank evaluates (FSDP needs them all); rank 0 reports
        res = _evaluate(bundle, cfg, eval_data)
        result.evals.append((step, res))
        metrics.write({"kind": "eval", "step": step, **res.to_dict()})
        if par.is_main:
            progress.write(f"step {step}: held-out rank-classification accuracy {100 * res.average:.1f}%")

    try:
        stopping = False  # SIGINT on any rank, agreed by all ranks before each step
        with _StopFlag() as stop:
            while step < cfg.max_steps and not (stopping := par.any(stop.requested)):
                t0 = time.perf_counter()
                micro = _next_micro_batches(data, stream, bundle, cfg)
                n_target = sum(b.num_target_tokens for b in micro)
                n_tokens = sum(b.num_input_tokens + b.num_target_tokens for b in micro)
                optimizer.zero_grad(set_to_none=True)
                loss_value = 0.0
                balance_value = 0.0
                examples = 0
                record = monitor is not None and cfg.router_stats_every and (step + 1) % cfg.router_stats_every == 0
                if monitor is not None:
                    monitor.reset()
                    monitor.enabled = bool(record) or cfg.balance_loss > 0
                for i, b in enumerate(micro):
                    b = par.shard_batch(b).to(device)  # this rank's rows of the global micro-batch
                    examples += b.input_ids.shape[0]
                    with par.accumulate(train_model, last=i == len(micro) - 1):
                        logits = bundle.family.logits(train_model, b)
                        loss = F.cross_entropy(
                            logits.float().flatten(0, 1), b.labels.flatten(), ignore_index=-100, reduction="sum"
                        )
                        loss = loss / n_target  # the step's global target-token count: ranks' gradients sum
                        loss_value += loss.item()
                        if cfg.balance_loss > 0:  # mean over the micro-batches (and ranks) of each one's KL
                            aux = monitor.balance_loss() * (cfg.balance_loss / (len(micro) * par.world_size))
                            balance_value += aux.item()
                            loss = loss + aux
                        loss.backward()
                if monitor is not None:
                    monitor.enabled = False  # evaluation and checkpoints run without the hooks' work
                par.finish_gradients(named)
                optimizer.step()
                if par.distributed:  # the global loss, and how many examples each rank trained on
                    counts = [0.0] * par.world_size
                    counts[par.rank] = float(examples)
                    loss_value, balance_value, *counts = par.reduce_sum([loss_value, balance_value, *counts])
                step += 1
                tokens_seen += n_tokens
                dt = time.perf_counter() - t0
                result.losses.append((step, loss_value))
                metrics.write(
                    {
                        "kind": "train",
                        "step": step,
                        "loss": loss_value,
                        "tokens": n_tokens,
                        "tokens_per_s": n_tokens / dt,
                        **({"balance_loss": balance_value} if cfg.balance_loss > 0 else {}),
                        **({"rank_examples": [int(c) for c in counts]} if par.distributed else {}),
                    }
                )
                progress.update(step, loss_value, n_tokens / dt)
                if record:
                    _write_router_stats(monitor, step, metrics, progress, cfg, par)
                if on_step is not None:
                    on_step(step, loss_value)
                if eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    run_eval()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    result.checkpoint = checkpoint()
            result.interrupted = stopping and step < cfg.max_steps
            result.step = step
            result.checkpoint = checkpoint()  # still under the SIGINT flag: a Ctrl-C cannot cut it short
        if result.interrupted and par.is_main:
            progress.write(f"pemoe train: interrupted; step {step} saved in {result.checkpoint} (resume with --resume)")
        elif not result.interrupted:
            if eval_data is not None and not (result.evals and result.evals[-1][0] == step):
                run_eval()
            _save_final(out, bundle, cfg, par)
    finally:
        if monitor is not None:
            monitor.remove()
        progress.close()
        metrics.close()
    if result.evals and par.is_main:
        from pemoe.train.evaluate import format_table

        (out / "eval.md").write_text(format_table({f"step {result.evals[-1][0]}": result.evals[-1][1]}) + "\n")
    return result
