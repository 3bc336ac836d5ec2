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
takes about a second here). The backbone cache, the providers' models and optimizer and the adapter
injection are shared with bench/llama_step.py (bench/step_common.py).
"""

from __future__ import annotations

import torch

from pemoe.bench.harness import Provider, op_main
from pemoe.bench.step_common import Adapt, Family, peft_adapter, pemoe_adapter, step_bench, step_providers

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


def _build(shape: dict[str, int]) -> torch.nn.Module:
    """A randomly initialised T5 v1.1 (gated-GELU FFN, untied embeddings, dropout 0) of the shape's widths."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
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
    return T5ForConditionalGeneration(config)


FAMILY = Family(_build, _WIDTH_KEYS)


def make_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Token ids [B, S] and labels [B, L]; ``dtype`` is the backbone's (the models are built by the providers)."""
    g = torch.Generator().manual_seed(0)
    ids = {
        "input_ids": torch.randint(0, shape["V"], (shape["B"], shape["S"]), generator=g),
        "labels": torch.randint(0, shape["V"], (shape["B"], shape["L"]), generator=g),
    }
    return FAMILY.inputs(shape, dtype, device, ids)


def _pemoe_adapters(implementation: str) -> dict[str, Adapt]:
    """pemoe's adapters on the SPEC's T5 sites with ``implementation``."""
    sites = tuple(LORA_TARGETS)
    return {
        "ia3": pemoe_adapter("IA3Config", implementation=implementation),
        "mov-30": pemoe_adapter("MoVConfig", num_experts=30, implementation=implementation),
        "lora": pemoe_adapter("LoRAConfig", rank=4, alpha=16, sites=sites, implementation=implementation),
        "molora-15": pemoe_adapter(
            "MoLoRAConfig", num_experts=15, rank=4, alpha=16, sites=sites, implementation=implementation
        ),
    }


def _providers() -> dict[str, Provider]:
    auto, reference = _pemoe_adapters("auto"), _pemoe_adapters("reference")
    return step_providers(
        FAMILY,
        FLOOR,
        {
            "peft-ia3": (peft_adapter("IA3Config", **IA3_SITES), None),
            "pemoe-ia3": (auto["ia3"], "peft-ia3"),
            "pemoe-mov-30": (auto["mov-30"], "peft-ia3"),
            "reference-mov-30": (reference["mov-30"], "peft-ia3"),
            "peft-lora": (peft_adapter("LoraConfig", r=4, lora_alpha=16, target_modules=LORA_TARGETS), None),
            "pemoe-lora": (auto["lora"], "peft-lora"),
            "pemoe-molora-15": (auto["molora-15"], "peft-lora"),
            "reference-molora-15": (reference["molora-15"], "peft-lora"),
        },
    )


PROVIDERS = _providers()
BENCH = step_bench(OP, shapes, make_inputs, PROVIDERS, FLOOR, scale_keys=_WIDTH_KEYS)


def main(argv: list[str] | None = None) -> int:
    """``python -m pemoe.bench.t5_step [pemoe bench options]``: this benchmark only."""
    return op_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
