"""pemoe.merge / pemoe.unmerge: adapters folded into the frozen weights, and the bit-exact way back.

Tolerance: the single rule of tests/helpers.py (pemoe.testing.check_rule). ``out`` is the merged model's
float32 logits, ``ref`` the unmerged (adapter) model's float32 logits and ``truth`` the unmerged model's in
float64 (the same weights upcast): merged may be at most twice as far from the truth as the adapters
themselves, plus ATOL[float32]·max(max|truth|, 1).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import pemoe
from pemoe.adapters import (
    IA3Config,
    LoRAConfig,
    MoLoRAConfig,
    MoVConfig,
    adapter_config,
    adapter_state_dict,
    inject,
    is_merged,
    merge,
    sentence_routing,
    unmerge,
)
from pemoe.layers import MoLoRALinear, MoV, MoVLinear
from pemoe.placements import FusedGatedMLP, MoVActivation, PackedMoV
from tests.decoder_tiny import decoder, ids
from tests.helpers import assert_model_unchanged, assert_within_rule, snapshot_model
from tests.t5_tiny import batch, hf_t5, pemoe_t5

ADAPTER_TYPES = (MoV, MoVLinear, MoLoRALinear, MoVActivation, PackedMoV, FusedGatedMLP)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(model, seed=0, scale=0.1):
    """Adapters far from their identity start (the logits move by O(1)), not so far that the tiny random
    model turns chaotic and float32 rounding grows from layer to layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


MODELS = {
    "llama": lambda: decoder("llama"),  # fused gated MLP (FusedGatedMLP)
    "qwen3": lambda: decoder("qwen3"),  # GQA, head_dim != hidden / heads
    "gpt2": lambda: decoder("gpt2"),  # Conv1D, packed q|k|v
    "t5-v1.1": lambda: hf_t5("v1.1"),
    "t5-v1.0": lambda: hf_t5("v1.0"),
    "pemoe-t5-v1.1": lambda: pemoe_t5("v1.1"),
}


def _inputs(name, model):
    if "t5" in name:
        i, mask, dec, _ = batch()
        return dict(input_ids=i, attention_mask=mask, decoder_input_ids=dec)
    return dict(input_ids=ids(model))


def _width(model):
    c = model.config
    return getattr(c, "d_model", None) or getattr(c, "hidden_size", None) or c.n_embd


def _logits(model, inputs, vector=None):
    with torch.no_grad():
        if vector is None:
            return model(**inputs).logits
        batch_size = inputs["input_ids"].shape[0]
        with sentence_routing(model, vector.to(next(model.parameters()).dtype)[None].expand(batch_size, -1)):
            return model(**inputs).logits


CONFIGS = {
    "IA3": IA3Config(implementation="torch"),
    "LoRA": LoRAConfig(rank=4, implementation="torch"),
    "MoV-3-sentence": MoVConfig(num_experts=3, router_input="sentence", implementation="torch"),
    "MoLoRA-3-sentence": MoLoRAConfig(num_experts=3, rank=2, router_input="sentence", implementation="torch"),
}


# every model with (IA)3 and LoRA; sentence-routed mixtures on one model per placement kind
CASES = [(n, c) for n in MODELS for c in ("IA3", "LoRA")]
CASES += [(n, c) for n in ("llama", "gpt2", "t5-v1.1") for c in ("MoV-3-sentence", "MoLoRA-3-sentence")]


@pytest.mark.parametrize("name, config", CASES)
def test_merged_equals_unmerged_and_unmerge_is_bit_exact(name, config):
    model = MODELS[name]()
    base_keys = set(model.state_dict())
    inputs = _inputs(name, model)
    base = _logits(model, inputs)
    inject(model, CONFIGS[config])
    _randomize(model)
    g = torch.Generator().manual_seed(5)
    vector = torch.randn(_width(model), generator=g) if "sentence" in config else None

    ref = _logits(model, inputs, vector)
    truth = _logits(copy.deepcopy(model).double(), inputs, vector)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in model.named_modules()]

    merge(model, router_input=vector)
    assert is_merged(model)
    assert not any(isinstance(m, ADAPTER_TYPES) for m in model.modules()), "merged layers run as plain modules"
    assert set(model.state_dict()) == base_keys  # the base model's own keys: saveable as a plain model
    out = _logits(model, inputs)  # no router input needed any more
    assert_within_rule(out, ref, truth, torch.float32, f"{name} {config} merged logits")
    assert (out - base).abs().max() > 0.05, "the adapters must matter for the check to mean anything"

    unmerge(model)
    assert not is_merged(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert torch.equal(_logits(model, inputs, vector), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [IA3Config(), LoRAConfig()], ids=["IA3", "LoRA"])
def test_half_precision_merges_within_the_rule(config, dtype):
    """The fold is computed in float32 and rounded once to the weights' dtype: ``ref`` is the unmerged model
    in ``dtype``, ``truth`` the unmerged model in float64."""
    model = decoder("llama")
    inject(model, config)
    _randomize(model)
    x = dict(input_ids=ids(model))
    truth = _logits(copy.deepcopy(model).double(), x)
    model.to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _logits(model, x)
    merge(model)
    assert all(p.dtype == dtype for p in model.parameters())
    assert_within_rule(_logits(model, x), ref, truth, dtype, f"{dtype} {type(config).__name__} merged logits")
    unmerge(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "config",
    [MoVConfig(num_experts=1, target_modules=["c_attn", "c_fc"]), IA3Config(target_modules=["mlp.act"]),
     LoRAConfig(target_modules="all-linear")],
    ids=["MoV-1-on-Conv1D-outputs", "IA3-on-the-activation", "LoRA-all-linear"],
)  # fmt: skip
def test_target_modules_sites_merge(config):
    model = decoder("gpt2")
    inject(model, config)
    _randomize(model)
    x = dict(input_ids=ids(model))
    ref, truth = _logits(model, x), _logits(copy.deepcopy(model).double(), x)
    merge(model)
    assert not any(isinstance(m, ADAPTER_TYPES) for m in model.modules())
    assert_within_rule(_logits(model, x), ref, truth, torch.float32, "target_modules merged logits")


def test_merge_folds_what_the_formulas_say():
    """One layer of each kind, against the fold written out here: k_proj rows scaled, down_proj columns scaled
    (the FFN vector), LoRA W + (alpha / r)·(A B)ᵀ (GPT-2 Conv1D: Wᵀ + (alpha / r)·A B)."""
    ia3 = decoder("llama")
    inject(ia3, IA3Config())
    _randomize(ia3, scale=0.3)
    attn, mlp = ia3.model.layers[0].self_attn, ia3.model.layers[0].mlp
    w_k, s_k = attn.k_proj.base.weight.clone(), attn.k_proj.experts[:, 0, :].reshape(-1).detach().clone()
    w_down, s_ffn = mlp.down_proj.weight.clone(), mlp.mov.experts.reshape(-1).detach().clone()
    merge(ia3)
    assert type(attn.k_proj) is nn.Linear and torch.equal(attn.k_proj.weight, w_k * s_k[:, None])
    assert torch.equal(ia3.model.layers[0].mlp.down_proj.weight, w_down * s_ffn[None, :])

    lora = decoder("gpt2")
    inject(lora, LoRAConfig(rank=2, alpha=6))
    _randomize(lora, scale=0.3)
    site = lora.transformer.h[1].attn.c_attn
    w, a, b = site.base.conv.weight.clone(), site.lora_a[0].detach().clone(), site.lora_b[0].detach().clone()
    merge(lora)
    merged = lora.transformer.h[1].attn.c_attn
    assert type(merged).__name__ == "Conv1D"
    torch.testing.assert_close(merged.weight, w + 3.0 * (a @ b), rtol=0, atol=1e-6)


class _OwnForward(nn.Linear):
    """A frozen base with a forward of its own, as a quantized linear has."""

    def forward(self, x):
        return super().forward(x)


def test_what_cannot_be_merged_is_refused_with_the_reason():
    bare = decoder("llama")
    with pytest.raises(ValueError, match="no pemoe adapters"):
        merge(bare)

    token = decoder("llama")
    inject(token, MoVConfig(num_experts=3))
    snap = snapshot_model(token)
    with pytest.raises(ValueError, match=r"routes each token by its own activation.*cannot be merged"):
        merge(token)
    assert_model_unchanged(token, snap)
    assert not is_merged(token)

    sentence = decoder("llama")
    inject(sentence, MoLoRAConfig(num_experts=3, rank=2, router_input="sentence"))
    snap = snapshot_model(sentence)
    with pytest.raises(ValueError, match=r"routes by sentence: give the one fixed router input"):
        merge(sentence)
    with pytest.raises(ValueError, match=r"one vector of shape \[64\].*a batch of them is not"):
        merge(sentence, router_input=torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"one vector of shape \[64\]"):
        merge(sentence, router_input=torch.randn(32))
    assert_model_unchanged(sentence, snap)

    one = decoder("llama")
    inject(one, LoRAConfig())
    with pytest.raises(ValueError, match="router_input is for sentence-routed adapters"):
        merge(one, router_input=torch.randn(64))
    with pytest.raises(ValueError, match="not merged"):
        unmerge(one)
    merge(one)
    snap = snapshot_model(one)
    with pytest.raises(ValueError, match=r"already|merged into its weights"):
        merge(one)
    assert_model_unchanged(one, snap)
    for fn in (pemoe.save_adapter, pemoe.save_pretrained, pemoe.export_peft):
        with pytest.raises(ValueError, match="merged.*unmerge"):
            fn(one, "/nonexistent/never-written")


@pytest.mark.parametrize("config", [LoRAConfig(), IA3Config()], ids=["LoRA", "IA3"])
def test_quantized_bases_are_refused(config):
    """The last layer's projections run their own forward (the path of bitsandbytes / torchao linears)."""
    model = decoder("llama")
    layer = model.model.layers[-1]
    for parent, name in ((layer.self_attn, "v_proj"), (layer.mlp, "down_proj")):
        old = getattr(parent, name)
        new = _OwnForward(old.in_features, old.out_features, bias=old.bias is not None)
        new.load_state_dict(old.state_dict())
        setattr(parent, name, new)
    inject(model, config)
    snap = snapshot_model(model)
    with pytest.raises(ValueError, match="cannot be folded into quantized weights"):
        merge(model)
    assert_model_unchanged(model, snap)
    assert not is_merged(model)


def test_torchao_quantized_base_is_refused():
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = decoder("llama")
    inject(model, LoRAConfig())
    holder = nn.Sequential(model.model.layers[0].self_attn.q_proj.base)
    with contextlib.suppress(Exception):
        quantize_(holder, Int8WeightOnlyConfig())
    if not pemoe.layers.runs_own_forward(holder[0]):
        pytest.skip(f"torchao {torchao.__version__} did not quantize on this machine")
    model.model.layers[0].self_attn.q_proj.base = holder[0]
    with pytest.raises(ValueError, match="quantized"):
        merge(model)
    assert not is_merged(model) and adapter_config(model) is not None


def test_public_names():
    """The functions are pemoe.merge / pemoe.unmerge; their module (pemoe.merging) does not shadow them."""
    import pemoe.merging

    assert pemoe.merge is pemoe.adapters.merge is pemoe.merging.merge
    assert pemoe.unmerge is pemoe.adapters.unmerge is pemoe.merging.unmerge
    assert pemoe.is_merged is pemoe.merging.is_merged
