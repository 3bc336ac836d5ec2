"""End-to-end benchmark: one Llama training step (forward, backward, optimizer step) per adapter method.

The decoder-only counterpart of bench/t5_step.py. Targets on the CPU, step time against PEFT's counterpart
in the same run: pemoe LoRA r = 4 ≤ 0.95× PEFT LoRA r = 4's, pemoe (IA)3 ≤ 1.00× PEFT IA3's, MoV-10
≤ 1.05× PEFT IA3's, MoLoRA-8 (r = 4, 8× LoRA's adapter FLOPs) ≤ 1.00× PEFT LoRA r = 4's; activation
memory within 5 % of the counterpart's.

Every provider is transformers' ``LlamaForCausalLM`` with the same random backbone, built offline from a
``LlamaConfig``: hidden 512, 8 layers, 8 attention heads over 4 key/value heads (grouped-query attention,
head_dim 64), gated SiLU MLP 1408 wide, vocabulary 32000, untied embeddings, dropout 0 (every step does the
same work), no KV cache (a training step). Attention is PyTorch's ``scaled_dot_product_attention``
(transformers' ``"sdpa"``): transformers' default and what a Llama is trained with. With no padding mask
transformers calls it causal, without a mask and with the key/value heads unrepeated (``enable_gqa``), and
on the CPU it runs torch's flash-attention kernel, which keeps no [B, H, S, S] probabilities for backward:
the frozen floor is not inflated by eager attention's materialised scores, which nobody trains with, and
the adapters' share of the step is not understated. The batch is 4 × 256 tokens; the loss is
the causal-LM cross-entropy with labels = input_ids (transformers shifts them). The models, frozen, with:

* ``llama-frozen`` — no adapter (the floor): forward and backward to the input embeddings, which are the
  only tensors requiring grad; no optimizer;
* ``peft-ia3`` — PEFT's IA3 on k_proj, v_proj (outputs) and down_proj (input, as feed-forward);
  ``peft-lora`` — PEFT's LoRA r = 4, alpha = 16 on all seven linears q/k/v/o_proj, gate/up/down_proj;
* ``pemoe-ia3``, ``pemoe-mov-10`` — :func:`pemoe.adapters.inject` with the built-in Llama placement: MoV per
  key/value head on k_proj and v_proj, and on act_fn's output (at E = 1 the same scaling as PEFT's IA3 on
  down_proj's input); ``pemoe-lora``, ``pemoe-molora-8`` — r = 4, alpha = 16 on the same seven linears as
  ``peft-lora``; all with the ``"auto"`` implementation.

``step`` adds ``torch.optim.Adafactor`` (lr 3e-4) over the trainable parameters, as bench/t5_step.py does.
The (IA)3/MoV providers report ``ratio_vs_peft-ia3`` and the LoRA/MoLoRA ones ``ratio_vs_peft-lora`` beside
``ratio_vs_floor``; ``saved_mb`` counts the activations the step's graph keeps for backward (the model's
own weights excluded). Run ``pemoe bench --ops llama_step`` or ``python -m pemoe.bench.llama_step`` (not in
the default quick run: a whole training step per provider and dtype). The backbone cache, the providers'
models and optimizer and the adapter injection are bench/step_common.py's.
"""

from __future__ import annotations

import torch

from pemoe.bench.harness import Provider, op_main
from pemoe.bench.step_common import Family, peft_adapter, pemoe_adapter, step_bench, step_providers

OP = "llama_step"
FLOOR = "llama-frozen"
#: hidden M, MLP F, attention heads H, key/value heads KV, head_dim D, layers, vocabulary V
WIDTHS = {"M": 512, "F": 1408, "H": 8, "KV": 4, "D": 64, "layers": 8, "V": 32000}
IA3_SITES = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_WIDTH_KEYS = ("M", "F", "H", "KV", "D", "layers", "V")
#: --shape-scale shrinks these; the head counts stay, so tiny runs keep grouped-query attention
_SCALE_KEYS = ("M", "F", "D", "layers", "V")


def shapes(full: bool) -> list[dict[str, int]]:
    """Batch 4 × 256 tokens at the widths above (one shape: --full only adds repetitions)."""
    return [{"B": 4, "S": 256, **WIDTHS}]


def _build(shape: dict[str, int]) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of the shape's widths (sdpa attention, see above)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["V"],
        hidden_size=shape["M"],
        intermediate_size=shape["F"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["H"],
        num_key_value_heads=shape["KV"],
        head_dim=shape["D"],
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


FAMILY = Family(_build, _WIDTH_KEYS)


def make_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Token ids [B, S], the labels the same tensor (causal LM); ``dtype`` is the backbone's."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["V"], (shape["B"], shape["S"]), generator=g)
    return FAMILY.inputs(shape, dtype, device, {"input_ids": ids, "labels": ids})


def _providers() -> dict[str, Provider]:
    return step_providers(
        FAMILY,
        FLOOR,
        {
            "peft-ia3": (peft_adapter("IA3Config", **IA3_SITES), None),
            "pemoe-ia3": (pemoe_adapter("IA3Config"), "peft-ia3"),
            "pemoe-mov-10": (pemoe_adapter("MoVConfig", num_experts=10), "peft-ia3"),
            "peft-lora": (peft_adapter("LoraConfig", r=4, lora_alpha=16, target_modules=LORA_TARGETS), None),
            "pemoe-lora": (pemoe_adapter("LoRAConfig", rank=4, alpha=16), "peft-lora"),
            "pemoe-molora-8": (pemoe_adapter("MoLoRAConfig", num_experts=8, rank=4, alpha=16), "peft-lora"),
        },
    )


PROVIDERS = _providers()
BENCH = step_bench(OP, shapes, make_inputs, PROVIDERS, FLOOR, scale_keys=_SCALE_KEYS)


def main(argv: list[str] | None = None) -> int:
    """``python -m pemoe.bench.llama_step [pemoe bench options]``: this benchmark only."""
    return op_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
