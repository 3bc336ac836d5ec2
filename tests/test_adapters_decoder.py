"""pemoe.inject on decoder-only transformers models (Llama, Mistral, Qwen2, Qwen3, Gemma2, GPT-2) and with
target_modules on any model: placement and counts, equality with PEFT, fresh adapters = base, generation with
and without the KV cache, gradient checkpointing, half precision, save/load, bad input.

Tolerance: the single rule of tests/helpers.py (pemoe.testing.check_rule). For a pemoe float32 output or
gradient ``out``, ``ref`` is the same quantity from the peer in float32 (PEFT, or the base model for fresh
adapters) and ``truth`` from that peer in float64 with the same (upcast) weights:
max|out - truth| <= 2·max|ref - truth| + ATOL[float32]·max(max|truth|, 1).
Gradient checkpointing: ``ref`` is the float32 gradient without checkpointing, ``truth`` the float64 one
(recomputation may sum in another order). Cached and uncached decoding: the greedy tokens must be equal.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pemoe.adapters import (
    IA3Config,
    LoRAConfig,
    MoLoRAConfig,
    MoVConfig,
    adapter_config,
    adapter_state_dict,
    config_from_dict,
    inject,
    load_adapter,
    load_adapter_state_dict,
    save_adapter,
    sentence_routing,
)
from pemoe.layers import MoLoRALinear, MoVLinear
from pemoe.placements import Conv1DLinear, FusedGatedMLP, MoVActivation, PackedMoV
from tests.decoder_tiny import FAMILIES, decoder, dims, ids
from tests.helpers import assert_model_unchanged, assert_within_rule, snapshot_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one intra-op thread is fastest, and steady when other jobs share the cores
    (threads spinning for a busy core made each tiny matmul take milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(model, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------------------------------------
# placement and counts (SPEC §2, decoder-only table), derived here from the configs


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_and_counts_follow_spec(family):
    model = decoder(family)
    d = dims(model)
    L, H, hd, G, F = d["layers"], d["hidden"], d["head_dim"], d["kv_heads"], d["intermediate"]
    Q, KV = d["heads"] * hd, G * hd  # query and key/value widths
    E, r = 3, 4
    total = sum(p.numel() for p in model.parameters())

    ia3 = copy.deepcopy(model)
    assert inject(ia3, IA3Config()).trainable == L * (2 * KV + F)  # k, v and the FFN activation
    mov = copy.deepcopy(model)
    count = inject(mov, MoVConfig(num_experts=E))
    # k, v: experts [G, E, hd] + router [hd, E] each; FFN: experts [1, E, F] + router [F, E]
    assert count.trainable == L * E * (2 * KV + 2 * hd + 2 * F)
    assert count.total == total + count.trainable
    state = adapter_state_dict(mov)
    attn = "transformer.h.0.attn.c_attn." if family == "gpt2" else "model.layers.0.self_attn."
    k = attn + ("k" if family == "gpt2" else "k_proj")
    assert state[f"{k}.experts"].shape == (G, E, hd) and state[f"{k}.router"].shape == (hd, E)
    mlp = "transformer.h.1.mlp" if family == "gpt2" else "model.layers.1.mlp"
    assert state[f"{mlp}.mov.experts"].shape == (1, E, F)
    assert not any("q_proj" in key or "lm_head" in key or "embed" in key or "wte" in key for key in state)

    # LoRA r: every linear of attention and MLP; each adds r·(in + out)
    if family == "gpt2":
        linears = [(H, 3 * H), (H, H), (H, F), (F, H)]  # c_attn, attn c_proj, c_fc, mlp c_proj
        sites = ("qkv", "o", "fc", "proj")
    else:
        linears = [(H, Q), (H, KV), (H, KV), (Q, H), (H, F), (H, F), (F, H)]  # q k v o gate up down
        sites = ("q", "k", "v", "o", "gate", "up", "down")
    lora = copy.deepcopy(model)
    assert inject(lora, LoRAConfig(rank=r)).trainable == L * sum(r * (i + o) for i, o in linears)
    assert adapter_config(lora).sites == sites
    molora = copy.deepcopy(model)
    routers = sum(i for i, _ in linears) * E  # each router [in, E]
    assert inject(molora, MoLoRAConfig(num_experts=E, rank=r)).trainable == L * (
        E * sum(r * (i + o) for i, o in linears) + routers
    )
    assert not any("lm_head" in key or "wte" in key for key in adapter_state_dict(molora))


def test_module_kinds_and_no_weight_copies():
    llama = decoder("llama")
    plain_mlp_weight = llama.model.layers[0].mlp.gate_proj.weight
    inject(llama, MoVConfig(num_experts=2))
    attn, mlp = llama.model.layers[0].self_attn, llama.model.layers[0].mlp
    assert isinstance(attn.k_proj, MoVLinear) and isinstance(attn.v_proj, MoVLinear)
    assert isinstance(attn.q_proj, nn.Linear) and isinstance(attn.o_proj, nn.Linear)
    assert attn.k_proj.site.num_groups == 2 and attn.k_proj.site.dim == 16  # GQA: kv heads, head_dim
    assert isinstance(mlp, FusedGatedMLP) and mlp.activation == "silu"  # the fused mov_ffn
    assert mlp.gate_proj.weight is plain_mlp_weight
    gpt2 = decoder("gpt2")
    weights = {n: p for n, p in gpt2.named_parameters() if n.endswith("c_attn.weight") or n.endswith("c_fc.weight")}
    inject(gpt2, LoRAConfig())
    c_attn = gpt2.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, MoLoRALinear) and isinstance(c_attn.base, Conv1DLinear)
    # the view shares the Conv1D's parameter: no copy of the frozen weight
    assert c_attn.base.conv.weight is weights["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.weight.shape == (96, 32) and c_attn.weight.data_ptr() == c_attn.base.conv.weight.data_ptr()
    gpt2_mov = decoder("gpt2")
    inject(gpt2_mov, MoVConfig(num_experts=2))
    packed = gpt2_mov.transformer.h[0].attn.c_attn
    assert isinstance(packed, PackedMoV) and packed.parts == ("q", "k", "v")
    assert {n for n, _ in packed.named_children()} == {"base", "k", "v"}


# ---------------------------------------------------------------------------------------------
# fresh adapters reproduce the base model


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapters_reproduce_the_base(family):
    model = decoder(family)
    x = ids(model)
    with torch.no_grad():
        ref = model(x).logits
        truth = copy.deepcopy(model).double()(x).logits
    for config in (IA3Config(), LoRAConfig(), MoVConfig(num_experts=10), MoLoRAConfig(num_experts=4)):
        m = copy.deepcopy(model)
        inject(m, config)
        with torch.no_grad():
            out = m(x).logits
        assert_within_rule(out, ref, truth, torch.float32, f"{family} fresh {type(config).__name__}")


# ---------------------------------------------------------------------------------------------
# equality with PEFT (E = 1): logits and adapter gradients


def _run(model, x):
    out = model(x, labels=x)
    out.loss.backward()
    return out.logits.detach()


def _check_peer(ours, peft_model, views, x, what):
    """views: our adapter key -> (PEFT parameter, fn(PEFT tensor) -> tensor in our layout)."""
    with torch.no_grad():
        for key, p in adapter_state_dict(ours).items():
            q, view = views[key]
            p.copy_(view(q))
    truth_model = copy.deepcopy(peft_model).double()
    truth_params = dict(truth_model.named_parameters())
    peft_names = {id(q): n for n, q in peft_model.named_parameters()}
    ref, truth, out = _run(peft_model, x), _run(truth_model, x), _run(ours, x)
    assert_within_rule(out, ref, truth, torch.float32, f"{what} logits")
    for key, p in adapter_state_dict(ours).items():
        q, view = views[key]
        g_truth = view(truth_params[peft_names[id(q)]].grad)
        assert p.grad is not None and p.grad.abs().max() > 0, key
        assert_within_rule(p.grad, view(q.grad), g_truth, torch.float32, f"{what} grad {key}")
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_equals_peft_ia3(family):
    """Sites: k_proj, v_proj (output) and down_proj (input, feed-forward) in PEFT; GPT-2: PEFT scales all of
    c_attn's output, so its q block is held at 1 (pemoe never scales q) and only its k and v blocks are
    compared; the FFN site is PEFT's scaling of the MLP c_proj's input."""
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    base = decoder(family, seed=11)
    ours = copy.deepcopy(base)
    inject(ours, IA3Config(implementation="torch"))
    if family == "gpt2":
        peft_config = PeftIA3Config(
            target_modules=["attn.c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True
        )
    else:
        peft_config = PeftIA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    peft_model = get_peft_model(base, peft_config)
    params = dict(peft_model.named_parameters())
    d = dims(base)
    G, hd, H = d["kv_heads"], d["head_dim"], d["hidden"]
    with torch.no_grad():  # PEFT starts at ones: make the vectors matter
        for n, q in params.items():
            if "ia3_l" in n:
                q.copy_(1 + 0.5 * torch.randn_like(q))
                if family == "gpt2" and "c_attn" in n:
                    q[:H] = 1  # the q block: not a pemoe site

    views = {}
    for key in adapter_state_dict(ours):
        path = key[: -len(".experts")]
        if path.endswith(".mov"):  # FFN activation <-> PEFT's scaling of down_proj's (c_proj's) input [1, F]
            down = "c_proj" if family == "gpt2" else "down_proj"
            q = params[f"base_model.model.{path[: -len('.mov')]}.{down}.ia3_l.default"]
            views[key] = (q, lambda t: t.reshape(1, 1, -1))
        elif family == "gpt2":  # c_attn.{k,v} <-> rows [H, 2H) / [2H, 3H) of PEFT's [3H, 1]
            c_attn, part = path.rsplit(".", 1)
            lo = {"k": H, "v": 2 * H}[part]
            q = params[f"base_model.model.{c_attn}.ia3_l.default"]
            views[key] = (q, lambda t, lo=lo: t[lo : lo + H].reshape(G, 1, hd))
        else:  # k/v output [G·hd, 1] <-> experts [G, 1, hd]
            views[key] = (params[f"base_model.model.{path}.ia3_l.default"], lambda t: t.reshape(G, 1, hd))
    assert len({id(q) for q, _ in views.values()}) == sum(1 for q in params.values() if q.requires_grad)
    _check_peer(ours, peft_model, views, ids(base, seed=7), f"{family} IA3")


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_equals_peft_lora(family):
    from peft import LoraConfig, get_peft_model

    base = decoder(family, seed=12)
    ours = copy.deepcopy(base)
    inject(ours, LoRAConfig(rank=4, alpha=16, implementation="torch"))
    if family == "gpt2":
        targets = ["c_attn", "c_proj", "c_fc"]
    else:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=family == "gpt2"),
    )
    params = dict(peft_model.named_parameters())
    with torch.no_grad():  # PEFT's B starts at zero: make the update matter
        for n, q in params.items():
            if "lora_B" in n:
                q.normal_(0, 0.2)
    views = {}
    for key in adapter_state_dict(ours):
        path, param = key.rsplit(".", 1)
        q = params[f"base_model.model.{path}.{'lora_A' if param == 'lora_a' else 'lora_B'}.default.weight"]
        views[key] = (q, lambda t: t.t().unsqueeze(0))  # [r, K] -> [1, K, r]; [N, r] -> [1, r, N]
    assert len(views) == sum(1 for q in params.values() if q.requires_grad)
    _check_peer(ours, peft_model, views, ids(base, seed=8), f"{family} LoRA")


# ---------------------------------------------------------------------------------------------
# generation, gradient checkpointing, dtypes


CONFIGS = {
    "MoV-3": MoVConfig(num_experts=3),
    "MoLoRA-3": MoLoRAConfig(num_experts=3, rank=2),
    "MoV-3-sentence": MoVConfig(num_experts=3, router_input="sentence"),
    "MoLoRA-3-sentence": MoLoRAConfig(num_experts=3, rank=2, router_input="sentence"),
}


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_with_and_without_the_kv_cache(family, name):
    config = CONFIGS[name]
    model = decoder(family, seed=3)
    x = ids(model, seed=4, length=5)
    with torch.no_grad():
        base = model(x).logits
    inject(model, config)
    _randomize(model, scale=0.5)
    kwargs = dict(max_new_tokens=8, do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)
    routing = torch.randn(x.shape[0], model.config.hidden_size) if config.router_input == "sentence" else None
    with torch.no_grad():
        if routing is None:
            cached = model.generate(x, use_cache=True, **kwargs)
            plain = model.generate(x, use_cache=False, **kwargs)
            logits = model(x).logits
        else:
            with sentence_routing(model, routing):
                cached = model.generate(x, use_cache=True, **kwargs)
                plain = model.generate(x, use_cache=False, **kwargs)
                logits = model(x).logits
    assert cached.shape == (x.shape[0], x.shape[1] + 8)
    assert cached.tolist() == plain.tolist()
    assert (logits - base).abs().max() > 1e-3  # the adapters take part
    if routing is not None:  # router [hidden, E]: reads the sentence vector
        router = next(p for k, p in adapter_state_dict(model).items() if k.endswith(".router"))
        assert router.shape == (model.config.hidden_size, 3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("config", [MoVConfig(num_experts=3), MoLoRAConfig(num_experts=3)], ids=["MoV-3", "MoLoRA-3"])
def test_gradient_checkpointing_gives_the_same_gradients(family, config):
    """transformers' gradient_checkpointing_enable calls enable_input_require_grads itself for models fed
    input_ids, so reentrant checkpointing with frozen embeddings needs nothing from pemoe."""
    model = decoder(family, seed=5)
    inject(model, config)
    _randomize(model)
    model.train()
    x = ids(model, seed=6)

    def grads(m):
        m.zero_grad(set_to_none=True)
        m(x, labels=x).loss.backward()
        return {k: p.grad.clone() for k, p in adapter_state_dict(m).items()}

    truth = grads(copy.deepcopy(model).double())
    ref = grads(model)
    assert all(g.abs().max() > 0 for g in ref.values())
    for reentrant in (True, False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert model.is_gradient_checkpointing
        got = grads(model)
        model.gradient_checkpointing_disable()
        assert got.keys() == ref.keys()
        for k in ref:
            assert_within_rule(got[k], ref[k], truth[k], torch.float32, f"use_reentrant={reentrant} grad {k}")
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_keeps_adapters_float32(family, dtype):
    model = decoder(family)
    x = ids(model)
    with torch.no_grad():
        ref = model(x).logits
    inject(model, MoVConfig(num_experts=3) if dtype == torch.float16 else MoLoRAConfig(num_experts=3))
    model.half() if dtype == torch.float16 else model.to(torch.bfloat16)
    assert {p.dtype for p in adapter_state_dict(model).values()} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {dtype}
    out = model(x, labels=x)
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()
    assert (out.logits.float() - ref).abs().max() <= 0.1 * ref.abs().max()
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter_state_dict(model).values())


# ---------------------------------------------------------------------------------------------
# target_modules


def test_target_modules_names_regex_and_all_linear():
    llama = decoder("llama")
    names = copy.deepcopy(llama)
    inject(names, MoLoRAConfig(num_experts=2, target_modules=["q_proj", "mlp.down_proj"]))
    keys = {k.rsplit(".", 1)[0] for k in adapter_state_dict(names)}
    assert keys == {f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")}
    assert adapter_config(names).sites is None
    regex = copy.deepcopy(llama)
    inject(regex, LoRAConfig(target_modules=r"model\.layers\.1\.self_attn\.(k|v)_proj"))
    assert {k.rsplit(".", 1)[0] for k in adapter_state_dict(regex)} == {
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj",
    }
    every = copy.deepcopy(llama)
    inject(every, LoRAConfig(target_modules="all-linear"))
    assert len({k.rsplit(".", 1)[0] for k in adapter_state_dict(every)}) == 2 * 7  # not lm_head
    gpt2 = decoder("gpt2")  # tied LM head: excluded too
    inject(gpt2, LoRAConfig(target_modules="all-linear"))
    assert len({k.rsplit(".", 1)[0] for k in adapter_state_dict(gpt2)}) == 2 * 4


def test_target_modules_mov_groups():
    llama = decoder("llama")
    d = dims(llama)
    inferred = copy.deepcopy(llama)  # k_proj: parent has head_dim -> kv heads; gate_proj: one group
    inject(inferred, MoVConfig(num_experts=2, target_modules=["k_proj", "gate_proj", "act_fn"]))
    state = adapter_state_dict(inferred)
    assert state["model.layers.0.self_attn.k_proj.experts"].shape == (d["kv_heads"], 2, d["head_dim"])
    assert state["model.layers.0.mlp.gate_proj.experts"].shape == (1, 2, d["intermediate"])
    assert state["model.layers.0.mlp.mov.experts"].shape == (1, 2, d["intermediate"])  # act_fn's output
    given = copy.deepcopy(llama)
    inject(given, MoVConfig(num_experts=2, num_groups=8, target_modules=["k_proj", "gate_proj"]))
    state = adapter_state_dict(given)
    assert state["model.layers.1.self_attn.k_proj.experts"].shape == (8, 2, 32 // 8)
    assert state["model.layers.1.mlp.gate_proj.experts"].shape == (8, 2, 96 // 8)


def test_target_modules_can_name_the_built_in_sites():
    """The built-in placement spelled as target_modules: the same adapter names, shapes and logits."""
    llama = decoder("qwen3")
    x = ids(llama)
    for built_in, targets in (
        (MoVConfig(num_experts=3), MoVConfig(num_experts=3, target_modules=["k_proj", "v_proj", "act_fn"])),
        (LoRAConfig(), LoRAConfig(target_modules=[f"{n}_proj" for n in ("q", "k", "v", "o", "gate", "up", "down")])),
    ):
        a, b = copy.deepcopy(llama), copy.deepcopy(llama)
        inject(a, built_in)
        inject(b, targets)
        _randomize(a)
        sa, sb = adapter_state_dict(a), adapter_state_dict(b)
        assert sorted(sa) == sorted(sb) and all(sa[k].shape == sb[k].shape for k in sa)
        with torch.no_grad():
            for k in sa:
                sb[k].copy_(sa[k])
            assert torch.equal(a(x).logits, b(x).logits)


def test_target_modules_on_t5_match_its_built_in_mov_sites():
    """transformers' T5: k and v take the attention's key_value_proj_dim heads, ``act`` is the FFN site."""
    from tests.t5_tiny import batch, hf_t5

    model = hf_t5("v1.1")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    inject(a, MoVConfig(num_experts=3))
    inject(b, MoVConfig(num_experts=3, target_modules=["k", "v", "act"]))
    _randomize(a)
    sa, sb = adapter_state_dict(a), adapter_state_dict(b)
    assert sorted(sa) == sorted(sb) and all(sa[k].shape == sb[k].shape for k in sa)
    ids_, mask, dec, _ = batch()
    with torch.no_grad():
        for k in sa:
            sb[k].copy_(sa[k])
        want = a(input_ids=ids_, attention_mask=mask, decoder_input_ids=dec).logits
        assert torch.equal(b(input_ids=ids_, attention_mask=mask, decoder_input_ids=dec).logits, want)


def test_target_modules_mov_on_gpt2_conv1d():
    gpt2 = decoder("gpt2")
    x = ids(gpt2)
    with torch.no_grad():
        ref = gpt2(x).logits
        truth = copy.deepcopy(gpt2).double()(x).logits
    inject(gpt2, MoVConfig(num_experts=4, target_modules=["c_attn", "c_fc"]))
    state = adapter_state_dict(gpt2)
    # c_attn [3·32 outputs]: its attention's head_dim 8 gives 12 groups (q, k and v heads); c_fc: one group
    assert state["transformer.h.0.attn.c_attn.experts"].shape == (12, 4, 8)
    assert state["transformer.h.0.mlp.c_fc.experts"].shape == (1, 4, 128)
    assert isinstance(gpt2.transformer.h[0].attn.c_attn.base, Conv1DLinear)
    with torch.no_grad():
        out = gpt2(x).logits
    assert_within_rule(out, ref, truth, torch.float32, "fresh MoV on Conv1D outputs")


def test_target_modules_on_a_model_without_a_built_in_placement(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 4))
    snap = snapshot_model(model)
    with pytest.raises(ValueError, match=r"got torch\.nn\.modules\.container\.Sequential.*target_modules"):
        inject(model, MoLoRAConfig())
    assert_model_unchanged(model, snap)
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = model(x)
    count = inject(model, MoLoRAConfig(num_experts=2, rank=2, target_modules="all-linear"))
    assert count.trainable == 2 * 2 * (8 + 12) + 2 * 8 + 2 * 2 * (12 + 4) + 2 * 12
    with torch.no_grad():
        assert torch.equal(model(x), want)  # lora_b = 0
    _randomize(model)
    with torch.no_grad():
        want = model(x)
    save_adapter(model, tmp_path / "seq.safetensors")
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 4))
    assert load_adapter(fresh, tmp_path / "seq.safetensors") == adapter_config(model)
    assert model._pemoe_adapter["model"] == "torch"
    with torch.no_grad():
        assert torch.equal(fresh(x), want)


def test_config_round_trip_with_target_modules(tmp_path):
    for config in (
        MoVConfig(num_experts=3, target_modules=["k_proj", "v_proj"], num_groups=2),
        LoRAConfig(target_modules=r".*\.(q|v)_proj"),
        MoLoRAConfig(target_modules="all-linear"),
        MoLoRAConfig(sites=("q", "gate")),
    ):
        back = config_from_dict(config.to_dict())
        assert back == config and hash(back) == hash(config)
    assert MoVConfig(target_modules=["k_proj"]).target_modules == ("k_proj",)
    model = decoder("mistral")
    inject(model, MoVConfig(num_experts=2, target_modules=["v_proj"], num_groups=4))
    _randomize(model)
    save_adapter(model, tmp_path / "a.safetensors")
    fresh = decoder("mistral")
    load_adapter(fresh, tmp_path / "a.safetensors")
    x = ids(model)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, model unchanged


def test_bad_configs():
    with pytest.raises(ValueError, match="give sites .* or target_modules, not both"):
        MoLoRAConfig(sites=("q",), target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"target_modules='\(' is not a valid regular expression"):
        LoRAConfig(target_modules="(")
    with pytest.raises(ValueError, match="target_modules must name at least one module"):
        LoRAConfig(target_modules=[])
    with pytest.raises(TypeError, match="target_modules must be a regex string, 'all-linear' or a list"):
        LoRAConfig(target_modules=["q_proj", 3])
    with pytest.raises(ValueError, match="MoVConfig.num_groups is for target_modules"):
        MoVConfig(num_groups=2)
    with pytest.raises(ValueError, match="MoVConfig.num_groups must be an int >= 1, got 0"):
        MoVConfig(num_groups=0, target_modules=["k_proj"])


def test_bad_injections_leave_the_model_unchanged():
    model = decoder("llama")
    snap = snapshot_model(model)
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\] matches no module of LlamaForCausalLM"):
        inject(model, LoRAConfig(target_modules=["nope"]))
    assert_model_unchanged(model, snap)
    with pytest.raises(ValueError, match=r"target_modules='layers.*' matches no module of LlamaForCausalLM"):
        inject(model, LoRAConfig(target_modules=r"layers\.9.*"))
    assert_model_unchanged(model, snap)
    with pytest.raises(TypeError, match=r"matches model\.layers\.0\.mlp \(transformers\..*LlamaMLP\), which is not"):
        inject(model, MoLoRAConfig(target_modules=["q_proj", "mlp"]))
    assert_model_unchanged(model, snap)
    # q_proj (64 outputs) takes 64 groups; v_proj (32) cannot: met after q_proj was built, all is undone
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.v_proj has 32 outputs, which num_groups=64"):
        inject(model, MoVConfig(num_experts=2, num_groups=64, target_modules=["q_proj", "v_proj"]))
    assert_model_unchanged(model, snap)
    with pytest.raises(ValueError, match=r"\['wi_0'\] not in this model's sites \(q, k, v, o, gate, up, down\)"):
        inject(model, MoLoRAConfig(sites=("q", "wi_0")))
    assert_model_unchanged(model, snap)
    gpt2 = decoder("gpt2")
    snap = snapshot_model(gpt2)
    with pytest.raises(ValueError, match=r"\['gate'\] not in this model's sites \(qkv, o, fc, proj\)"):
        inject(gpt2, LoRAConfig(sites=("gate",)))
    assert_model_unchanged(gpt2, snap)
    inject(gpt2, IA3Config())
    snap = snapshot_model(gpt2)
    with pytest.raises(ValueError, match="already has pemoe adapters"):
        inject(gpt2, LoRAConfig(target_modules="all-linear"))
    assert_model_unchanged(gpt2, snap)


# ---------------------------------------------------------------------------------------------
# gated MLPs: the fused mov_ffn where the MLP computes down(act(gate x) * up x), its own forward otherwise

GATED = {"llama": "silu", "mistral": "silu", "qwen2": "silu", "qwen3": "silu", "gemma2": "gelu_new",
         "gemma3": "gelu_new"}  # fmt: skip


@pytest.mark.parametrize("family", list(GATED))
def test_gated_mlps_run_the_fused_mov_ffn(family, monkeypatch):
    """Every Llama-like MLP becomes a FusedGatedMLP with the family's activation; the model's state-dict keys
    stay; logits and every adapter gradient equal the unfused site's (MoV wrapping act_fn, the MLP's own
    forward) to float32 rounding."""
    from pemoe.placements import llama as llama_placement

    fused = decoder(family)
    mlp_keys = {k for k in fused.state_dict() if ".mlp." in k}
    inject(fused, MoVConfig(num_experts=3))
    _randomize(fused, seed=3)
    mlps = [m for m in fused.modules() if isinstance(m, FusedGatedMLP)]
    assert len(mlps) == dims(fused)["layers"] and {m.activation for m in mlps} == {GATED[family]}
    assert {k for k in fused.state_dict() if ".mlp." in k and ".mov." not in k} == mlp_keys
    monkeypatch.setattr(llama_placement, "fusible_gated_mlp", lambda mlp: None)
    unfused = decoder(family)
    inject(unfused, MoVConfig(num_experts=3))
    assert not any(isinstance(m, FusedGatedMLP) for m in unfused.modules())
    load_adapter_state_dict(unfused, {k: v.detach() for k, v in adapter_state_dict(fused).items()})
    x = ids(fused)
    got, want = _run(fused, x), _run(unfused, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want_grads = {k: p.grad for k, p in adapter_state_dict(unfused).items()}
    for key, p in adapter_state_dict(fused).items():
        torch.testing.assert_close(p.grad, want_grads[key], rtol=1e-4, atol=1e-6, msg=key)


class _SwappedGateMLP(nn.Module):
    """Looks like a Llama MLP but gates the other way: down(act(up x) * gate x)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(width, hidden, bias=False), nn.Linear(width, hidden, bias=False)
        self.down_proj, self.act_fn = nn.Linear(hidden, width, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def test_an_mlp_computing_another_formula_keeps_its_own_forward():
    from pemoe.placements._common import fusible_gated_mlp

    llama = decoder("llama")
    assert fusible_gated_mlp(llama.model.layers[0].mlp) == "silu"
    assert fusible_gated_mlp(_SwappedGateMLP(8, 12)) is None
    llama.model.layers[0].mlp = _SwappedGateMLP(dims(llama)["hidden"], dims(llama)["intermediate"])
    inject(llama, MoVConfig(num_experts=2))
    assert isinstance(llama.model.layers[0].mlp, _SwappedGateMLP)
    assert isinstance(llama.model.layers[0].mlp.act_fn, MoVActivation)
    assert isinstance(llama.model.layers[1].mlp, FusedGatedMLP)
