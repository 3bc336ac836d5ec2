"""Training pemoe-injected models with ``transformers.Trainer`` and TRL's ``SFTTrainer``.

An injected model is still the transformers model it was (pemoe swaps modules in place), so ``Trainer``
trains it as is: only the adapter parameters require grad, and Trainer's default optimizer takes only
those. What plain ``Trainer`` gets wrong is the checkpoint: it calls ``model.save_pretrained``, which writes
the whole frozen backbone at every save, and resuming reloads it. PEFT avoids this because its
``PeftModel.save_pretrained`` writes adapters only. pemoe does not wrap the model (a wrapper would change
the model's class, attribute paths and ``generate``); instead :class:`PemoeTrainer` — ``Trainer`` with four
methods overridden — and :func:`pemoe_trainer` (the same for any ``Trainer`` subclass, e.g.
``pemoe_trainer(trl.SFTTrainer)``, available as :data:`PemoeSFTTrainer`) make Trainer:

* **save adapters only**: every checkpoint and ``trainer.save_model(dir)`` write ``pemoe_adapter.safetensors``
  (:func:`pemoe.save_adapter`: adapter tensors, float32, with the adapter config as metadata; written
  atomically) instead of the model's weights. Trainer itself adds ``optimizer.pt`` (adapter state only,
  since the optimizer holds only adapters), ``scheduler.pt``, ``rng_state.pth`` and ``trainer_state.json``;
* **resume exactly**: ``trainer.train(resume_from_checkpoint=...)`` loads the adapter file into the model
  (:func:`pemoe.load_adapter`: bit-exact, and refused with the differing config fields named when the
  checkpoint was written for another adapter config) and Trainer restores the rest, so on the CPU with fixed
  seeds the resumed run ends with the uninterrupted run's adapters, bit for bit;
  ``load_best_model_at_end`` loads adapters the same way;
* **refuse an optimizer that would touch frozen weights**: the optimizer (Trainer's own, or one given with
  ``optimizers=``) may hold adapter parameters only; a backbone weight in it (e.g. one unfrozen by other
  code, which Trainer's default optimizer would pick up) is a ``ValueError`` naming it;
* **log router health** (:mod:`pemoe.router_health`): at each training log, per routed site the mean routing
  entropy, the largest mean expert probability and the load over experts (``router/<site>/entropy``,
  ``/max_prob``, ``/load_<e>``, plus ``router/entropy_mean``, ``/entropy_min`` and ``/max_prob_max``) over the
  tokens of the logged optimizer step (all its micro-batches; with ``balance_loss`` on, of every step since the
  previous log), computed by hooks during the training forward passes (no second forward);
  ``router_stats="summary"`` logs the three summary values only, ``None`` nothing;
  the hooks stay on the model, idle, after training: ``trainer.router_monitor.remove()`` takes them off;
* add an optional **load-balancing loss** ``balance_loss`` · KL(P̄ ‖ uniform) averaged over the sites
  (:meth:`pemoe.router_health.RouterMonitor.balance_loss`; 0, the default and the paper's setting, adds nothing).

Usage (the model is injected first; a plain model is refused)::

    pemoe.inject(model, pemoe.MoVConfig(num_experts=8))
    trainer = pemoe.hf.PemoeTrainer(model=model, args=TrainingArguments(...), train_dataset=ds)
    trainer.train()                                   # checkpoints: adapters + optimizer/scheduler/state
    trainer.train(resume_from_checkpoint=True)        # continues exactly

    trainer = pemoe.hf.PemoeSFTTrainer(model=model, args=trl.SFTConfig(...), train_dataset=ds)

Gradient accumulation is Trainer's (the token-mean loss over the whole accumulated batch, from
``num_items_in_batch``), with one repair: encoder-decoder models such as T5 accept ``num_items_in_batch`` but
ignore it, which makes Trainer sum the micro-batches' means; :class:`PemoeTrainer` computes their loss as
Σ CE / ``num_items_in_batch`` itself, so k micro-batches of b equal one batch of k·b (for an encoder-decoder
model under ``SFTTrainer`` this replaces TRL's ``compute_loss``, whose extra token-accuracy and entropy logs
are then absent). Mixed precision is
Trainer's: the adapters are float32 parameters, so ``bf16=True`` (autocast) leaves them float32 and the ops run
their router in float32.
"""

from __future__ import annotations

import math
import os
import pathlib

import torch
from torch import nn
from transformers import Trainer

from pemoe.injection import _require_injected, adapter_state_dict
from pemoe.router_health import RouterMonitor, routed_sites, stats_to_logs
from pemoe.serialization import load_adapter, save_adapter

__all__ = ["ADAPTER_FILE", "PemoeTrainer", "PemoeSFTTrainer", "pemoe_trainer", "check_optimizer"]  # noqa: F822 (lazy)

#: The adapter file in a checkpoint or ``save_model`` folder (not PEFT's ``adapter_model.safetensors``, so that
#: Trainer's and PEFT's own loaders never take it for a PEFT adapter).
ADAPTER_FILE = "pemoe_adapter.safetensors"

ROUTER_STATS = ("sites", "summary", None)


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` naming the parameters of ``optimizer`` that are not adapter parameters of the
    injected ``model`` (frozen backbone weights an optimizer step could change, e.g. through weight decay or
    after other code unfroze them)."""
    adapters = {id(p) for p in adapter_state_dict(model).values()}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    foreign = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in adapters]
    if foreign:
        listed = [f"{names.get(id(p), '<not a parameter of the model>')} (requires_grad={p.requires_grad})"
                  for p in foreign[:4]]  # fmt: skip
        raise ValueError(
            f"the optimizer holds {len(foreign)} parameter(s) that are not pemoe adapters, e.g. {', '.join(listed)}: "
            "it would update frozen backbone weights. Build the optimizer over pemoe.adapters.adapter_state_dict"
            "(model).values() (Trainer's default optimizer does so while the backbone stays frozen) and keep the "
            "backbone frozen"
        )


class _PemoeTrainerMixin:
    """The overrides of :class:`PemoeTrainer` (see the module docstring), for any ``Trainer`` subclass."""

    def __init__(self, *args, balance_loss: float = 0.0, router_stats: str | None = "sites", **kwargs) -> None:
        if router_stats not in ROUTER_STATS:
            raise ValueError(f"router_stats must be one of {list(ROUTER_STATS)}, got {router_stats!r}")
        if isinstance(balance_loss, bool) or not isinstance(balance_loss, (int, float)) or not balance_loss >= 0:
            raise ValueError(f"balance_loss must be a number >= 0, got {balance_loss!r}")
        super().__init__(*args, **kwargs)
        model = self.model
        _require_injected(model)  # a model without adapters: ValueError saying to inject first
        self.balance_loss, self.router_stats = float(balance_loss), router_stats
        self.router_monitor: RouterMonitor | None = None
        if (router_stats is not None or self.balance_loss > 0) and routed_sites(model):
            self.router_monitor = RouterMonitor(model, balance=self.balance_loss > 0)
            self.router_monitor.enabled = False  # on during training steps only
        elif self.balance_loss > 0:
            raise ValueError("balance_loss needs routed adapters (num_experts > 1); this model's sites have no router")

    # -- the optimizer

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        check_optimizer(self.model, optimizer)
        return optimizer

    # -- router health

    def training_step(self, model: nn.Module, inputs, num_items_in_batch=None) -> torch.Tensor:
        monitor = self.router_monitor
        if monitor is None:
            return super().training_step(model, inputs, num_items_in_batch)
        monitor.enabled = self.balance_loss > 0 or self._router_stats_due()
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            monitor.enabled = False
            if monitor.balance:
                monitor.balance_loss(clear=True)  # drop graphs a subclass's loss did not consume

    def _seq2seq_token_sum_loss(self, model: nn.Module, inputs, num_items_in_batch):
        """Encoder-decoder models (T5) take ``num_items_in_batch`` in ``**kwargs`` but ignore it and return the
        micro-batch's token mean, while Trainer, seeing the ``**kwargs``, treats that loss as already divided over
        the accumulated batch: with gradient accumulation the gradient would be the *sum* of the micro-batch
        means (k times too large for k micro-batches). Here the loss is Σ CE over the micro-batch's target
        tokens / ``num_items_in_batch`` (the accumulated batch's target count), which makes k micro-batches of
        b equal one batch of k·b. None when Trainer's own loss is right (no labels, label smoothing, a
        ``compute_loss_func``, a decoder-only model, or no accumulation count)."""
        config = getattr(self.accelerator.unwrap_model(model), "config", None)
        if (
            num_items_in_batch is None
            or not self.model_accepts_loss_kwargs
            or not getattr(config, "is_encoder_decoder", False)
            or "labels" not in inputs
            or self.label_smoother is not None
            or self.compute_loss_func is not None
        ):
            return None
        outputs = model(**inputs)
        logits, labels = outputs["logits"], inputs["labels"]
        loss = nn.functional.cross_entropy(
            logits.float().flatten(0, -2), labels.to(logits.device).flatten(), ignore_index=-100, reduction="sum"
        )
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device, dtype=loss.dtype)
        if self.args.average_tokens_across_devices:  # as Trainer.compute_loss: the count spans all processes
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss, outputs

    def _router_stats_due(self) -> bool:
        """Whether the step in progress will be logged (so its statistics are wanted): the hooks' work (one
        extra [T, F] product per fused FFN site) is then done on logged steps only."""
        if self.router_stats is None:
            return False
        args, step = self.args, self.state.global_step + 1  # global_step counts completed optimizer steps
        if args.logging_strategy != "steps":
            return True  # epoch-wise logging: the log's step is not known in advance
        every = self.state.logging_steps or args.logging_steps  # the state's: a fraction resolved to steps
        return step % max(1, math.ceil(every)) == 0 or (step == 1 and args.logging_first_step)

    def compute_loss(self, model: nn.Module, inputs, return_outputs: bool = False, num_items_in_batch=None):
        result = self._seq2seq_token_sum_loss(model, inputs, num_items_in_batch)
        if result is None:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        elif not return_outputs:
            result = result[0]
        monitor = self.router_monitor
        if self.balance_loss <= 0 or monitor is None or not monitor.enabled or not torch.is_grad_enabled():
            return result
        loss, outputs = result if return_outputs else (result, None)
        aux = self.balance_loss * monitor.balance_loss(clear=True)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # the model's loss is already divided over the accumulated batch; the per-micro-batch
            # balancing term must be too, or accumulation would weigh it gradient_accumulation_steps times
            aux = aux / max(getattr(self, "current_gradient_accumulation_steps", 1), 1)
        loss = loss + aux.to(loss.device, loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        monitor = self.router_monitor
        if monitor is not None and self.router_stats is not None and "loss" in logs:
            logs.update(stats_to_logs(monitor.stats(reset=True), per_site=self.router_stats == "sites"))
        super().log(logs, *args, **kwargs)

    # -- adapters-only checkpoints

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(self.accelerator.unwrap_model(self.model), pathlib.Path(output_dir) / ADAPTER_FILE)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_adapter_from(self, folder: str, model: nn.Module | None) -> None:
        path = pathlib.Path(folder) / ADAPTER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} holds no {ADAPTER_FILE}: not a checkpoint written by pemoe.hf's Trainer (a plain "
                "transformers.Trainer checkpoint stores the whole model instead)"
            )
        model = self.model if model is None else model
        try:
            load_adapter(self.accelerator.unwrap_model(model), path)
        except ValueError as e:
            raise ValueError(f"cannot resume from {folder}: {e}") from e

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._load_adapter_from(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        self._load_adapter_from(self.state.best_model_checkpoint, None)


def pemoe_trainer(trainer_cls: type[Trainer]) -> type[Trainer]:
    """A subclass of ``trainer_cls`` (``transformers.Trainer`` or a subclass, e.g. TRL's ``SFTTrainer``) that
    saves adapters only, resumes exactly, checks the optimizer and logs router health (module docstring).
    Its constructor takes ``trainer_cls``'s arguments plus ``balance_loss`` (default 0) and ``router_stats``
    (``"sites"``, ``"summary"`` or None)."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"pemoe_trainer expects transformers.Trainer or a subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, _PemoeTrainerMixin):
        return trainer_cls
    return type(
        f"Pemoe{trainer_cls.__name__}",
        (_PemoeTrainerMixin, trainer_cls),
        {"__module__": __name__, "__doc__": f"{trainer_cls.__name__} for pemoe-injected models (pemoe.hf)."},
    )


#: ``transformers.Trainer`` for pemoe-injected models (see the module docstring).
PemoeTrainer = pemoe_trainer(Trainer)


def __getattr__(name: str):
    if name == "PemoeSFTTrainer":  # TRL is imported on first use only
        from trl import SFTTrainer

        cls = pemoe_trainer(SFTTrainer)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
