"""pemoe.inject (pemoe.adapters) on transformers' T5 and pemoe's T5: placement, equivalence with PEFT, training,
adapter save/load, dtype/device moves, bad input (the model is left unchanged).

Tolerances (float32):
  * fresh MoLoRA/LoRA and (IA)3 models: logits bit-identical to the base model's (lora_b = 0;
    experts = 1 with E = 1). Fresh MoV (E > 1): each site's output equals its input h up to the
    float32 rounding of Σₑ pₑ (rtol 4e-7, as in tests/test_layers.py), checked site by site inside
    the model; the logits then agree to max|Δ| ≤ 1e-5·max(1, max|logits|).
  * pemoe (IA)3 / LoRA (E = 1) vs PEFT IA3 / LoRA on the same transformers T5: the math is the same
    but the order of float32 roundings differs ((a·l)·b vs (a·b)·l; a fused [x | U]·[Wᵀ; B] GEMM vs
    two GEMMs): logits and every adapter gradient must agree to max|Δ| ≤ 1e-5·max(1, max|ref|).
  * save → load: logits bit-identical.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
from torch import nn

import pemoe.ops
from pemoe.adapters import (
    IA3Config,
    LoRAConfig,
    MoLoRAConfig,
    MoVConfig,
    adapter_config,
    adapter_state_dict,
    authors_name,
    config_from_dict,
    from_authors_state,
    inject,
    load_adapter,
    load_adapter_state_dict,
    save_adapter,
    sentence_routing,
    to_authors_state,
)
from pemoe.layers import MoV, MoVLinear, count_parameters
from pemoe.models import T5
from tests.helpers import assert_model_unchanged, assert_within_rule, snapshot_model
from tests.t5_tiny import KINDS, batch, hf_t5, pemoe_t5

MODELS = {"transformers": hf_t5, "pemoe": pemoe_t5}


def _logits(model, ids, mask, dec):
    if isinstance(model, T5):
        return model(ids, mask, dec).logits
    return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits


def _loss(model, ids, mask, labels):
    if isinstance(model, T5):
        return model(ids, mask, labels=labels).loss
    return model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    bound = rel * max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= bound, f"{what}: max|Δ| {err:.3e} > {bound:.3e}"


def _randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


# ---------------------------------------------------------------------------------------------
# placement


@pytest.mark.parametrize("which", list(MODELS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_sites_and_counts_follow_spec(which, kind):
    model = MODELS[which](kind)
    L, M, F, H, D = 2, 32, 40, 4, 8  # tests/t5_tiny.DIMS: layers per stack, heads·d_kv, d_ff, heads, d_kv
    base_total = count_parameters(model).total
    mov = copy.deepcopy(model)
    count = inject(mov, MoVConfig(num_experts=5))
    E = 5
    # k, v of 3 attentions per layer pair (enc self, dec self, dec cross) + 2 FFNs (SPEC §2)
    assert count.trainable == L * E * (6 * M + 6 * D + 4 * F)
    assert count.total == base_total + count.trainable
    keys = list(adapter_state_dict(mov))
    assert "decoder.block.1.layer.1.EncDecAttention.v.experts" in keys
    assert "encoder.block.0.layer.1.DenseReluDense.mov.router" in keys
    assert "decoder.block.0.layer.2.DenseReluDense.mov.experts" in keys
    assert not any(".q." in k or ".o." in k for k in keys)
    assert adapter_state_dict(mov)["encoder.block.0.layer.0.SelfAttention.k.experts"].shape == (H, E, D)
    ia3 = copy.deepcopy(model)
    assert inject(ia3, IA3Config()).trainable == L * (6 * M + 2 * F)
    lora = copy.deepcopy(model)
    r = 4
    per_layer = 3 * (3 * (M * r + r * M) + (M * r + r * M))  # q, k, v, o in three attentions... per pair
    ffn = 2 * ((M * r + r * F) + (F * r + r * M))  # wi_0 (or wi) and wo in two FFNs
    assert inject(lora, LoRAConfig(rank=r)).trainable == L * (per_layer + ffn)
    ffn_site = "wi_0" if kind == "v1.1" else "wi"
    assert f"decoder.block.1.layer.2.DenseReluDense.{ffn_site}.lora_b" in adapter_state_dict(lora)
    assert not any("wi_1" in k for k in adapter_state_dict(lora))
    assert adapter_config(lora).sites == ("q", "k", "v", "o", ffn_site, "wo")


def test_fused_ops_run_inside_pemoe_t5_with_the_implementation(monkeypatch):
    calls = []

    def spy(name):
        real = getattr(pemoe.ops, name)

        def wrapper(*args, **kwargs):
            calls.append((name, kwargs["implementation"]))
            return real(*args, **kwargs)

        return wrapper

    for name in ("mov", "mov_linear", "mov_ffn", "molora_linear"):
        monkeypatch.setattr(pemoe.ops, name, spy(name))
    ids, mask, dec, _ = batch()
    model = pemoe_t5("v1.1")
    inject(model, MoVConfig(num_experts=3, implementation="reference"))
    model(ids, mask, dec)
    # 2 layers x (encoder: 1 attention, decoder: 2) x (k, v) and 2 layers x 2 stacks of FFNs
    assert sorted(set(calls)) == [("mov_ffn", "reference"), ("mov_linear", "reference")]
    assert calls.count(("mov_linear", "reference")) == 12 and calls.count(("mov_ffn", "reference")) == 4
    calls.clear()
    model = pemoe_t5("v1.0")
    inject(model, MoLoRAConfig(num_experts=2, implementation="torch"))
    model(ids, mask, dec)
    assert calls == [("molora_linear", "torch")] * (2 * (4 + 2) + 2 * (8 + 2))
    calls.clear()
    hf = hf_t5("v1.1")
    inject(hf, MoVConfig(num_experts=3, implementation="torch"))
    _logits(hf, ids, mask, dec)
    assert calls.count(("mov_linear", "torch")) == 12 and calls.count(("mov", "torch")) == 4


def test_ffn_dropout_in_training_runs_unfused_and_says_so(monkeypatch, caplog):
    model = pemoe_t5("v1.1")
    model.decoder.block[0].layer[2].DenseReluDense.dropout.p = 0.5
    inject(model, MoVConfig(num_experts=3, implementation="torch"))
    fused = []
    real = pemoe.ops.mov_ffn
    monkeypatch.setattr(pemoe.ops, "mov_ffn", lambda *a, **k: fused.append(1) or real(*a, **k))
    ids, mask, dec, _ = batch()
    with caplog.at_level(logging.INFO, logger="pemoe"):
        model.train()(ids, mask, dec)
    assert len(fused) == 3 and "MoV FFN runs unfused" in caplog.text
    fused.clear()
    model.eval()(ids, mask, dec)
    assert len(fused) == 4


# ---------------------------------------------------------------------------------------------
# fresh adapters reproduce the base model


@pytest.mark.parametrize("which", list(MODELS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_fresh_adapters_reproduce_the_base(which, kind):
    ids, mask, dec, _ = batch()
    model = MODELS[which](kind)
    with torch.no_grad():
        base = _logits(model, ids, mask, dec)
    for config in (LoRAConfig(), MoLoRAConfig(num_experts=4), IA3Config()):
        m = copy.deepcopy(model)
        inject(m, config)
        with torch.no_grad():
            assert torch.equal(_logits(m, ids, mask, dec), base), type(config).__name__
    m = copy.deepcopy(model)
    inject(m, MoVConfig(num_experts=10))
    checked = []

    def check_site(module, args, out):
        h = module.base(args[0]) if isinstance(module, MoVLinear) else args[0]
        torch.testing.assert_close(out, h, rtol=4e-7, atol=0)
        checked.append(module)

    for mod in m.modules():
        if isinstance(mod, MoVLinear) or (isinstance(mod, MoV) and which == "transformers"):
            mod.register_forward_hook(check_site)
    with torch.no_grad():
        got = _logits(m, ids, mask, dec)
    assert len(checked) == (12 + 4 if which == "transformers" else 12)
    _close(got, base, "fresh MoV logits")


# ---------------------------------------------------------------------------------------------
# equivalence with PEFT (E = 1)


def _peft_pairs(peft_model, ours, mapping):
    peft_params = dict(peft_model.named_parameters())
    pairs = []
    for key, p in adapter_state_dict(ours).items():
        peft_name, to_ours, from_ours = mapping(key)
        q = peft_params[f"base_model.model.{peft_name}"]
        pairs.append((key, p, q, to_ours, from_ours))
    assert len(pairs) == sum(1 for n, q in peft_params.items() if q.requires_grad)
    return pairs


def _compare_with_peft(peft_model, ours, pairs):
    ids, mask, dec, labels = batch(seed=7)
    with torch.no_grad():
        for _, p, q, to_ours, _ in pairs:
            p.copy_(to_ours(q))
    want = _logits(peft_model, ids, mask, dec)
    got = _logits(ours, ids, mask, dec)
    _close(got, want, "logits")
    _loss(peft_model, ids, mask, labels).backward()
    _loss(ours, ids, mask, labels).backward()
    for key, p, q, to_ours, _ in pairs:
        assert p.grad is not None and q.grad is not None, key
        _close(p.grad, to_ours(q.grad), f"grad {key}")
        assert p.grad.abs().max() > 0, key
    assert all(p.grad is None for n, p in ours.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("kind", list(KINDS))
def test_ia3_equals_peft_ia3(kind):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    base = hf_t5(kind, seed=11)
    ours = copy.deepcopy(base)
    inject(ours, IA3Config(implementation="torch"))
    peft_model = get_peft_model(base, PeftIA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]))
    with torch.no_grad():  # PEFT starts at ones: make the vectors matter
        for n, q in peft_model.named_parameters():
            if "ia3_l" in n:
                q.copy_(1 + 0.5 * torch.randn_like(q))

    def mapping(key):
        if key.endswith(".mov.experts"):  # FFN site <-> PEFT's scaling of wo's input [1, F]
            path = key[: -len(".mov.experts")] + ".wo.ia3_l.default"
            return path, lambda t: t.reshape(1, 1, -1), None
        path = key[: -len(".experts")] + ".ia3_l.default"  # k/v output [N, 1] <-> experts [G, 1, D]
        return path, lambda t: t.reshape(4, 1, 8), None

    _compare_with_peft(peft_model, ours, _peft_pairs(peft_model, ours, mapping))


@pytest.mark.parametrize("fused_columns", [False, True], ids=["separate-shrink", "fused-columns"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_lora_equals_peft_lora(kind, fused_columns, monkeypatch):
    """fused-columns: the float32 shrink as extra columns of the base GEMM (pemoe.ops.molora, used from
    FUSED_COLUMNS_MIN_TOKENS tokens; forced here for the tiny batch) against PEFT as well."""
    from peft import LoraConfig, get_peft_model

    from pemoe.ops import molora as molora_module

    if fused_columns:
        monkeypatch.setattr(molora_module, "FUSED_COLUMNS_MIN_TOKENS", 1)

    base = hf_t5(kind, seed=12)
    ours = copy.deepcopy(base)
    inject(ours, LoRAConfig(rank=4, alpha=16, implementation="torch"))
    ffn = ["wi_0", "wo"] if kind == "v1.1" else ["wi", "wo"]
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q", "k", "v", "o", *ffn])
    )
    with torch.no_grad():  # PEFT's B starts at zero: make the update matter
        for n, q in peft_model.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.2)

    def mapping(key):
        path, param = key.rsplit(".", 1)
        peft_name = f"{path}.{'lora_A' if param == 'lora_a' else 'lora_B'}.default.weight"
        return peft_name, lambda t: t.t().unsqueeze(0), None  # [r, K] -> [1, K, r]; [N, r] -> [1, r, N]

    _compare_with_peft(peft_model, ours, _peft_pairs(peft_model, ours, mapping))


# ---------------------------------------------------------------------------------------------
# training, generation, save / load


@pytest.mark.parametrize(
    "config", [MoVConfig(num_experts=4), MoLoRAConfig(num_experts=3, rank=2)], ids=["MoV-4", "MoLoRA-3"]
)
def test_only_adapters_train_and_the_loss_falls(config):
    model = pemoe_t5("v1.1")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in adapter_state_dict(model).values()}
    ids, mask, _, labels = batch(seed=3)
    opt = torch.optim.Adam(params, lr=3e-2)
    losses = []
    model.train()
    for _ in range(8):
        loss = model(ids, mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None for p in params)
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for n, p in model.named_parameters():  # the backbone did not move
        name = n.replace(".base.", ".")
        if name in frozen:
            assert torch.equal(p, frozen[name]), n
    out = model.eval().generate(ids, mask, max_new_tokens=5)
    assert out.shape[0] == 3 and out.shape[1] <= 6


@pytest.mark.parametrize("which", list(MODELS))
@pytest.mark.parametrize(
    "config", [MoVConfig(num_experts=3, top_k=2), MoLoRAConfig(num_experts=2)], ids=["MoV-3-top2", "MoLoRA-2"]
)
def test_save_load_round_trip_is_bit_exact(tmp_path, which, config):
    model = MODELS[which]("v1.1")
    fresh = copy.deepcopy(model)
    inject(model, config)
    _randomize_adapters(model)
    ids, mask, dec, _ = batch()
    with torch.no_grad():
        want = _logits(model, ids, mask, dec)
    save_adapter(model, tmp_path / "adapter.safetensors")
    loaded = load_adapter(fresh, tmp_path / "adapter.safetensors")  # not injected yet: injects the file's config
    assert loaded == adapter_config(model)
    for (k, p), (k2, q) in zip(adapter_state_dict(fresh).items(), adapter_state_dict(model).items(), strict=True):
        assert k == k2 and torch.equal(p, q) and p.requires_grad
    with torch.no_grad():
        assert torch.equal(_logits(fresh, ids, mask, dec), want)
    # into an already injected twin; and into the other model type (same weights, same adapter names)
    twin = MODELS[which]("v1.1")
    inject(twin, config)
    load_adapter(twin, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        assert torch.equal(_logits(twin, ids, mask, dec), want)
    other = MODELS["pemoe" if which == "transformers" else "transformers"]("v1.1")
    load_adapter(other, tmp_path / "adapter.safetensors")
    # the other type sums in other float32 orders, which the tiny T5 amplifies to well past 1e-5 of the
    # logits (float32 itself errs by ~1e-3 there): the tolerance rule against the float64 model
    with torch.no_grad():
        truth = _logits(copy.deepcopy(model).double(), ids, mask, dec)
        assert_within_rule(_logits(other, ids, mask, dec), want, truth, torch.float32, "other model type")


def test_generate_after_injection_transformers():
    hf = hf_t5("v1.0")
    inject(hf, MoVConfig(num_experts=3))
    _randomize_adapters(hf)
    ids, mask, _, _ = batch()
    ours = T5.from_hf(hf_t5("v1.0")).eval()
    inject(ours, MoVConfig(num_experts=3))
    load_adapter_state_dict(ours, {k: v.detach() for k, v in adapter_state_dict(hf).items()})
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=1, decoder_start_token_id=0, eos_token_id=1)
    want = hf.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, **kwargs)
    assert ours.generate(ids, mask, max_new_tokens=6).tolist() == want.tolist()


# ---------------------------------------------------------------------------------------------
# no_grad, dtypes, moves


@pytest.mark.parametrize("which", list(MODELS))
def test_inject_under_no_grad_then_train(which):
    model = MODELS[which]("v1.0")
    with torch.no_grad():
        inject(model, MoLoRAConfig(num_experts=2))
    ids, mask, _, labels = batch()
    _loss(model, ids, mask, labels).backward()
    assert all(p.requires_grad and p.grad is not None for p in adapter_state_dict(model).values())


@pytest.mark.parametrize("which", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("order", ["cast_then_inject", "inject_then_cast"])
def test_half_precision_backbones(which, dtype, order):
    model = MODELS[which]("v1.1")
    ids, mask, dec, labels = batch()
    with torch.no_grad():
        ref = _logits(model, ids, mask, dec)
    config = MoVConfig(num_experts=3) if dtype == torch.float16 else MoLoRAConfig(num_experts=3)
    if order == "cast_then_inject":
        model.to(dtype)
        inject(model, config)
    else:
        inject(model, config)
        model.to(dtype)
    assert {p.dtype for p in adapter_state_dict(model).values()} == {torch.float32}
    assert model.shared.weight.dtype == dtype
    with torch.no_grad():
        out = _logits(model, ids, mask, dec)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 0.1 * ref.abs().max()
    _loss(model, ids, mask, labels).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter_state_dict(model).values())


def test_moves_after_injection():
    model = pemoe_t5("v1.0")
    inject(model, MoVConfig(num_experts=2))
    ids, mask, dec, _ = batch()
    with torch.no_grad():
        want = model(ids, mask, dec).logits
        model.to("cpu").to(torch.float64)
        assert {p.dtype for p in adapter_state_dict(model).values()} == {torch.float64}
        got = model(ids, mask, dec).logits
    assert got.dtype == torch.float64
    _close(got.float(), want, "float64 vs float32", rel=1e-4)
    model.to("meta")
    assert all(p.device.type == "meta" for p in adapter_state_dict(model).values())


# ---------------------------------------------------------------------------------------------
# the authors' names


def test_authors_names_and_round_trip():
    mov = MoVConfig(num_experts=3)
    assert (
        authors_name("encoder.block.3.layer.0.SelfAttention.k.experts", mov)
        == "target/encoder/layers_3/attention/k_conv/mov_scaling"
    )
    assert (
        authors_name("decoder.block.0.layer.1.EncDecAttention.v.router", mov)
        == "target/decoder/layers_0/encoder_decoder_attention/v_conv/router/router_weights/v/kernel"
    )
    assert (
        authors_name("decoder.block.2.layer.2.DenseReluDense.mov.experts", mov)
        == "target/decoder/layers_2/mlp/intermediate_conv/mov_scaling"
    )
    assert (
        authors_name("decoder.block.0.layer.0.SelfAttention.v.experts", IA3Config())
        == "target/decoder/layers_0/self_attention/v_conv/ia3_scaling"
    )
    molora = MoLoRAConfig(num_experts=2)
    assert (
        authors_name("encoder.block.0.layer.0.SelfAttention.o.lora_a", molora)
        == "target/encoder/layers_0/attention/lora_output_conv/lora_A"
    )
    assert (
        authors_name("encoder.block.1.layer.1.DenseReluDense.wi_0.router", molora)
        == "target/encoder/layers_1/mlp/lora_intermediate_conv/router/router_weights/v/kernel"
    )
    assert (
        authors_name("encoder.block.1.layer.1.DenseReluDense.wo.lora_b", molora)
        == "target/encoder/layers_1/mlp/lora_output_conv/lora_B"
    )
    for config, shapes in (
        (MoVConfig(num_experts=3), {"mlp/intermediate_conv/mov_scaling": (3, 40), "k_conv/mov_scaling": (4, 3, 8)}),
        (IA3Config(), {"mlp/intermediate_conv/ia3_scaling": (40,), "k_conv/ia3_scaling": (4, 8)}),
        (LoRAConfig(), {"lora_q_conv/lora_A": (32, 4), "lora_output_conv/lora_B": (4, 32)}),
    ):
        model = pemoe_t5("v1.1")
        inject(model, config)
        _randomize_adapters(model)
        state = {k: v.detach() for k, v in adapter_state_dict(model).items()}
        authors = to_authors_state(state, config)
        assert len(authors) == len(state)
        for suffix, shape in shapes.items():
            hits = [v for k, v in authors.items() if k.endswith(suffix)]
            assert hits and all(tuple(v.shape) == shape for v in hits), suffix
        back = from_authors_state(authors, model)
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
        fresh = pemoe_t5("v1.1")
        inject(fresh, config)
        load_adapter_state_dict(fresh, back)
        assert all(torch.equal(adapter_state_dict(fresh)[k], state[k]) for k in state)
        with pytest.raises(ValueError, match="lack"):
            from_authors_state({k: v for k, v in list(authors.items())[1:]}, model)


def test_config_round_trips_through_dict():
    for config in (MoVConfig(num_experts=7, top_k=2, renormalize=True), IA3Config(sites=("k",)), LoRAConfig(rank=8)):
        assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown adapter method"):
        config_from_dict({"method": "prefix"})


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, model unchanged


def test_bad_configs():
    with pytest.raises(ValueError, match=r"MoVConfig.num_experts must be an int >= 1, got 0"):
        MoVConfig(num_experts=0)
    with pytest.raises(ValueError, match=r"MoLoRAConfig.rank must be an int >= 1, got 0"):
        MoLoRAConfig(rank=0)
    with pytest.raises(ValueError, match=r"LoRAConfig.rank must be an int >= 1, got -1"):
        LoRAConfig(rank=-1)
    with pytest.raises(ValueError, match=r"IA3Config.num_experts must be 1"):
        IA3Config(num_experts=2)
    with pytest.raises(ValueError, match=r"unknown site\(s\) \['wq'\]; valid sites: k, v, ffn"):
        MoVConfig(sites=("k", "wq"))
    with pytest.raises(ValueError, match=r"unknown site\(s\) \['ffn'\]"):
        MoLoRAConfig(sites=("q", "ffn"))
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=4\], got 5"):
        MoVConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="implementation must be one of"):
        MoVConfig(implementation="cuda")
    with pytest.raises(ValueError, match="router_input must be one of"):
        MoVConfig(router_input="paragraph")
    with pytest.raises(ValueError, match="sentence routing needs num_experts > 1"):
        LoRAConfig(router_input="sentence")
    with pytest.raises(ValueError, match="router_input_dim is for router_input='sentence' only"):
        MoVConfig(router_input_dim=8)


@pytest.mark.parametrize("which", list(MODELS))
def test_bad_injections_leave_the_model_unchanged(which):
    model = MODELS[which]("v1.0")
    snap = snapshot_model(model)
    with pytest.raises(ValueError, match=r"\['wi_0'\] not in this model's T5 v1.0 FFN \(wi, wo\)"):
        inject(model, MoLoRAConfig(sites=("q", "wi_0")))
    assert_model_unchanged(model, snap)
    with pytest.raises(TypeError, match="config must be a MoVConfig"):
        inject(model, {"num_experts": 3})
    assert_model_unchanged(model, snap)
    # a site that is not a Linear, met after other sites were already built: everything is undone
    model.decoder.block[1].layer[1].EncDecAttention.k = nn.Identity()
    snap = snapshot_model(model)
    with pytest.raises(TypeError, match=r"decoder.block.1.layer.1.EncDecAttention.k must be a torch.nn.Linear"):
        inject(model, MoVConfig(num_experts=2))
    assert_model_unchanged(model, snap)


@pytest.mark.parametrize("which", list(MODELS))
def test_inject_twice_is_refused(which):
    model = MODELS[which]("v1.1")
    inject(model, IA3Config())
    snap = snapshot_model(model)
    with pytest.raises(ValueError, match=r"already has pemoe adapters \(IA3Config"):
        inject(model, IA3Config())
    with pytest.raises(ValueError, match="already has pemoe adapters"):
        inject(model, MoLoRAConfig())
    assert_model_unchanged(model, snap)


def test_non_t5_models_are_refused():
    from transformers import T5Config as HFConfig
    from transformers import T5EncoderModel

    for model in (nn.Sequential(nn.Linear(4, 4)), T5EncoderModel(HFConfig(num_layers=1, d_model=8, d_ff=8, d_kv=2))):
        snap = snapshot_model(model)
        with pytest.raises(
            ValueError, match=f"supports transformers' T5ForConditionalGeneration .* got .*{type(model).__name__}"
        ):
            inject(model, MoVConfig())
        assert_model_unchanged(model, snap)


def test_loading_mismatched_adapters_is_refused(tmp_path):
    path = tmp_path / "mov4.safetensors"
    src = pemoe_t5("v1.1")
    inject(src, MoVConfig(num_experts=4))
    save_adapter(src, path)
    # injected with another config
    other = pemoe_t5("v1.1")
    inject(other, MoVConfig(num_experts=3))
    snap = snapshot_model(other)
    with pytest.raises(ValueError, match=r"saved for another adapter config: num_experts: file 4 vs model 3"):
        load_adapter(other, path)
    assert_model_unchanged(other, snap)
    # not injected, other shapes (d_ff 48): the file's config is injected, the shapes fail, all is undone
    wider = pemoe_t5("v1.1", d_ff=48)
    snap = snapshot_model(wider)
    with pytest.raises(
        ValueError,
        match=r"encoder.block.0.layer.1.DenseReluDense.mov.experts has shape \[1, 4, 40\], the model's is \[1, 4, 48\]",
    ):
        load_adapter(wider, path)
    assert_model_unchanged(wider, snap)
    assert adapter_config(wider) is None
    # another FFN kind: the site list differs in keys
    v10 = pemoe_t5("v1.0")
    inject(v10, MoVConfig(num_experts=4))
    src_keys_ok = load_adapter(v10, path)  # same sites and shapes (d_ff 40 in both): loads
    assert src_keys_ok.num_experts == 4
    # a file that is not a pemoe adapter
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    fresh = pemoe_t5("v1.1")
    snap = snapshot_model(fresh)
    with pytest.raises(ValueError, match="not a pemoe adapter file"):
        load_adapter(fresh, tmp_path / "plain.safetensors")
    assert_model_unchanged(fresh, snap)
    # a deeper model: keys missing in the file
    deep = pemoe_t5("v1.1", num_layers=3)
    snap = snapshot_model(deep)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['encoder.block.2"):
        load_adapter(deep, path)
    assert_model_unchanged(deep, snap)


# ---------------------------------------------------------------------------------------------
# sentence routing


@pytest.mark.parametrize(
    "config",
    [
        MoVConfig(num_experts=3, router_input="sentence"),
        MoLoRAConfig(num_experts=2, router_input="sentence", router_input_dim=6),
    ],
    ids=["MoV-3", "MoLoRA-2-R6"],
)
def test_sentence_routing(tmp_path, config):
    ids, mask, dec, labels = batch()
    models = {}
    for which, make in MODELS.items():
        models[which] = make("v1.1")
        inject(models[which], config)
    _randomize_adapters(models["transformers"])
    state = {k: v.detach() for k, v in adapter_state_dict(models["transformers"]).items()}
    load_adapter_state_dict(models["pemoe"], state)
    dim = config.router_input_dim or 32
    assert state["encoder.block.0.layer.0.SelfAttention.k.router"].shape == (dim, config.num_experts)
    router_input = torch.randn(3, dim)
    for model in models.values():
        with pytest.raises(ValueError, match="routes by sentence"):
            _logits(model, ids, mask, dec)
        with pytest.raises(
            ValueError, match=rf"router_input must have shape \[B, R\] = \[batch, {dim}\], got \[3, 5\]"
        ):
            with sentence_routing(model, torch.randn(3, 5)):
                pass
    with torch.no_grad():
        with sentence_routing(models["transformers"], router_input):
            want = _logits(models["transformers"], ids, mask, dec)
        with sentence_routing(models["pemoe"], router_input):
            got = _logits(models["pemoe"], ids, mask, dec)
            other = router_input.clone()
            other[0] += 1.0
        with sentence_routing(models["pemoe"], other):
            moved = _logits(models["pemoe"], ids, mask, dec)
    _close(got, want, "pemoe vs transformers, sentence routing")
    # one vector per sequence: changing row 0's vector changes row 0 only
    assert not torch.equal(moved[0], got[0]) and torch.equal(moved[1:], got[1:])
    model = models["pemoe"]
    with sentence_routing(model, router_input):
        model(ids, mask, labels=labels).loss.backward()
        gen = model.generate(ids, mask, max_new_tokens=5)
    with sentence_routing(models["transformers"], router_input):
        hf_gen = models["transformers"].generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, num_beams=1, decoder_start_token_id=0
        )
    assert gen.tolist() == hf_gen.tolist()
    routers = [p for k, p in adapter_state_dict(model).items() if k.endswith(".router")]
    assert routers and all(p.grad is not None and p.grad.abs().max() > 0 for p in routers)
    # the routing input kind is part of the saved config
    save_adapter(model, tmp_path / "sentence.safetensors")
    token = pemoe_t5("v1.1")
    inject(token, dataclasses.replace(config, router_input="token", router_input_dim=None))
    snap = snapshot_model(token)
    with pytest.raises(ValueError, match="router_input: file 'sentence' vs model 'token'"):
        load_adapter(token, tmp_path / "sentence.safetensors")
    assert_model_unchanged(token, snap)
    fresh = pemoe_t5("v1.1")
    load_adapter(fresh, tmp_path / "sentence.safetensors")
    with torch.no_grad(), sentence_routing(fresh, router_input):
        assert torch.equal(_logits(fresh, ids, mask, dec), got)


def test_pemoe_inject_is_the_function():
    import pemoe

    model = pemoe_t5("v1.0")
    assert pemoe.inject(model, IA3Config()).trainable == 2 * (6 * 32 + 2 * 40)
    assert pemoe.adapters.adapter_config(model) == IA3Config(sites=("k", "v", "ffn"))


def _damaged_files(good: bytes) -> dict[str, bytes]:
    header_len = int.from_bytes(good[:8], "little")
    return {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "random": bytes(torch.randint(0, 256, (len(good),), generator=torch.Generator().manual_seed(0)).tolist()),
        "header-length": (len(good) * 4).to_bytes(8, "little") + good[8:],  # header runs past the file's end
        "header-json": good[:8] + b"{" * header_len + good[8 + header_len :],  # header bytes that are not JSON
        "config-json": good.replace(b'"pemoe_config":"{', b'"pemoe_config":"[', 1),  # metadata not a config
    }


@pytest.mark.parametrize("injected", [False, True], ids=["fresh", "injected"])
def test_loading_a_damaged_file_names_it_and_changes_nothing(tmp_path, injected):
    src = pemoe_t5("v1.1")
    inject(src, MoVConfig(num_experts=2))
    good_path = tmp_path / "good.safetensors"
    save_adapter(src, good_path)
    good = good_path.read_bytes()
    model = pemoe_t5("v1.1")
    if injected:
        inject(model, MoVConfig(num_experts=2))
    snap, config = snapshot_model(model), adapter_config(model)
    cases = _damaged_files(good)
    assert set(cases) and all(v != good for v in cases.values())
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=str(path)) as e:
            load_adapter(model, path)
        assert type(e.value) is ValueError, (name, type(e.value))
        assert_model_unchanged(model, snap)
        assert adapter_config(model) == config, name
    with pytest.raises(ValueError, match=f"{tmp_path} is a directory"):
        load_adapter(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.safetensors does not exist"):
        load_adapter(model, tmp_path / "nope.safetensors")
    assert_model_unchanged(model, snap)
    load_adapter(model, good_path)  # the good file still loads into the same model


def test_save_adapter_names_bad_paths_and_writes_atomically(tmp_path, monkeypatch):
    model = pemoe_t5("v1.1")
    inject(model, MoVConfig(num_experts=2))
    with pytest.raises(FileNotFoundError, match="missing"):
        save_adapter(model, tmp_path / "missing" / "a.safetensors")
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory"):
        save_adapter(model, tmp_path)
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    before = path.read_bytes()
    _randomize_adapters(model)

    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path)
    assert path.read_bytes() == before  # the good file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temporary file left behind
