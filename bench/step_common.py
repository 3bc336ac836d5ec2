"""The machinery shared by the whole-model training-step benchmarks (bench/t5_step.py, bench/llama_step.py).

A step benchmark times one training step (forward, backward, optimizer step) of a transformers model per
adapter method. Every provider's model is built from the same frozen random backbone (one per shape, dtype
and device, cached here and shared by storage, so that every provider runs the same weights and the models
cost one backbone's memory); the providers differ only in the adapter injected into it:

* the floor — no adapter: forward and backward to the input embeddings, which are the only tensors
  requiring grad; no optimizer;
* PEFT's adapters (:func:`peft_adapter`), and pemoe's (:func:`pemoe_adapter`, :func:`pemoe.adapters.inject`).

The loss is the model's own cross-entropy; the step adds ``torch.optim.Adafactor`` (lr 3e-4, no momentum:
the paper's optimizer) over the trainable parameters. The inputs dict carries the backbone's dtype
(``dtype_probe``) and widths (``widths``) next to the token ids, because the harness hands providers only
tensors and the models are built lazily from them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pemoe.bench.harness import OpBench, Provider

Adapt = Callable[[nn.Module], nn.Module]

#: one frozen backbone at a time, (build, shape, dtype, device) -> model: the providers of one group share it
_backbones: dict[tuple, nn.Module] = {}


@dataclass(frozen=True)
class Family:
    """A model family a step benchmark trains: ``build(shape)`` makes a randomly initialised model of the
    shape's widths (on the current default device), ``width_keys`` are the shape keys it reads."""

    build: Callable[[dict[str, int]], nn.Module]
    width_keys: tuple[str, ...]

    def inputs(
        self, shape: dict[str, int], dtype: torch.dtype, device: torch.device, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``tensors`` (token ids, labels) on ``device`` with the backbone's dtype and widths added."""
        inputs = {
            **tensors,
            "dtype_probe": torch.zeros((), dtype=dtype),
            "widths": torch.tensor([shape[k] for k in self.width_keys]),
        }
        return {k: v.to(device) for k, v in inputs.items()}

    def shape_of(self, i: dict[str, torch.Tensor]) -> dict[str, int]:
        """The model widths the inputs were made for."""
        return dict(zip(self.width_keys, i["widths"].tolist(), strict=True))

    def key(self, i: dict[str, torch.Tensor]) -> tuple:
        """What identifies a backbone: family, widths, dtype and device."""
        return (self.build, tuple(sorted(self.shape_of(i).items())), i["dtype_probe"].dtype, i["input_ids"].device)

    def model(self, i: dict[str, torch.Tensor]) -> nn.Module:
        """A frozen model in training mode whose weights and buffers share storage with the cached random
        backbone of this family, widths, dtype and device (built with seed 0 on first use)."""
        key = self.key(i)
        shape = self.shape_of(i)
        if key not in _backbones:
            torch.manual_seed(0)
            base = self.build(shape).to(device=key[3], dtype=key[2])
            _backbones.clear()
            _backbones[key] = base
        base = _backbones[key]
        with torch.device("meta"):
            model = self.build(shape)
        model.load_state_dict(base.state_dict(), assign=True)
        # buffers outside the state dict (non-persistent, e.g. rotary frequencies) are the base's own
        for name, buf in base.named_buffers():
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, buf)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"step benchmark: {type(model).__name__} tensors not taken from the backbone: {left}")
        model.requires_grad_(False)
        return model.train()


class Variant:
    """One provider's model (the family's frozen model, adapted by ``adapt``), built on first use per
    (shape, dtype, device), with its optimizer. ``floor``: no adapter; the backward runs to the input
    embeddings."""

    def __init__(self, family: Family, adapt: Adapt | None, floor: bool = False) -> None:
        self.family, self.adapt, self.floor = family, adapt, floor
        self.key: tuple | None = None
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def get(self, i: dict[str, torch.Tensor]) -> nn.Module:
        key = self.family.key(i)
        if key != self.key:
            model = self.family.model(i)
            self.model = self.adapt(model) if self.adapt is not None else model
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.Adafactor(trainable, lr=3e-4) if trainable else None
            self.key = key
        return self.model

    def forward(self, i: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's loss on ``i["input_ids"]`` with ``i["labels"]`` (gradients reset first)."""
        model = self.get(i)
        model.zero_grad(set_to_none=True)
        if not self.floor:
            return model(input_ids=i["input_ids"], labels=i["labels"]).loss
        # the floor: nothing trains, so the backward runs to the (detached) input embeddings
        embeds = model.get_input_embeddings()(i["input_ids"]).detach().requires_grad_()
        return model(inputs_embeds=embeds, labels=i["labels"]).loss

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()

    def owned(self) -> list[torch.Tensor]:
        return list(self.model.parameters()) if self.model is not None else []


def peft_adapter(config: str, **kwargs: object) -> Adapt:
    """Injects PEFT's ``peft.<config>(**kwargs)`` (e.g. ``"IA3Config"``, ``"LoraConfig"``) into a model."""

    def adapt(model: nn.Module) -> nn.Module:
        import peft

        return peft.inject_adapter_in_model(getattr(peft, config)(**kwargs), model)

    return adapt


def pemoe_adapter(config: str, **kwargs: object) -> Adapt:
    """Injects pemoe's ``pemoe.adapters.<config>(**kwargs)`` (e.g. ``"MoVConfig"``) into a model."""

    def adapt(model: nn.Module) -> nn.Module:
        from pemoe import adapters

        adapters.inject(model, getattr(adapters, config)(**kwargs))
        return model

    return adapt


def step_providers(family: Family, floor: str, adapted: dict[str, tuple[Adapt, str | None]]) -> dict[str, Provider]:
    """The floor provider, then one provider per ``name -> (adapt, baseline)``: its own model and optimizer,
    ``ratio_vs_<baseline>`` reported against the named provider."""
    variants = {floor: (Variant(family, None, floor=True), None)}
    variants |= {name: (Variant(family, adapt), baseline) for name, (adapt, baseline) in adapted.items()}
    return {
        name: Provider(name, v.forward, (), optimizer_step=v.step, owned=v.owned, baseline=baseline)
        for name, (v, baseline) in variants.items()
    }


def step_bench(
    op: str,
    shapes: Callable[[bool], list[dict[str, int]]],
    make_inputs: Callable[[dict[str, int], torch.dtype, torch.device], dict[str, torch.Tensor]],
    providers: dict[str, Provider],
    floor: str,
    scale_keys: Sequence[str],
) -> OpBench:
    """A step benchmark's :class:`~pemoe.bench.harness.OpBench`: tokens are ``S``, the default modes a
    forward + backward and a whole step."""
    return OpBench(
        op,
        shapes,
        make_inputs,
        providers,
        tokens_key="S",
        scale_keys=tuple(scale_keys),
        floor=floor,
        default_modes=("fwd_bwd", "step"),
    )
