"""End-to-end benchmark: one T5 training step (forward, backward, optimizer step) per adapter method.

SPEC §6: on the CPU, T5 v1.1-small widths, batch 8 × 128 input tokens → 32 target tokens, pemoe's
MoV-30 step should cost ≤ 1.02× PEFT IA3's and MoLoRA-15 (r = 4) ≤ 1.05× PEFT LoRA r = 4's (same
sites), with activation memory within 2 % of theirs.

Every provider is transformers' ``T5ForConditionalGeneration`` with the same random backbone (built
offline from the v1.1 config; dropout 0 so that every step does the same work), frozen, with:

* ``t5-frozen`` — no adapter (the floor): forward and backward to the input embeddings, which are the
  only tensors requiring grad; no optimizer;
* ``peft-ia3`` — PEFT's IA3 on k, v, wo (wo as feed-forward); ``peft-lora`` — PEFT's LoRA r = 4,
  alpha = 16 on q, k, v, o, wi_0, wo;
* ``pemoe-ia3``, ``pemoe-mov-30``, ``pemoe-lora``, ``pemoe-molora-15`` — :func:`pemoe.adapters.inject`
  with the ``"auto"`` implementation on the same sites (SPEC §2);
* ``reference-mov-30``, ``reference-molora-15`` — the same with ``implementation="reference"`` (the
  straight einsum transcription, the SPEC's "for scale" figures).

The loss is the model's cross-entropy; ``step`` adds ``torch.optim.Adafactor`` (lr 3e-4, no momentum:
the paper's optimizer) over the trainable parameters. The pemoe and reference providers report
``ratio_vs_peft-ia3`` / ``ratio_vs_peft-lora`` beside ``ratio_vs_floor``. ``saved_mb`` counts the
activations the step's graph keeps for backward (the model's own weights excluded). Run
``pemoe bench --ops t5_step`` or ``python -m pemoe.bench.t5_step`` (not in the default quick run: a step
takes about a second here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pemoe.bench.harness import OpBench, Provider, op_main

OP = "t5_step"
FLOOR = "t5-frozen"
#: T5 v1.1 widths: d_model M, d_ff F, heads H, d_kv Dkv, layers per stack, vocabulary V.
WIDTHS = {
    "small": {"M": 512, "F": 1024, "H": 6, "Dkv": 64, "layers": 8, "V": 32128},
    "base": {"M": 768, "F": 2048, "H": 12, "Dkv": 64, "layers": 12, "V": 32128},
}
IA3_SITES = {"target_modules": ["k", "v", "wo"], "feedforward_modules": ["wo"]}
LORA_TARGETS = ["q", "k", "v", "o", "wi_0", "wo"]
_WIDTH_KEYS = ("M", "F", "H", "Dkv", "layers", "V")


def shapes(full: bool) -> list[dict[str, int]]:
    """The SPEC's step (v1.1-small, batch 8 × 128 → 32); --full adds the v1.1-base widths."""
    widths = ("small", "base") if full else ("small",)
    return [{"B": 8, "S": 128, "L": 32, **WIDTHS[w]} for w in widths]


def make_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Token ids [B, S] and labels [B, L]; ``dtype`` is the backbone's (the models are built by the providers)."""
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(0, shape["V"], (shape["B"], shape["S"]), generator=g),
        "labels": torch.randint(0, shape["V"], (shape["B"], shape["L"]), generator=g),
        # carry the backbone's dtype and widths to the providers, which build their models lazily
        "dtype_probe": torch.zeros((), dtype=dtype),
        "widths": torch.tensor([shape[k] for k in _WIDTH_KEYS]),
    }
    return {k: v.to(device) for k, v in inputs.items()}


# --------------------------------------------------------------------------------------------------
# Models: one frozen random backbone per (shape, dtype, device), shared by every provider's model
# --------------------------------------------------------------------------------------------------

_backbones: dict[tuple, dict[str, torch.Tensor]] = {}


def _config(shape: dict[str, int]):
    from transformers import T5Config

    return T5Config(
        vocab_size=shape["V"],
        d_model=shape["M"],
        d_ff=shape["F"],
        d_kv=shape["Dkv"],
        num_heads=shape["H"],
        num_layers=shape["layers"],
        num_decoder_layers=shape["layers"],
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )


def _key(shape: dict[str, int], i: dict[str, torch.Tensor]) -> tuple:
    return (tuple(sorted(shape.items())), i["dtype_probe"].dtype, i["input_ids"].device)


def _model(shape: dict[str, int], i: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A frozen T5 whose weights share storage with the (cached) random backbone of this shape/dtype."""
    from transformers import T5ForConditionalGeneration

    key = _key(shape, i)
    if key not in _backbones:
        torch.manual_seed(0)
        base = T5ForConditionalGeneration(_config(shape)).to(device=key[2], dtype=key[1])
        _backbones.clear()  # one backbone at a time: the providers of one group share it
        _backbones[key] = base.state_dict()
    with torch.device("meta"):
        model = T5ForConditionalGeneration(_config(shape))
    model.load_state_dict(_backbones[key], assign=True)
    model.requires_grad_(False)
    return model.train()


class _Variant:
    """One provider's model, built on first use per (shape, dtype, device), with its optimizer."""

    def __init__(self, adapt: Callable[[torch.nn.Module], torch.nn.Module] | None, floor: bool = False) -> None:
        self.adapt, self.floor = adapt, floor
        self.key: tuple | None = None
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def get(self, i: dict[str, torch.Tensor]) -> torch.nn.Module:
        shape = _shape_of(i)
        key = _key(shape, i)
        if key != self.key:
            model = _model(shape, i)
            self.model = self.adapt(model) if self.adapt is not None else model
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.Adafactor(trainable, lr=3e-4) if trainable else None
            self.key = key
        return self.model

    def forward(self, i: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self.get(i)
        model.zero_grad(set_to_none=True)
        if not self.floor:
            return model(input_ids=i["input_ids"], labels=i["labels"]).loss
        # the floor: nothing trains, so the backward runs to the (detached) input embeddings
        embeds = model.shared(i["input_ids"]).detach().requires_grad_()
        return model(inputs_embeds=embeds, labels=i["labels"]).loss

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()

    def owned(self) -> list[torch.Tensor]:
        return list(self.model.parameters()) if self.model is not None else []


def _shape_of(i: dict[str, torch.Tensor]) -> dict[str, int]:
    """The model widths the inputs were made for."""
    return dict(zip(_WIDTH_KEYS, i["widths"].tolist(), strict=True))


def _peft(config_factory: Callable[[], object]) -> Callable[[torch.nn.Module], torch.nn.Module]:
    def adapt(model: torch.nn.Module) -> torch.nn.Module:
        from peft import inject_adapter_in_model

        return inject_adapter_in_model(config_factory(), model)

    return adapt


def _pemoe(config_factory: Callable[[], object]) -> Callable[[torch.nn.Module], torch.nn.Module]:
    def adapt(model: torch.nn.Module) -> torch.nn.Module:
        from pemoe.adapters import inject

        inject(model, config_factory())
        return model

    return adapt


def _ia3():
    from peft import IA3Config

    return IA3Config(**IA3_SITES)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=16, target_modules=LORA_TARGETS)


def _pemoe_config(name: str, implementation: str = "auto") -> Callable[[], object]:
    def make():
        from pemoe import adapters as pi

        return {
            "ia3": lambda: pi.IA3Config(implementation=implementation),
            "mov-30": lambda: pi.MoVConfig(num_experts=30, implementation=implementation),
            "lora": lambda: pi.LoRAConfig(rank=4, alpha=16, sites=tuple(LORA_TARGETS), implementation=implementation),
            "molora-15": lambda: pi.MoLoRAConfig(
                num_experts=15, rank=4, alpha=16, sites=tuple(LORA_TARGETS), implementation=implementation
            ),
        }[name]()

    return make


def _provider(name: str, variant: _Variant, baseline: str | None = None) -> Provider:
    def forward(i: dict[str, torch.Tensor]) -> torch.Tensor:
        return variant.forward(i)

    return Provider(name, forward, (), optimizer_step=variant.step, owned=variant.owned, baseline=baseline)


def _providers() -> dict[str, Provider]:
    variants = {
        FLOOR: (_Variant(None, floor=True), None),
        "peft-ia3": (_Variant(_peft(_ia3)), None),
        "pemoe-ia3": (_Variant(_pemoe(_pemoe_config("ia3"))), "peft-ia3"),
        "pemoe-mov-30": (_Variant(_pemoe(_pemoe_config("mov-30"))), "peft-ia3"),
        "reference-mov-30": (_Variant(_pemoe(_pemoe_config("mov-30", "reference"))), "peft-ia3"),
        "peft-lora": (_Variant(_peft(_lora)), None),
        "pemoe-lora": (_Variant(_pemoe(_pemoe_config("lora"))), "peft-lora"),
        "pemoe-molora-15": (_Variant(_pemoe(_pemoe_config("molora-15"))), "peft-lora"),
        "reference-molora-15": (_Variant(_pemoe(_pemoe_config("molora-15", "reference"))), "peft-lora"),
    }
    return {name: _provider(name, v, baseline) for name, (v, baseline) in variants.items()}


PROVIDERS = _providers()
BENCH = OpBench(
    OP,
    shapes,
    make_inputs,
    PROVIDERS,
    tokens_key="S",
    scale_keys=("M", "F", "H", "Dkv", "layers", "V"),
    floor=FLOOR,
    default_modes=("fwd_bwd", "step"),
)


def main(argv: list[str] | None = None) -> int:
    """``python -m pemoe.bench.t5_step [pemoe bench options]``: this benchmark only."""
    return op_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
