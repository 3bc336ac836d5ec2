"""Drop-in adapters: ``inject(model, config)``, adapter-only save/load (one file or a folder), PEFT export and
import, merging, the authors' (T5) names.

One public namespace over the modules that do the work, split as PEFT's tuners are: :mod:`pemoe.config`
(the configs), :mod:`pemoe.placements` (one module per model family: where the sites are),
:mod:`pemoe.injection` (building the adapter modules and swapping them in), :mod:`pemoe.serialization`
(adapter files and folders, the authors' names), :mod:`pemoe.peft_interop` (PEFT folders at one expert:
:func:`export_peft`, :func:`import_peft`, upcycling) and :mod:`pemoe.merging` (:func:`merge` / :func:`unmerge`:
folding adapters into the frozen weights). Adding a model family means adding a placement module and its
peer test.

``pemoe.inject(model, config)`` is :func:`inject` from this module (re-exported by ``pemoe``). Where the
adapters go is :mod:`pemoe.placements`: built-in placements for T5 (below), for decoder-only models with
``q_proj k_proj v_proj o_proj`` attention and ``gate_proj up_proj down_proj act_fn`` MLPs (Llama, Mistral,
Qwen2, Qwen3, Gemma: MoV sites ``k v ffn`` with G = key/value heads under grouped-query attention;
MoLoRA sites ``q k v o gate up down``) and for GPT-2 (MoV ``k v`` on c_attn's k and v blocks and ``ffn``;
MoLoRA ``qkv o fc proj``), and ``target_modules=`` (names, a regex or ``"all-linear"``, as PEFT matches
them) for any model. This module holds the configs, builds the modules and swaps them in all-or-nothing.

T5 (transformers' ``T5ForConditionalGeneration`` and :class:`pemoe.models.T5`, same module paths):
``inject`` replaces exactly the sites of SPEC §2 in every encoder and decoder block (self- and
cross-attention) and freezes everything else:

* :class:`MoVConfig` / :class:`IA3Config`, sites ``k``, ``v``, ``ffn``: attention ``k`` and ``v``
  become :class:`~pemoe.layers.MoVLinear` (MoV per head, after the projection); ``ffn`` is MoV on
  act(x·wi_0) before ``* (x·wi_1)`` (v1.1) or on act(x·wi) before ``wo`` (v1.0).
* :class:`MoLoRAConfig` / :class:`LoRAConfig`, sites ``q k v o wi_0 wo`` (v1.1) or ``q k v o wi wo``
  (v1.0) by default (``wi_1`` on request): each becomes a :class:`~pemoe.layers.MoLoRALinear`.

The FFN MoV site: in transformers' T5 the FFN's ``act`` module is wrapped (:class:`MoVActivation`,
``ops.mov`` on its output); in pemoe's T5 the site goes into the FFN's ``mov`` slot and the FFN runs
as the fused ``ops.mov_ffn``. Attention k/v sites run the fused ``ops.mov_linear`` and MoLoRA sites
``ops.molora_linear`` in both models; ``config.implementation`` is passed to every op.

Config fields shared by all four: ``num_experts`` (1 for IA3Config / LoRAConfig), ``sites`` (None:
the SPEC §2 defaults above), ``top_k`` / ``renormalize`` (routing ablations), ``router_input``
(``"token"``: each router reads its site's activation; ``"sentence"``: every router reads one vector
per sequence, [B, router_input_dim] with router_input_dim = d_model by default, given at run time with
``with sentence_routing(model, vectors): ...``) and ``implementation`` (passed to every op).
MoLoRAConfig / LoRAConfig add ``rank`` and ``alpha`` (scale = alpha / rank). ``target_modules`` (None:
the built-in placement) replaces ``sites``; with it MoVConfig's ``num_groups`` sets G for every targeted
linear (None: inferred, see :mod:`pemoe.placements`). Sentence routing on a decoder-only model reads
[B, hidden_size] by default.

Gradient checkpointing: transformers' ``gradient_checkpointing_enable`` (either ``use_reentrant``) itself
makes the input embeddings' output require grad for models fed ``input_ids``, which reentrant checkpointing
of frozen layers needs for the adapters' gradients; ``inject`` adds nothing (for other models call
``model.enable_input_require_grads()`` as with PEFT).

Adapter names (the keys of :func:`adapter_state_dict` and of saved files) are model-independent:
``<path of the replaced Linear>.<param>`` (``encoder.block.0.layer.0.SelfAttention.k.experts``) and,
for the FFN MoV site, ``<path of DenseReluDense>.mov.<param>``; params are ``experts`` [G, E, D] and
``router`` [D, E] (MoV), ``lora_a`` [E, K, r], ``lora_b`` [E, r, N] and ``router`` [K, E] (MoLoRA); no
``router`` when E = 1. A file saved from one model type loads into the other.

Authors' names (for-ai/parameter-efficient-moe: T5X/Flaxformer parameter tree under ``target/``;
:func:`authors_name`, :func:`to_authors_state`, :func:`from_authors_state`). Scopes:
``encoder.block.{i}.layer.0.SelfAttention`` → ``encoder/layers_{i}/attention``;
``decoder.block.{i}.layer.0.SelfAttention`` → ``decoder/layers_{i}/self_attention``;
``decoder.block.{i}.layer.1.EncDecAttention`` → ``decoder/layers_{i}/encoder_decoder_attention``;
``….DenseReluDense`` → ``…/layers_{i}/mlp``. Within a scope:

| pemoe | authors | layout |
|---|---|---|
| ``{k,v}.experts`` | ``{k,v}_conv/mov_scaling`` | [heads, E, d_kv] as is |
| ``{k,v}.experts``, E = 1 | ``{k,v}_conv/ia3_scaling`` | [heads, 1, d_kv] → [heads, d_kv] |
| ``mov.experts`` | ``intermediate_conv/mov_scaling`` | [1, E, F] → [E, F] |
| ``mov.experts``, E = 1 | ``intermediate_conv/ia3_scaling`` | [1, 1, F] → [F] |
| ``{k,v}.router`` | ``{k,v}_conv/router/router_weights/v/kernel`` | [d_kv, E] as is |
| ``mov.router`` | ``intermediate_conv/router/router_weights/v/kernel`` | [F, E] as is |
| ``{q,k,v,o}.lora_a`` | ``lora_{q,k,v,output}_conv/lora_A`` | [E, K, r] as is; E = 1: [K, r] |
| ``{q,k,v,o}.lora_b`` | ``lora_{q,k,v,output}_conv/lora_B`` | [E, r, N] as is; E = 1: [r, N] |
| ``{wi_0 or wi, wo}.lora_{a,b}`` | ``lora_intermediate_conv``, ``lora_output_conv`` + ``/lora_{A,B}`` | as above |
| ``<site>.router`` (MoLoRA) | ``<conv>/router/router_weights/v/kernel`` | [K, E] as is |
"""

from __future__ import annotations

from pemoe.config import AdapterConfig, IA3Config, LoRAConfig, MoLoRAConfig, MoVConfig, config_from_dict
from pemoe.injection import (
    adapter_config,
    adapter_state_dict,
    inject,
    sentence_routing,
)
from pemoe.merging import is_merged, merge, unmerge
from pemoe.peft_interop import export_peft, import_peft
from pemoe.placements import MoVActivation
from pemoe.serialization import (
    FORMAT_VERSION,
    authors_name,
    from_authors_state,
    from_pretrained,
    load_adapter,
    load_adapter_state_dict,
    save_adapter,
    save_pretrained,
    to_authors_state,
)

__all__ = [
    "MoVConfig",
    "IA3Config",
    "MoLoRAConfig",
    "LoRAConfig",
    "AdapterConfig",
    "MoVActivation",
    "inject",
    "sentence_routing",
    "adapter_config",
    "adapter_state_dict",
    "save_adapter",
    "load_adapter",
    "load_adapter_state_dict",
    "save_pretrained",
    "from_pretrained",
    "export_peft",
    "import_peft",
    "merge",
    "unmerge",
    "is_merged",
    "config_from_dict",
    "authors_name",
    "to_authors_state",
    "from_authors_state",
    "FORMAT_VERSION",
]
