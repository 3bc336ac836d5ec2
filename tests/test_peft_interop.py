"""PEFT interop at one expert: pemoe.export_peft (checked by loading with PEFT itself), pemoe.import_peft (of
folders PEFT wrote), upcycling a PEFT LoRA / IA3 into MoLoRA / MoV, and the refusals.

Tolerance: the single rule of tests/helpers.py (pemoe.testing.check_rule). Export: ``out`` is the logits of
``peft.PeftModel.from_pretrained(base, folder)``, ``ref`` pemoe's float32 logits, ``truth`` pemoe's in
float64. Import: ``out`` is pemoe's logits, ``ref`` PEFT's float32, ``truth`` PEFT's in float64.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pemoe.adapters import (
    IA3Config,
    LoRAConfig,
    MoLoRAConfig,
    MoVConfig,
    adapter_state_dict,
    export_peft,
    import_peft,
    inject,
)
from tests.decoder_tiny import decoder, ids
from tests.helpers import assert_model_unchanged, assert_within_rule, snapshot_model
from tests.t5_tiny import batch, hf_t5, pemoe_t5

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MODELS = {
    "llama": lambda: decoder("llama", seed=3),
    "qwen3": lambda: decoder("qwen3", seed=3),  # GQA, head_dim 24 != hidden / heads
    "gpt2": lambda: decoder("gpt2", seed=3),  # Conv1D (fan_in_fan_out), packed q|k|v
    "t5-v1.1": lambda: hf_t5("v1.1", seed=3),
    "t5-v1.0": lambda: hf_t5("v1.0", seed=3),
}


def _inputs(name, model):
    if "t5" in name:
        i, mask, dec, _ = batch()
        return dict(input_ids=i, attention_mask=mask, decoder_input_ids=dec)
    return dict(input_ids=ids(model))


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _randomize(model, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------------------------------------
# export, loaded by PEFT itself


@pytest.mark.parametrize("method", ["IA3", "LoRA"])
@pytest.mark.parametrize("name", list(MODELS))
def test_export_loads_in_peft_with_equal_logits(tmp_path, name, method):
    ours = MODELS[name]()
    inputs = _inputs(name, ours)
    base_logits = _logits(ours, inputs)
    inject(ours, IA3Config(implementation="torch") if method == "IA3" else LoRAConfig(rank=4, alpha=8))
    _randomize(ours)
    export_peft(ours, tmp_path / "peft")

    served = peft.PeftModel.from_pretrained(MODELS[name](), tmp_path / "peft").eval()
    assert served.peft_config["default"].peft_type.value == method.upper()
    out, ref = _logits(served, inputs), _logits(ours, inputs)
    truth = _logits(copy.deepcopy(ours).double(), inputs)
    assert_within_rule(out, ref, truth, torch.float32, f"{name} {method} exported, logits under PEFT")
    assert (ref - base_logits).abs().max() > 0.05, "the adapter must matter for the check to mean anything"

    # PEFT's tensors in PEFT's layouts, written out here from pemoe's
    theirs = {n: p for n, p in served.named_parameters() if "lora_" in n or "ia3_l" in n}
    params = adapter_state_dict(ours)
    if method == "LoRA":
        assert len(theirs) == len(params)
        for key, p in params.items():
            path, param = key.rsplit(".", 1)
            q = theirs[f"base_model.model.{path}.{'lora_A' if param == 'lora_a' else 'lora_B'}.default.weight"]
            assert torch.equal(q, p[0].t()), key  # [r, K] / [N, r]
    else:
        for key, p in params.items():
            path = key[: -len(".experts")]
            if path.endswith(".mov"):  # FFN activation: PEFT's [1, F] on the down projection's input
                down = {"llama": "down_proj", "qwen3": "down_proj", "gpt2": "c_proj"}.get(name, "wo")
                q = theirs[f"base_model.model.{path[: -len('.mov')]}.{down}.ia3_l.default"]
                assert q.shape == (1, p.numel()) and torch.equal(q.reshape(-1), p.reshape(-1)), key
            elif name == "gpt2":  # c_attn's k or v block of [3H, 1]; the q block is 1
                c_attn, part = path.rsplit(".", 1)
                q = theirs[f"base_model.model.{c_attn}.ia3_l.default"]
                h = p.numel()
                lo = {"k": h, "v": 2 * h}[part]
                assert torch.equal(q[lo : lo + h, 0], p.reshape(-1)) and torch.all(q[:h] == 1), key
            else:  # k/v output [G·D, 1]
                q = theirs[f"base_model.model.{path}.ia3_l.default"]
                assert q.shape == (p.numel(), 1) and torch.equal(q.reshape(-1), p.reshape(-1)), key


def test_pemoe_t5_exports_for_transformers_t5(tmp_path):
    """pemoe's own T5 has transformers' module paths: its adapter serves under PEFT on transformers' T5."""
    ours = pemoe_t5("v1.1", seed=3)
    inject(ours, IA3Config())
    _randomize(ours)
    export_peft(ours, tmp_path / "p")
    served = peft.PeftModel.from_pretrained(hf_t5("v1.1", seed=3), tmp_path / "p").eval()
    inputs = _inputs("t5", ours)
    out, ref = _logits(served, inputs), _logits(ours, inputs)
    assert_within_rule(out, ref, _logits(copy.deepcopy(ours).double(), inputs), torch.float32, "pemoe T5 -> PEFT")


def test_export_names_only_the_adapted_modules(tmp_path):
    """GPT-2 has attention and MLP modules both called c_proj: the names must tell them apart."""
    model = decoder("gpt2")
    inject(model, IA3Config())
    export_peft(model, tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "IA3" and meta["fan_in_fan_out"] is True and meta["task_type"] == "CAUSAL_LM"
    assert sorted(meta["target_modules"]) == ["attn.c_attn", "mlp.c_proj"]
    assert meta["feedforward_modules"] == ["mlp.c_proj"]


# ---------------------------------------------------------------------------------------------
# import of folders PEFT wrote


def _peft_folder(tmp_path, name, peft_config, seed=0):
    base = MODELS[name]()
    model = peft.get_peft_model(base, peft_config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # PEFT starts at the identity (ones, B = 0): make the adapter matter
        for n, q in model.named_parameters():
            if "ia3_l" in n:
                q.copy_(1 + 0.3 * torch.randn(q.shape, generator=g))
            elif "lora_" in n:
                q.copy_(0.2 * torch.randn(q.shape, generator=g))
    model.save_pretrained(tmp_path / "peft")
    return model.eval(), tmp_path / "peft"


def _lora(r, targets, **kw):
    return lambda: peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **kw)


def _ia3(targets, feedforward, **kw):
    return lambda: peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, **kw)


LLAMA_IA3 = _ia3(["k_proj", "v_proj", "down_proj"], ["down_proj"])
IMPORTS = {
    "llama-LoRA": ("llama", _lora(4, "all-linear"), ("q", "k", "v", "o", "gate", "up", "down")),
    "llama-LoRA-q-v": ("llama", _lora(2, ["q_proj", "v_proj"]), ("q", "v")),
    "llama-LoRA-rslora": ("llama", _lora(4, ["o_proj"], use_rslora=True), ("o",)),
    "llama-IA3": ("llama", LLAMA_IA3, ("k", "v", "ffn")),
    "qwen3-IA3-v": ("qwen3", _ia3(["v_proj"], []), ("v",)),
    "gpt2-LoRA": ("gpt2", _lora(4, ["c_attn", "c_fc"], fan_in_fan_out=True), ("qkv", "fc")),
    "gpt2-IA3-q-scaled": ("gpt2", _ia3(["attn.c_attn", "mlp.c_proj"], ["mlp.c_proj"], fan_in_fan_out=True), None),
    "t5-v1.1-LoRA": ("t5-v1.1", _lora(4, ["q", "k", "v", "o", "wi_0", "wo"]), ("q", "k", "v", "o", "wi_0", "wo")),
    "t5-v1.0-IA3": ("t5-v1.0", _ia3(["k", "v", "wo"], ["wo"]), ("k", "v", "ffn")),
}


@pytest.mark.parametrize("case", list(IMPORTS))
def test_import_of_a_peft_folder_equals_peft(tmp_path, case):
    """``sites``: the built-in sites the import must choose (None: PEFT's modules named with target_modules —
    GPT-2's IA3 scales q too, which no built-in site does)."""
    name, make_config, sites = IMPORTS[case]
    theirs, folder = _peft_folder(tmp_path, name, make_config())
    ours = MODELS[name]()
    config = import_peft(ours, folder, implementation="torch")
    assert isinstance(config, LoRAConfig if "LoRA" in case else IA3Config) and config.num_experts == 1
    if sites is None:
        assert config.target_modules is not None
    else:
        assert set(config.sites) == set(sites) and config.target_modules is None
    inputs = _inputs(name, ours)
    out, ref = _logits(ours, inputs), _logits(theirs, inputs)
    truth = _logits(copy.deepcopy(theirs).double(), inputs)
    assert_within_rule(out, ref, truth, torch.float32, f"{case} imported, logits")
    assert (ref - _logits(MODELS[name](), inputs)).abs().max() > 0.05


@pytest.mark.parametrize("method", ["LoRA", "IA3"])
def test_upcycling_starts_equal_to_the_peft_model(tmp_path, method):
    """Every expert is the PEFT adapter and the router is fresh: Σ_e p_e·adapter = adapter since Σ_e p_e = 1."""
    make = _lora(4, "all-linear") if method == "LoRA" else LLAMA_IA3
    theirs, folder = _peft_folder(tmp_path, "llama", make())
    ours = MODELS["llama"]()
    config = import_peft(ours, folder, num_experts=4, implementation="torch")
    assert isinstance(config, MoLoRAConfig if method == "LoRA" else MoVConfig) and config.num_experts == 4
    params = adapter_state_dict(ours)
    routers = [p for k, p in params.items() if k.endswith(".router")]
    assert len(routers) == len(params) // (3 if method == "LoRA" else 2)
    for r in routers:  # fresh: normal(0, 0.02), not zero, not shared
        assert 0.005 < r.std().item() < 0.05
    for key, p in params.items():
        if not key.endswith(".router"):
            axis = 0 if method == "LoRA" else 1
            first = p.select(axis, 0)
            assert all(torch.equal(p.select(axis, e), first) for e in range(4)), key
    inputs = _inputs("llama", ours)
    out, ref = _logits(ours, inputs), _logits(theirs, inputs)
    truth = _logits(copy.deepcopy(theirs).double(), inputs)
    assert_within_rule(out, ref, truth, torch.float32, f"upcycled {method}-4 logits")
    with torch.no_grad():  # the experts are separate tensors: training one leaves the others
        p = params["model.layers.0.self_attn.q_proj.lora_a" if method == "LoRA" else "model.layers.0.mlp.mov.experts"]
        p.select(0 if method == "LoRA" else 1, 0).add_(1.0)
        assert not torch.equal(p.select(0 if method == "LoRA" else 1, 0), p.select(0 if method == "LoRA" else 1, 1))


# ---------------------------------------------------------------------------------------------
# refusals


def test_exporting_a_mixture_is_refused(tmp_path):
    for config in (MoVConfig(num_experts=2), MoLoRAConfig(num_experts=3)):
        model = decoder("llama")
        inject(model, config)
        with pytest.raises(ValueError, match=r"num_experts=\d > 1 has no PEFT form"):
            export_peft(model, tmp_path / "p")
        assert not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="no pemoe adapters"):
        export_peft(decoder("llama"), tmp_path / "p")


def test_unsupported_peft_folders_are_refused_and_the_model_unchanged(tmp_path):
    loha, folder = _peft_folder(tmp_path / "loha", "llama", peft.LoHaConfig(r=2, target_modules=["q_proj"]))
    model = MODELS["llama"]()
    snap = snapshot_model(model)
    with pytest.raises(ValueError, match=r"peft_type 'LOHA' is not supported"):
        import_peft(model, folder)

    _, folder = _peft_folder(tmp_path / "lora", "llama", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    meta = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**meta, "peft_type": "ADALORA"}))
    with pytest.raises(ValueError, match=r"peft_type 'ADALORA' is not supported"):
        import_peft(model, folder)
    (folder / "adapter_config.json").write_text(json.dumps({**meta, "use_dora": True}))
    with pytest.raises(ValueError, match=r"use_dora=True has no pemoe form"):
        import_peft(model, folder)
    (folder / "adapter_config.json").write_text(json.dumps({**meta, "rank_pattern": {"q_proj": 4}}))
    with pytest.raises(ValueError, match=r"rank_pattern"):
        import_peft(model, folder)
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:100])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is not a readable safetensors"):
        import_peft(model, folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        import_peft(model, folder)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        import_peft(model, tmp_path / "nowhere")
    assert_model_unchanged(model, snap)


def test_modules_pemoe_has_no_site_for_are_refused(tmp_path):
    model = MODELS["llama"]()
    snap = snapshot_model(model)
    _, folder = _peft_folder(tmp_path / "emb", "llama", peft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match=r"embed_tokens.*cannot import it"):
        import_peft(model, folder)
    _, folder = _peft_folder(
        tmp_path / "ffq", "llama", peft.IA3Config(target_modules=["q_proj"], feedforward_modules=["q_proj"])
    )
    with pytest.raises(
        ValueError, match=r"scales the input of model\.layers\.0\.self_attn\.q_proj, which pemoe has no"
    ):
        import_peft(model, folder)
    _, folder = _peft_folder(tmp_path / "gpt2", "gpt2", peft.LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"targeted module\(s\) this model lacks: \['transformer\.h\.0\.attn\.c_attn'"):
        import_peft(model, folder)
    assert_model_unchanged(model, snap)

    inject(model, IA3Config())
    with pytest.raises(ValueError, match="already has pemoe adapters"):
        import_peft(model, folder)
