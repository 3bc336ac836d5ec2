"""The ``pemoe train --framework jax`` loop: the PyTorch loop (:mod:`pemoe.train.loop`) with a JAX step.

Everything framework-neutral is the torch trainer's: :class:`~pemoe.train.loop.TrainConfig`, the data
pipeline (JSONL / synthetic set, tokenizer, :class:`~pemoe.train.data.DataStream`), the progress bar,
``metrics.jsonl``, the run identity and its mismatch checks, SIGINT handling and rank-classification
scoring (:func:`pemoe.train.evaluate.rank_classification`, fed by the JAX forward). The model is built and
injected by the torch code (same initialisation, same adapter names), converted with
:func:`pemoe.models.t5_jax.params_from_torch` and split into the trainable adapter parameters and the
frozen backbone (float32 or bfloat16; adapters stay float32).

Math. ``loss_fn(trainable, frozen, batch) -> (loss_sum, n_tokens)`` is the summed target-token
cross-entropy of :func:`pemoe.models.t5_jax.t5_logits` (float32 log-softmax, labels −100 ignored) and the
number of target tokens; one optimizer step minimises ``Σ loss_sum / Σ n_tokens`` over its ``grad_accum``
micro-batches (a ``lax.scan`` inside one ``jax.jit``), i.e. the torch loop's token mean. The sum form lets a
data-parallel step (``--mesh``, :mod:`pemoe.jax.parallel`) form the exact global mean.

Optimizers. ``adafactor`` is :func:`adafactor`, an optax transformation with torch.optim.Adafactor's
update rule (no momentum, factored second moment over the last two dims of every ≥2-D tensor,
β2ₜ = 1 − t^−0.8, update clipped at RMS 1, step ``min(lr, 1/√t) · max(1e-3, RMS(param))``), so both
frameworks train with the same optimizer. ``optax.adafactor`` differs (it factors the two largest dims
and only when both are ≥ 128, and adds 1e-30 to g² instead of clamping the estimate at eps²), which is
why it is not used. ``adamw`` is ``optax.adamw`` with torch's defaults (β 0.9/0.999, eps 1e-8, no decay).

Checkpoints (``<out>/checkpoints/step-XXXXXXXX/``) have the torch trainer's layout and names:
``adapter.safetensors`` (:func:`pemoe.adapters.save_adapter`: ``pemoe eval`` in torch loads it),
``optimizer.safetensors`` (every leaf of the optax state, keyed by its ``jax.tree_util.keystr`` path) and
``state.json`` (step, data-stream position, the run identity, ``"framework": "jax"``). ``--resume``
continues bit-exactly (the JAX step is deterministic and no RNG is used). A checkpoint written by the
torch trainer is refused by this one and vice versa (optimizer states differ); their adapter files are
interchangeable.

Several processes (``--jax-distributed``, or ``--coordinator HOST:PORT --num-processes N --process-id I``;
``distributed=`` here): every process runs this same loop after :func:`pemoe.jax.parallel.initialize_distributed`,
which comes before any device use; the mesh spans every process's devices (default ``data=<all devices>``).
Each process reads the same data and builds the same model (same ``--seed``), encodes the whole step's batch
(so the padding is the global one) and copies only its own devices' rows (:func:`pemoe.jax.parallel.shard_batch`):
the global batch and the math are the single-process ones. Process 0 alone writes ``train_config.json``,
``metrics.jsonl``, the progress, checkpoints, ``adapter.safetensors`` and ``eval.md``; ``--out`` must be one
shared directory (every process reads the checkpoint on ``--resume``). The processes check that they start
from the same adapter, optimizer state and step (a fingerprint gathered from every process) and, at every
step, that they trained on the same batch and whether any of them got SIGINT, so that they all stop at the
same step.

Limits (clear errors): ``--method full`` (the JAX loop trains adapters only), dropout (the JAX T5 has
none: a model whose dropout rate is not 0 needs ``--dropout 0``), ``--implementation`` must name a
pemoe.jax implementation (``auto``, ``reference``, ``xla``, ``pallas``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from torch import nn

from pemoe import adapters, layers
from pemoe.models.t5 import T5Config
from pemoe.models.t5_jax import params_from_torch, t5_logits
from pemoe.train import loop
from pemoe.train.data import Batch, Dataset, DataStream
from pemoe.train.evaluate import EvalResult, rank_classification
from pemoe.train.loop import CheckpointMismatch, ModelBundle, TrainConfig, TrainResult

__all__ = [
    "AdafactorState",
    "JaxTrainResult",
    "adafactor",
    "eval_model",
    "make_optimizer",
    "make_loss_fn",
    "make_train_step",
    "stack_batches",
    "parse_mesh",
    "split_params",
    "train",
]

FRAMEWORK = "jax"
#: Length buckets: batches are right-padded to a multiple of this (capped at the maximum length), so
#: ``jax.jit`` compiles a handful of shapes instead of one per batch.
LENGTH_BUCKET = 16

# ---------------------------------------------------------------------------------------------
# optimizer: torch.optim.Adafactor's rule as an optax transformation


class AdafactorState(NamedTuple):
    """``count``: steps taken (int32); ``moments``: per parameter name, ``row_var`` [..., R, 1] and
    ``col_var`` [..., 1, C] for ≥2-D parameters, ``variance`` (the parameter's shape) otherwise."""

    count: jax.Array
    moments: dict[str, dict[str, jax.Array]]


def adafactor(
    learning_rate: float, *, beta2_decay: float = -0.8, eps1: float | None = None, eps2: float = 1e-3, d: float = 1.0
) -> optax.GradientTransformation:
    """torch.optim.Adafactor (weight decay 0) as an optax transformation over a dict of arrays.

    Step t (from 1), per parameter θ with gradient g, w = t^beta2_decay, ρ = min(lr, 1/√t),
    α = max(eps2, RMS(θ)) · ρ:
      θ ≥ 2-D: r ← r + w (mean(g², −1) − r),  c ← c + w (mean(g², −2) − c),
               v̂ = (r c) / max(mean(r, −2), eps1)                     (r [..., R, 1], c [..., 1, C])
      else:    v ← v + w (g² − v),  v̂ = v
      u = g / √max(v̂, eps1²),  θ ← θ − α / max(1, RMS(u) / d) · u
    eps1 defaults to the parameter dtype's machine epsilon. The returned updates are the θ increments
    (apply with ``optax.apply_updates``); params are required.
    """

    def init_fn(params: Mapping[str, jax.Array]) -> AdafactorState:
        moments = {}
        for name, p in params.items():
            if p.ndim > 1:
                moments[name] = {
                    "row_var": jnp.zeros((*p.shape[:-1], 1), p.dtype),
                    "col_var": jnp.zeros((*p.shape[:-2], 1, p.shape[-1]), p.dtype),
                }
            else:
                moments[name] = {"variance": jnp.zeros_like(p)}
        return AdafactorState(jnp.zeros((), jnp.int32), moments)

    def update_fn(updates, state: AdafactorState, params=None):
        if params is None:
            raise ValueError("adafactor: params are required (the step size scales with RMS(param))")
        count = state.count + 1
        t = count.astype(jnp.float32)
        w = t**beta2_decay
        rho = jnp.minimum(learning_rate, 1.0 / jnp.sqrt(t))
        out, moments = {}, {}
        for name, g in updates.items():
            p = params[name]
            e1 = float(jnp.finfo(p.dtype).eps) if eps1 is None else eps1
            alpha = jnp.maximum(eps2, jnp.sqrt(jnp.mean(jnp.square(p)))) * rho
            m = state.moments[name]
            if g.ndim > 1:
                row = m["row_var"] + w * (jnp.mean(jnp.square(g), axis=-1, keepdims=True) - m["row_var"])
                col = m["col_var"] + w * (jnp.mean(jnp.square(g), axis=-2, keepdims=True) - m["col_var"])
                v_hat = jnp.matmul(row, col) / jnp.maximum(jnp.mean(row, axis=-2, keepdims=True), e1)
                moments[name] = {"row_var": row, "col_var": col}
            else:
                v_hat = m["variance"] + w * (jnp.square(g) - m["variance"])
                moments[name] = {"variance": v_hat}
            u = g * jax.lax.rsqrt(jnp.maximum(v_hat, e1 * e1))
            denom = jnp.maximum(1.0, jnp.sqrt(jnp.mean(jnp.square(u))) / d)
            out[name] = (-alpha / denom) * u
        return out, AdafactorState(count, moments)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """``cfg.optimizer`` at the constant ``cfg.lr``: :func:`adafactor` or ``optax.adamw`` (torch's defaults)."""
    if cfg.optimizer == "adafactor":
        return adafactor(cfg.lr)
    return optax.adamw(cfg.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


# ---------------------------------------------------------------------------------------------
# loss and step


def make_loss_fn(
    config: T5Config, adapter: adapters.AdapterConfig | None, implementation: str = "auto"
) -> Callable[[dict, dict, dict], tuple[jax.Array, jax.Array]]:
    """``loss_fn(trainable, frozen, batch) -> (loss_sum, n_tokens)``.

    batch: ``input_ids`` [B, S], ``attention_mask`` [B, S], ``decoder_input_ids`` [B, T], ``labels`` [B, T]
    (−100: ignored). loss_sum = −Σ log softmax(logits)[label] over the valid targets (float32),
    n_tokens = their count (int32). ``trainable`` and ``frozen`` together are the
    :func:`~pemoe.models.t5_jax.t5_logits` params.
    """

    def loss_fn(trainable: dict, frozen: dict, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        logits = t5_logits(
            {**frozen, **trainable},
            config,
            batch["input_ids"],
            batch["decoder_input_ids"],
            batch["attention_mask"],
            implementation=implementation,
            adapter=adapter,
        )
        labels = batch["labels"]
        valid = labels != -100
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid, dtype=jnp.int32)

    return loss_fn


StepFn = Callable[[dict, Any, dict, dict], tuple[dict, Any, jax.Array]]


def make_train_step(
    loss_fn: Callable[[dict, dict, dict], tuple[jax.Array, jax.Array]],
    optimizer: optax.GradientTransformation,
    mesh: Any = None,
) -> StepFn:
    """``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss)``, jitted.

    batch arrays are [A, B, ...]: A micro-batches (gradient accumulation) of B examples. The step takes the
    gradient of ``Σ loss_sum / Σ n_tokens`` over all A·B examples (loss = that mean) and applies one
    optimizer update. ``mesh`` (a ``jax.sharding.Mesh``): the step of :func:`pemoe.jax.parallel.make_train_step`
    on the A·B examples as one batch sharded over the mesh's "data" axis (the same global token mean).
    """
    if mesh is not None:
        from pemoe.jax import parallel

        sharded = parallel.make_train_step(loss_fn, optimizer, mesh)

        def mesh_step(trainable, opt_state, frozen, batch):
            flat = {k: v.reshape(v.shape[0] * v.shape[1], *v.shape[2:]) for k, v in batch.items()}
            return sharded(trainable, opt_state, frozen, parallel.shard_batch(flat, mesh))

        return mesh_step

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def step(trainable, opt_state, frozen, batch):
        def body(carry, micro):
            grads, loss_sum, n = carry
            (l_sum, n_tok), g = value_and_grad(trainable, frozen, micro)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + l_sum, n + n_tok), None

        init = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        (grads, loss_sum, n), _ = jax.lax.scan(body, init, batch)
        denom = jnp.maximum(n, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss_sum / denom

    return jax.jit(step)


def _bucket(length: int, cap: int) -> int:
    return min(cap, -(-length // LENGTH_BUCKET) * LENGTH_BUCKET)


def stack_batches(micro: Sequence[Batch], max_input_len: int, max_target_len: int) -> dict[str, np.ndarray]:
    """Micro-batches (:func:`pemoe.train.data.encode_batch`) -> int32 arrays [A, B, S] / [A, B, T], right-padded
    (pad id 0, mask 0, label −100) to a common length rounded up to :data:`LENGTH_BUCKET`."""
    s_len = _bucket(max(b.input_ids.shape[1] for b in micro), max_input_len)
    t_len = _bucket(max(b.labels.shape[1] for b in micro), max_target_len)

    def pad(t: torch.Tensor, length: int, value: int) -> np.ndarray:
        a = t.numpy().astype(np.int32)
        return np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=value)

    out = {
        "input_ids": [pad(b.input_ids, s_len, 0) for b in micro],
        "attention_mask": [pad(b.attention_mask, s_len, 0) for b in micro],
        "decoder_input_ids": [pad(b.decoder_input_ids, t_len, 0) for b in micro],
        "labels": [pad(b.labels, t_len, -100) for b in micro],
    }
    return {k: np.stack(v) for k, v in out.items()}


def split_params(model: nn.Module, trainable_names: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen) params dicts of an injected torch T5 (names as :func:`params_from_torch`)."""
    params = params_from_torch(model)
    missing = [n for n in trainable_names if n not in params]
    if missing:
        raise ValueError(f"adapter parameter(s) {missing[:4]} are not in params_from_torch(model)")
    trainable = {n: params.pop(n) for n in trainable_names}
    return trainable, params


# ---------------------------------------------------------------------------------------------
# options that the JAX loop does not have


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=N[,model=M]"`` -> ``{"data": N, "model": M}`` (model defaults to 1)."""
    out = {"model": 1}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in ("data", "model") or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh must be data=N[,model=M] with positive integers, got {text!r}")
        out[key] = int(value)
    if "data" not in out:
        raise ValueError(f"--mesh must name the data axis (data=N[,model=M]), got {text!r}")
    return out


def _jax_ops_used(cfg: TrainConfig) -> tuple[str, ...]:
    if cfg.method in ("molora", "lora"):
        return ("molora_linear",)
    sites = cfg.sites if cfg.sites is not None else ("k", "v", "ffn")
    return ("mov_linear",) * any(s in ("k", "v") for s in sites) + ("mov_ffn",) * ("ffn" in sites)


def check_config(cfg: TrainConfig) -> None:
    """ValueError for the TrainConfig settings the JAX loop does not support (see the module docstring)."""
    from pemoe.jax.ops import AVAILABLE, PLANNED, resolve_implementation
    from pemoe.train.models import CAUSAL_PRESETS

    if cfg.init in CAUSAL_PRESETS:
        raise ValueError(f"--framework jax trains T5 only; --init {cfg.init} (a causal LM) needs --framework torch")
    if cfg.method == "full":
        raise ValueError(
            "--framework jax trains adapters only (mov, ia3, molora, lora); use --framework torch for --method full"
        )
    if getattr(cfg, "parallel", "auto") not in ("auto", "none"):
        raise ValueError(
            f"--parallel {cfg.parallel} is torch.distributed; with --framework jax use --mesh data=N[,model=M]"
        )
    if cfg.dropout not in (None, 0.0):
        raise ValueError(f"--framework jax has no dropout (pemoe.models.t5_jax); got --dropout {cfg.dropout}")
    if getattr(cfg, "balance_loss", 0.0) > 0:
        raise ValueError("--balance-loss (pemoe.router_health) is --framework torch only")
    names = {"auto", *PLANNED, *(i for impls in AVAILABLE.values() for i in impls)}
    if cfg.implementation not in names:
        raise ValueError(
            f"--implementation {cfg.implementation!r} is not a pemoe.jax implementation; with --framework jax "
            f"use one of {sorted(names)}"
        )
    for op in _jax_ops_used(cfg):
        try:
            resolve_implementation(op, cfg.implementation)
        except NotImplementedError as e:
            raise ValueError(f"--implementation {cfg.implementation}: {e}") from None


# ---------------------------------------------------------------------------------------------
# checkpoints


def _flatten_state(opt_state: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _unflatten_state(template: Any, tensors: Mapping[str, np.ndarray], where: pathlib.Path) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [jax.tree_util.keystr(path) for path, _ in leaves]
    missing, unexpected = sorted(set(keys) - set(tensors)), sorted(set(tensors) - set(keys))
    if missing or unexpected:
        raise CheckpointMismatch(
            f"checkpoint {where}: optimizer state does not fit this run: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}"
        )
    out = []
    for key, (_, leaf) in zip(keys, leaves, strict=True):
        t = tensors[key]
        if t.shape != leaf.shape or t.dtype != np.dtype(leaf.dtype):
            raise CheckpointMismatch(
                f"checkpoint {where}: optimizer leaf {key} is {t.dtype}{list(t.shape)}, this run's is "
                f"{np.dtype(leaf.dtype)}{list(leaf.shape)}"
            )
        out.append(jnp.asarray(t))
    return jax.tree_util.tree_unflatten(treedef, out)


def _to_torch(bundle: ModelBundle, trainable: Mapping[str, jax.Array]) -> None:
    """Copy the JAX adapter weights into the torch model (bit-exact, float32)."""
    adapters.load_adapter_state_dict(bundle.model, {k: torch.from_numpy(np.array(v)) for k, v in trainable.items()})


def _save_checkpoint(
    out: pathlib.Path,
    step: int,
    bundle: ModelBundle,
    cfg: TrainConfig,
    names: list[str],
    trainable: dict,
    opt_state: Any,
    stream: DataStream,
    identity: dict,
    extra: dict,
) -> pathlib.Path:
    from safetensors.numpy import save_file

    final = loop._checkpoint_dir(out, step)
    if (final / "state.json").is_file():
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _to_torch(bundle, trainable)
    adapters.save_adapter(bundle.model, tmp / "adapter.safetensors")
    tensors = _flatten_state(opt_state)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {
        "format": loop.CKPT_FORMAT,
        "version": loop.CKPT_VERSION,
        "framework": FRAMEWORK,
        "step": step,
        "data_stream": stream.state_dict(),
        "identity": identity,
        "param_names": names,
        "optimizer": {"name": cfg.optimizer, "leaves": list(tensors)},
        **extra,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    return loop._commit_checkpoint(tmp, final, cfg.keep_checkpoints)


def _load_checkpoint(
    path: pathlib.Path,
    bundle: ModelBundle,
    names: list[str],
    opt_template: Any,
    stream: DataStream,
    identity: dict,
) -> tuple[dict, Any, dict]:
    """(trainable, opt_state, state.json) of a checkpoint written by this loop; stream is restored."""
    state = loop._read_checkpoint_state(path, identity, names, framework=FRAMEWORK)
    adapters.load_adapter(bundle.model, path / "adapter.safetensors")  # checks config, keys and shapes
    weights = adapters.adapter_state_dict(bundle.model)
    trainable = {n: jnp.asarray(weights[n].detach().numpy()) for n in names}
    opt_state = _unflatten_state(opt_template, loop.read_tensors(path / "optimizer.safetensors", "np"), path)
    stream.load_state_dict(state["data_stream"])
    return trainable, opt_state, state


# ---------------------------------------------------------------------------------------------
# evaluation: rank classification (pemoe.train.evaluate) on the JAX forward


class _JaxT5(nn.Module):
    """The JAX T5 behind a torch-module call (``model(input_ids=..., ...).logits``), so that
    :func:`pemoe.train.evaluate.rank_classification` scores choices with the very same math."""

    def __init__(self, logits_fn: Callable, frozen: dict) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # evaluate reads the device from it
        self.logits_fn, self.frozen, self.trainable = logits_fn, frozen, None

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None, use_cache=None):
        s_len, t_len = input_ids.shape[1], decoder_input_ids.shape[1]
        s_pad, t_pad = _bucket(s_len, 1 << 30) - s_len, _bucket(t_len, 1 << 30) - t_len

        def arr(t: torch.Tensor, pad: int) -> np.ndarray:  # a host array: jit replicates it over a mesh
            return np.pad(t.numpy().astype(np.int32), ((0, 0), (0, pad)))

        logits = self.logits_fn(
            self.trainable,
            self.frozen,
            arr(input_ids, s_pad),
            arr(decoder_input_ids, t_pad),
            arr(attention_mask, s_pad),
        )
        return SimpleNamespace(logits=torch.from_numpy(np.array(np.asarray(logits)[:, :t_len], dtype=np.float32)))


def eval_model(
    config: T5Config, adapter: adapters.AdapterConfig | None, implementation: str, frozen: dict, mesh: Any = None
) -> _JaxT5:
    """A torch-callable JAX T5 for :func:`pemoe.train.evaluate.score_choices` / ``rank_classification``: the
    jitted :func:`~pemoe.models.t5_jax.t5_logits` on ``frozen`` plus the adapter params set in ``.trainable``.
    ``mesh``: the logits come back replicated over it (every process reads them whole)."""

    def eval_logits(trainable, frozen, input_ids, decoder_input_ids, attention_mask):
        params = {**frozen, **trainable}
        return t5_logits(
            params, config, input_ids, decoder_input_ids, attention_mask, implementation=implementation, adapter=adapter
        )

    if mesh is None:
        return _JaxT5(jax.jit(eval_logits), frozen)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return _JaxT5(jax.jit(eval_logits, out_shardings=NamedSharding(mesh, P())), frozen)


# ---------------------------------------------------------------------------------------------
# the loop


@dataclasses.dataclass
class JaxTrainResult(TrainResult):
    """:class:`~pemoe.train.loop.TrainResult` plus the final JAX state (``bundle.model`` holds the same
    adapter weights)."""

    params: dict | None = None
    opt_state: Any = None


def _effective_dropout(cfg: TrainConfig, bundle: ModelBundle) -> float:
    return float(cfg.dropout if cfg.dropout is not None else bundle.t5_config.get("dropout_rate", 0.0))


def _make_mesh(mesh: str | Mapping[str, int] | None, cfg: TrainConfig):
    if mesh is None:
        return None
    shape = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
    try:
        from pemoe.jax import parallel
    except ImportError:
        raise ValueError("--mesh needs pemoe.jax.parallel, which this installation does not have") from None
    global_batch = cfg.batch_size * cfg.grad_accum
    if global_batch % shape["data"]:
        raise ValueError(
            f"--mesh data={shape['data']} must divide the examples per step (batch_size x grad_accum = {global_batch})"
        )
    return parallel.make_mesh(data=shape["data"], model=shape.get("model", 1))


_COMPILED: dict[tuple, Any] = {}  # jitted steps / eval models by what they compute: later runs reuse them


def _cached(key: tuple, make: Callable[[], Any]) -> Any:
    """The jitted function for ``key`` (made once per process, at most 8 kept), so that a second run with the
    same model, adapter and optimizer settings (e.g. a resume in the same process) does not recompile."""
    if key not in _COMPILED:
        while len(_COMPILED) >= 8:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = make()
    return _COMPILED[key]


def train(
    cfg: TrainConfig,
    *,
    mesh: str | Mapping[str, int] | None = None,
    distributed: Mapping[str, Any] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> JaxTrainResult:
    """Run ``pemoe train --framework jax`` (see the module docstring); same outputs as
    :func:`pemoe.train.loop.train`. ``mesh``: ``"data=N[,model=M]"`` runs the step over a device mesh
    (:mod:`pemoe.jax.parallel`). ``distributed``: join a multi-process job first, the keyword arguments of
    :func:`pemoe.jax.parallel.initialize_distributed` (``{}``: JAX's cluster detection); the mesh then
    defaults to ``data=<every device of every process>``. ``on_step(step, loss)`` is called after every
    completed step."""
    process, processes = 0, 1
    if distributed is not None:
        from pemoe.jax import parallel

        process, processes = parallel.initialize_distributed(**distributed)  # before anything touches a device
        if mesh is None:
            mesh = f"data={jax.device_count()}"
    main = process == 0
    check_config(cfg)
    out, data, eval_data = loop._open_run(cfg)
    device_mesh = _make_mesh(mesh, cfg)
    bundle = loop.build_model(cfg)
    if bundle.kind == "causal":
        raise ValueError(f"--framework jax trains T5 only; --model {cfg.model} is a causal LM: use --framework torch")
    if _effective_dropout(cfg, bundle) != 0.0:
        raise ValueError(
            f"--framework jax has no dropout, and this model's dropout_rate is {_effective_dropout(cfg, bundle)}: "
            "pass --dropout 0"
        )
    named = loop._prepare(bundle, _torch_side(cfg), verbose=main)
    names = [n for n, _ in named]
    trainable, frozen = split_params(bundle.model, names)
    if device_mesh is not None:
        from pemoe.jax import parallel

        frozen = parallel.shard_frozen(frozen, device_mesh)
    t5_config = T5Config(**bundle.t5_config)
    adapter = adapters.adapter_config(bundle.model)
    optimizer = make_optimizer(cfg)
    opt_state = optimizer.init(trainable)
    key = (json.dumps(bundle.t5_config, sort_keys=True), json.dumps(adapter.to_dict(), sort_keys=True))
    key += (
        cfg.implementation,
        cfg.optimizer,
        cfg.lr,
        None if device_mesh is None else tuple(device_mesh.shape.items()),
    )
    step_fn = _cached(
        ("step", *key),
        lambda: make_train_step(make_loss_fn(t5_config, adapter, cfg.implementation), optimizer, device_mesh),
    )
    stream = DataStream(len(data.examples), cfg.batch_size, cfg.seed)
    identity = loop._identity(cfg, bundle, data)

    step, tokens_seen = 0, 0
    if cfg.resume:
        ckpt = loop._resume_checkpoint(cfg, out)
        trainable, opt_state, state = _load_checkpoint(ckpt, bundle, names, opt_state, stream, identity)
        step, tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        if main:
            print(f"pemoe train: resumed from {ckpt} at step {step}", file=sys.stderr)
    if processes > 1:  # every process must start from the same state (same seed, same checkpoint)
        same = {k: identity[k] for k in ("model", "tokenizer", "adapter_config")}  # contents, not paths
        same["data"] = {k: identity["data"][k] for k in ("fingerprint", "num_examples")}
        _check_processes_agree(
            "backbone, tokenizer, data, adapter parameters, optimizer state, step and data position (same --seed, "
            "--init/--model, --data and --resume checkpoint: --out must be a directory shared by every process)",
            (json.dumps(same, sort_keys=True), trainable, opt_state, step, stream.state_dict()),
        )
    if device_mesh is not None:
        trainable, opt_state = parallel.replicate((trainable, opt_state), device_mesh)
    result = JaxTrainResult(
        step=step, interrupted=False, start_step=step, skipped_lines=list(data.skipped), rank=process
    )
    count = layers.count_parameters(bundle.model)
    result.trainable, result.total, result.bundle = count.trainable, count.total, bundle
    run_config = {
        **cfg.to_dict(),
        "framework": FRAMEWORK,
        "mesh": mesh if isinstance(mesh, str) or mesh is None else dict(mesh),
        **({"processes": processes} if processes > 1 else {}),
    }
    if main:
        (out / "train_config.json").write_text(json.dumps(run_config, indent=1))

    metrics = loop._Metrics(out / "metrics.jsonl", step) if main else loop._NoMetrics()
    progress = loop._Progress(cfg.max_steps, step, cfg.progress and main, cfg.log_every if main else 0)
    jax_model = None

    def checkpoint() -> pathlib.Path:
        path = loop._checkpoint_dir(out, step)
        if main:  # process 0 writes; the others hold the same state
            extra = {"tokens_seen": tokens_seen, "trainable": count.trainable, "total": count.total}
            path = _save_checkpoint(out, step, bundle, cfg, names, trainable, opt_state, stream, identity, extra)
        if processes > 1:  # no process goes on (e.g. to --resume from it) before the checkpoint is complete
            from pemoe.jax import parallel

            parallel.sync_processes(f"pemoe checkpoint {step}")
        return path

    def run_eval() -> None:  # every process evaluates (the backbone is spread over all of them); process 0 reports
        nonlocal jax_model
        if jax_model is None:
            jax_model = _cached(
                ("eval", *key[:3], key[-1]),
                lambda: eval_model(t5_config, adapter, cfg.implementation, {}, device_mesh),
            )
            jax_model.frozen = frozen
        jax_model.trainable = trainable
        res = _evaluate(jax_model, bundle, cfg, eval_data)
        result.evals.append((step, res))
        metrics.write({"kind": "eval", "step": step, **res.to_dict()})
        if main:
            progress.write(f"step {step}: held-out rank-classification accuracy {100 * res.average:.1f}%")

    batch: dict[str, np.ndarray] | None = None

    def stop_agreed(requested: bool) -> bool:
        """One process: ``requested``. Several: whether any process got SIGINT, after checking that every
        process trained the last step on the same batch."""
        if processes == 1:
            return requested
        from pemoe.jax import parallel

        fp = parallel.fingerprint(batch) if batch is not None else np.zeros(8, np.uint32)
        rows = parallel.gather_from_processes(np.concatenate([[np.uint32(requested)], fp]))
        differ = [p for p in range(processes) if not np.array_equal(rows[p, 1:], rows[0, 1:])]
        if differ:
            raise ValueError(
                f"pemoe train: process(es) {differ} trained step {step} on another batch than process 0: every "
                "process must read the same --data with the same --seed, --batch-size and --grad-accum"
            )
        return bool(rows[:, 0].any())

    try:
        stopping = False  # SIGINT on any process, agreed by all before each step
        with loop._StopFlag() as stop:
            while step < cfg.max_steps and not (stopping := stop_agreed(stop.requested)):
                t0 = time.perf_counter()
                micro = loop._next_micro_batches(data, stream, bundle, cfg)
                n_tokens = sum(b.num_input_tokens + b.num_target_tokens for b in micro)
                batch = stack_batches(micro, cfg.max_input_len, cfg.max_target_len)
                trainable, opt_state, loss = step_fn(trainable, opt_state, frozen, batch)
                loss_value = float(loss)
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
                    }
                )
                progress.update(step, loss_value, n_tokens / dt)
                if on_step is not None:
                    on_step(step, loss_value)
                if eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    run_eval()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    result.checkpoint = checkpoint()
            if not stopping:  # max_steps reached (the loop did not ask): check the last step's batch too
                stop_agreed(stop.requested)
            result.interrupted = stopping and step < cfg.max_steps
            result.step = step
            result.checkpoint = checkpoint()  # still under the SIGINT flag: a Ctrl-C cannot cut it short
        if result.interrupted:
            if main:
                progress.write(
                    f"pemoe train: interrupted; step {step} saved in {result.checkpoint} (resume with --resume)"
                )
        else:
            if eval_data is not None and not (result.evals and result.evals[-1][0] == step):
                run_eval()
            if main:
                _to_torch(bundle, trainable)
                adapters.save_adapter(bundle.model, out / "adapter.safetensors")
    finally:
        progress.close()
        metrics.close()
    _to_torch(bundle, trainable)
    result.params, result.opt_state = trainable, opt_state
    if result.evals and main:
        from pemoe.train.evaluate import format_table

        (out / "eval.md").write_text(format_table({f"step {result.evals[-1][0]}": result.evals[-1][1]}) + "\n")
    return result


def _check_processes_agree(what: str, tree: Any) -> None:
    """ValueError unless every process holds the same host values ``tree`` (a fingerprint each)."""
    from pemoe.jax import parallel

    rows = parallel.gather_from_processes(parallel.fingerprint(tree))
    differ = [p for p in range(rows.shape[0]) if not np.array_equal(rows[p], rows[0])]
    if differ:
        raise ValueError(f"pemoe train: process(es) {differ} do not hold the same {what} as process 0")


def _torch_side(cfg: TrainConfig) -> TrainConfig:
    """The config the torch model is built and injected with: the torch ops never run here, so the injected
    adapter config (saved with every adapter file) carries implementation "auto", loadable by torch."""
    return dataclasses.replace(cfg, implementation="auto")


def _evaluate(model: _JaxT5, bundle: ModelBundle, cfg: TrainConfig, data: Dataset) -> EvalResult:
    return rank_classification(
        model,
        bundle.tokenizer,
        data.examples,
        batch_size=cfg.eval_batch_size,
        max_input_len=cfg.max_input_len,
        max_target_len=cfg.max_target_len,
        decoder_start_id=bundle.decoder_start_id,
    )
