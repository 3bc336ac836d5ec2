"""pemoe.router_health: per-site routing statistics, the load-balancing loss and the Figure-5 plot.

The statistics are checked against a direct computation written here from SPEC §1/§2 (not from the hooks'
formulas): each site's router input is captured by this file's own hooks (the projection output x·Wᵀ + b for MoV
k/v, the activation act(x·wi_0ᵀ) for FFN sites, the layer input for MoLoRA, the sentence vectors for sentence
routing), p = softmax(router input @ router) per token (and head), and the load, the largest mean probability
and the mean entropy are taken over the unpadded tokens. Float32 throughout: the monitor's folded k/v logits
differ from x·Wᵀ·router by rounding only, hence the 1e-5 tolerances.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import pemoe
from pemoe.adapters import adapter_state_dict, sentence_routing
from pemoe.injection import _adapter_module, _require_injected
from pemoe.layers import MoLoRALinear, MoV, MoVLinear
from pemoe.placements import FusedGatedMLP, MoVActivation, PackedMoV
from pemoe.router_health import RouterMonitor, plot_routing, routed_sites, routing_by_task, stats_to_logs

pytest.importorskip("transformers")

from tests.decoder_tiny import decoder  # noqa: E402
from tests.t5_tiny import hf_t5, pemoe_t5  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(kind: str, config) -> torch.nn.Module:
    model = {"llama": lambda: decoder("llama"), "gpt2": lambda: decoder("gpt2"), "t5": lambda: hf_t5("v1.1"),
             "pemoe_t5": lambda: pemoe_t5("v1.1")}[kind]()  # fmt: skip
    torch.manual_seed(0)
    pemoe.inject(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # routers well away from uniform, so that the loads differ per expert
        for k, p in adapter_state_dict(model).items():
            if k.endswith("router"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def _inputs(kind: str, model, seed: int = 3) -> dict:
    """A batch of 3 with padding: row 1 ends in 4 padding tokens (input and, for T5, target)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(2, vocab, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, -4:] = 0
    if kind in ("t5", "pemoe_t5"):
        labels = torch.randint(2, vocab, (3, 7), generator=g)
        labels[1, -3:] = -100
        if kind == "pemoe_t5":  # pemoe's T5 takes decoder inputs and their mask
            dec = torch.cat([torch.zeros(3, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], 1)
            return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                        decoder_attention_mask=(labels != -100).long())  # fmt: skip
        return dict(input_ids=ids, attention_mask=mask, labels=labels)
    return dict(input_ids=ids, attention_mask=mask)


def _direct(model, inputs, sentence: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{site: (p [B, S, G, E], token weight [B, S])} from this file's own capture of each router input."""
    state = _require_injected(model)
    got: dict[str, torch.Tensor] = {}
    handles = []

    def capture(key, module, fn, pre=True):
        if pre:
            handles.append(module.register_forward_pre_hook(lambda m, a: got.__setitem__(key, fn(a[0]))))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o: got.__setitem__(key, fn(o))))

    for key, site in state["sites"].items():
        current, adapter = getattr(site.parent, site.attr), _adapter_module(model, site)
        if getattr(adapter, "router", None) is None:
            continue
        router = adapter.router.detach()

        def soft(h, router=router):  # h [..., G, D] or sentence-broadcast: p [..., G, E]
            return torch.softmax(h.double() @ router.double(), -1)

        if sentence is not None:
            groups = adapter.num_groups if isinstance(adapter, MoV) else 1
            ps = soft(sentence)  # [B, E]

            def fn(x, ps=ps, groups=groups):
                return ps[:, None, None, :].expand(x.shape[0], x.shape[1], groups, ps.shape[-1])

            capture(key, current if not isinstance(current, MoVActivation) else current.act, fn)
        elif isinstance(current, MoLoRALinear):
            capture(key, current, lambda x, soft=soft: soft(x)[..., None, :])
        elif isinstance(current, MoVLinear):
            w, b, s = current.base.weight, current.base.bias, current.site
            capture(key, current, lambda x, w=w, b=b, s=s, soft=soft:
                    soft(F.linear(x, w, b).unflatten(-1, (s.num_groups, s.dim))))  # fmt: skip
        elif isinstance(current, FusedGatedMLP):
            capture(key, current, lambda x, m=current, soft=soft: soft(m.act_fn(m.gate_proj(x)))[..., None, :])
        elif isinstance(current, MoVActivation):
            capture(key, current.act, lambda h, soft=soft: soft(h)[..., None, :], pre=False)
        elif isinstance(current, PackedMoV):
            i, s = current.parts.index(site.part), adapter
            capture(key, current.base, lambda y, i=i, s=s, c=current, soft=soft:
                    soft(y.split(c.width, -1)[i].unflatten(-1, (s.num_groups, s.dim))), pre=False)  # fmt: skip
        elif isinstance(current, MoV):  # pemoe's T5 FFN: the site reads gelu_new(x wi_0ᵀ)
            ffn = site.parent
            capture(key, ffn, lambda x, f=ffn, soft=soft:
                    soft(F.gelu(x @ f.wi_0.weight.T, approximate="tanh"))[..., None, :])  # fmt: skip
        else:
            raise AssertionError(type(current))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    enc = inputs["attention_mask"].double()
    dec = inputs.get("decoder_attention_mask", (inputs["labels"] != -100) if "labels" in inputs else None)
    out = {}
    for key, p in got.items():
        use_dec = key.startswith("decoder.") and not key.endswith(("EncDecAttention.k", "EncDecAttention.v"))
        weight = dec.double() if use_dec else enc
        out[key] = (p, weight)
    return out


def _f64(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float64)


def _expected(p: torch.Tensor, weight: torch.Tensor) -> tuple[list[float], float]:
    w = weight[..., None].expand(p.shape[:-1])  # [B, S, G]
    load = (p * w[..., None]).sum((0, 1, 2)) / w.sum()
    ent = (-(p * p.log()).sum(-1) * w).sum() / w.sum()
    return load.tolist(), float(ent)


CASES = {
    "llama-mov": ("llama", pemoe.MoVConfig(num_experts=3)),  # MoVLinear k/v (GQA), fused gated MLP
    "llama-molora": ("llama", pemoe.MoLoRAConfig(num_experts=4, rank=2)),
    "gpt2-mov": ("gpt2", pemoe.MoVConfig(num_experts=3)),  # packed k/v of c_attn, MoVActivation
    "t5-mov": ("t5", pemoe.MoVConfig(num_experts=3)),  # k/v incl. cross-attention, MoVActivation FFN
    "t5-molora": ("t5", pemoe.MoLoRAConfig(num_experts=3, rank=2)),
    "pemoe-t5-mov": ("pemoe_t5", pemoe.MoVConfig(num_experts=3)),  # the fused mov_ffn
}


@pytest.mark.parametrize("case", list(CASES))
def test_stats_match_a_direct_computation(case):
    kind, config = CASES[case]
    model = _model(kind, config)
    inputs = _inputs(kind, model)
    want = _direct(model, inputs)
    with RouterMonitor(model) as monitor, torch.no_grad():
        model(**inputs)
        stats = monitor.stats()
    assert set(stats) == set(want) == set(routed_sites(model)) and stats
    for key, (p, weight) in want.items():
        load, ent = _expected(p, weight)
        s = stats[key]
        torch.testing.assert_close(_f64(s.load), _f64(load), atol=1e-5, rtol=0)
        assert s.max_prob == max(s.load)
        assert s.entropy == pytest.approx(ent, abs=1e-5)
    # padding matters: an unweighted mean would differ at the k/v sites of the padded row
    assert any(abs(stats[k].load[0] - float(p.mean((0, 1, 2))[0])) > 1e-4 for k, (p, _) in want.items())


@pytest.mark.parametrize("config", [pemoe.MoLoRAConfig(num_experts=3, rank=2, router_input="sentence"),
                                    pemoe.MoVConfig(num_experts=3, router_input="sentence")])  # fmt: skip
def test_sentence_routing_stats(config):
    model = _model("llama", config)
    inputs = _inputs("llama", model)
    r = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with sentence_routing(model, r):
        want = _direct(model, inputs, sentence=r)
    with RouterMonitor(model) as monitor, sentence_routing(model, r), torch.no_grad():
        model(**inputs)
        stats = monitor.stats()
    assert set(stats) == set(want)
    for key, (p, weight) in want.items():
        load, ent = _expected(p, weight)
        torch.testing.assert_close(_f64(stats[key].load), _f64(load), atol=1e-6, rtol=0)
        assert stats[key].entropy == pytest.approx(ent, abs=1e-5)


def test_top_k_renormalized_routing_is_one_hot():
    model = _model("llama", pemoe.MoLoRAConfig(num_experts=4, rank=2, top_k=1, renormalize=True))
    inputs = _inputs("llama", model)
    with RouterMonitor(model) as monitor, torch.no_grad():
        model(**inputs)
        stats = monitor.stats()
    tokens = int(inputs["attention_mask"].sum())
    for s in stats.values():
        assert s.entropy == pytest.approx(0.0, abs=1e-6)
        assert [round(v * tokens, 4) for v in s.load] == [round(v * tokens) for v in s.load]  # counts / tokens


def test_balance_loss_is_kl_to_uniform_and_rebalances_a_collapsed_router():
    model = _model("llama", pemoe.MoLoRAConfig(num_experts=3, rank=2))
    inputs = _inputs("llama", model)
    want = _direct(model, inputs)
    monitor = RouterMonitor(model, balance=True)
    model(**inputs)
    loss = monitor.balance_loss()
    kl = []
    for p, weight in want.values():
        load = torch.tensor(_expected(p, weight)[0], dtype=torch.float64)
        kl.append(float((load * (load * 3).log()).sum()))
    assert float(loss) == pytest.approx(sum(kl) / len(kl), rel=1e-4) and float(loss) > 1e-3
    loss.backward()
    routers = [p for k, p in adapter_state_dict(model).items() if k.endswith("router")]
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in routers)
    assert monitor.balance_loss().item() == 0.0  # cleared: no call since
    # a collapsed router (every site's load on one expert) is pulled back towards uniform by the loss alone
    with torch.no_grad():
        for p in routers:
            p.mul_(4.0)
    monitor.reset()
    with torch.no_grad():
        model(**inputs)
    before = monitor.stats(reset=True)
    opt = torch.optim.Adam(routers, lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        model(**inputs)
        monitor.balance_loss().backward()
        opt.step()
    monitor.reset()
    with torch.no_grad():
        model(**inputs)
    after = monitor.stats()
    monitor.remove()
    worst_before = max(s.max_prob for s in before.values())
    assert worst_before > 0.6 and max(s.max_prob for s in after.values()) < worst_before - 0.2
    # zero routers route uniformly: the loss is zero
    with torch.no_grad():
        for p in routers:
            p.zero_()
    monitor = RouterMonitor(model, balance=True)
    model(**inputs)
    assert abs(float(monitor.balance_loss())) < 1e-6
    monitor.remove()


def test_stats_to_logs_and_bad_input():
    model = _model("llama", pemoe.MoLoRAConfig(num_experts=3, rank=2))
    with RouterMonitor(model) as monitor, torch.no_grad():
        model(**_inputs("llama", model))
        stats = monitor.stats(reset=True)
        assert monitor.stats() == {}  # reset
    logs = stats_to_logs(stats)
    assert logs["router/entropy_min"] == min(s.entropy for s in stats.values())
    key = next(iter(stats))
    assert [logs[f"router/{key}/load_{e}"] for e in range(3)] == list(stats[key].load)
    assert set(stats_to_logs(stats, per_site=False)) == {"router/entropy_mean", "router/entropy_min",
                                                         "router/max_prob_max"}  # fmt: skip
    with pytest.raises(ValueError, match="balance=True"):
        RouterMonitor(model).balance_loss()
    with pytest.raises(ValueError, match="no adapter site"):
        RouterMonitor(model, sites=["nope"])
    with pytest.raises(ValueError, match="no routed site"):
        RouterMonitor(_model("llama", pemoe.LoRAConfig(rank=2)))
    with pytest.raises(ValueError, match="no pemoe adapters"):
        RouterMonitor(decoder("llama"))
    # hooks are off the model after remove(): a forward records nothing
    monitor = RouterMonitor(model)
    monitor.remove()
    with torch.no_grad():
        model(**_inputs("llama", model))
    assert monitor.stats() == {}


# ---------------------------------------------------------------------------------------------
# Figure 5


def test_routing_plot_draws_one_panel_per_site_and_one_row_per_task(tmp_path):
    from matplotlib.image import imread

    model = _model("llama", pemoe.MoLoRAConfig(num_experts=3, rank=2))
    tasks = {t: [_inputs("llama", model, seed=s)] for t, s in (("copy", 1), ("sort", 2), ("math", 3))}
    stats = routing_by_task(model, tasks)
    sites = routed_sites(model)
    assert list(stats) == sites and all(set(v) == set(tasks) for v in stats.values())
    with RouterMonitor(model) as monitor, torch.no_grad():  # the same numbers, task by task
        model(**tasks["sort"][0])
        assert list(monitor.stats()[sites[0]].load) == stats[sites[0]]["sort"]
    plot = plot_routing(stats, tmp_path / "all.png", held_out={"math"})
    assert len(plot.panels) == len(sites)
    for (key, rows, matrix), site in zip(plot.panels, sites, strict=True):
        assert key == site and rows == ("copy", "sort", "math")  # training tasks sorted, then held-out
        assert matrix.shape == (3, 3)
        torch.testing.assert_close(matrix, torch.tensor([stats[site][t] for t in rows], dtype=torch.float64))
    few = plot_routing(stats, tmp_path / "two.png", max_panels=2)
    assert len(few.panels) == 2
    big, small = imread(tmp_path / "all.png"), imread(tmp_path / "two.png")
    # figure size in inches at 100 dpi: height 1.4 + 0.3 per task row, width 1.6 + per panel (1.2 + 0.35 per expert)
    assert big.shape[:2] == (round((1.4 + 0.3 * 3) * 100), round((1.6 + len(sites) * 2.25) * 100))
    assert small.shape[:2] == (big.shape[0], round((1.6 + 2 * 2.25) * 100))
    assert len({tuple(px) for px in small.reshape(-1, small.shape[-1])[::7].tolist()}) > 20  # colours drawn
    with pytest.raises(ValueError, match="no routed site"):
        plot_routing({}, tmp_path / "none.png")
    assert json.dumps(stats)  # plain floats: the statistics serialise as they are
    assert math.isfinite(sum(sum(v) for s in stats.values() for v in s.values()))


# ---------------------------------------------------------------------------------------------
# pemoe train


def _train_run(tmp_path, name, **kw):
    from pemoe.train.loop import train
    from tests.test_train import _cfg

    result = train(_cfg(tmp_path / name, **kw))
    lines = [json.loads(s) for s in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if s.strip()]
    return result, lines


def test_pemoe_train_logs_router_health_without_changing_training(tmp_path):
    result, lines = _train_run(tmp_path, "on", router_stats_every=2, method="molora", rank=2)
    router = [ln for ln in lines if ln["kind"] == "router"]
    assert [ln["step"] for ln in router] == [2, 4]
    sites = routed_sites(result.bundle.model)
    for ln in router:
        assert list(ln["sites"]) == sites
        for s in ln["sites"].values():
            assert sum(s["load"]) == pytest.approx(1.0, abs=1e-5) and s["max_prob"] == max(s["load"])
            assert 0 < s["entropy"] <= math.log(3) + 1e-6
        assert ln["max_prob_max"] == max(s["max_prob"] for s in ln["sites"].values())
        assert ln["entropy_min"] == min(s["entropy"] for s in ln["sites"].values())
    off, off_lines = _train_run(tmp_path, "off", router_stats_every=0, method="molora", rank=2)
    assert not [ln for ln in off_lines if ln["kind"] == "router"]
    a, b = adapter_state_dict(result.bundle.model), adapter_state_dict(off.bundle.model)
    assert all(torch.equal(a[k], b[k]) for k in a)  # watching the routers changes nothing
    assert [ln["loss"] for ln in lines if ln["kind"] == "train"] == [ln["loss"] for ln in off_lines]


def test_pemoe_train_balance_loss(tmp_path):
    from pemoe.train.loop import CheckpointMismatch, TrainConfig, train
    from tests.test_train import _cfg

    base, base_lines = _train_run(tmp_path, "base", router_stats_every=0, max_steps=2)
    bal, lines = _train_run(tmp_path, "bal", router_stats_every=0, max_steps=2, balance_loss=1.0)
    train_lines = [ln for ln in lines if ln["kind"] == "train"]
    assert all(ln["balance_loss"] > 0 for ln in train_lines)
    assert "balance_loss" not in base_lines[0]
    assert train_lines[0]["loss"] == base_lines[0]["loss"]  # the logged loss stays the cross-entropy
    a, b = adapter_state_dict(base.bundle.model), adapter_state_dict(bal.bundle.model)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("router"))
    with pytest.raises(CheckpointMismatch, match="balance_loss: checkpoint 1.0 vs this run None"):
        train(_cfg(tmp_path / "bal", router_stats_every=0, max_steps=3, resume="latest"))
    with pytest.raises(ValueError, match="balance_loss must be a finite number >= 0"):
        TrainConfig(data="x", out="y", init="tiny", balance_loss=-1.0)
    with pytest.raises(ValueError, match="balance_loss needs routed adapters"):
        TrainConfig(data="x", out="y", init="tiny", method="lora", balance_loss=0.1)


def test_pemoe_eval_routing_plot(tmp_path, capsys):
    from matplotlib.image import imread

    from pemoe.cli import main
    from pemoe.train.data import load_dataset
    from tests.test_train import DATA, EVAL, TINY

    common = ["--data", DATA, "--batch-size", "4", "--max-input-len", "48", "--no-progress", "--max-steps", "1"]
    assert main(["train", "--init", TINY, "--method", "full", *common, "--out", str(tmp_path / "pre")]) == 0
    model = str(tmp_path / "pre" / "model")
    for method in ("mov", "lora"):
        assert main(["train", "--model", model, "--method", method, "--num-experts", "2", *common,
                     "--out", str(tmp_path / method)]) == 0  # fmt: skip
    png = tmp_path / "routing.png"
    args = ["eval", "--model", model, "--data", EVAL, "--routing-plot", str(png)]
    assert main([*args, "--adapter", str(tmp_path / "mov" / "adapter.safetensors")]) == 0
    stats = json.loads(png.with_suffix(".json").read_text())
    tasks = sorted({e.task for e in load_dataset(EVAL).examples})
    # one layer per stack: encoder k, v, ffn; decoder self k, v, cross k, v, ffn
    assert len(stats) == 8 and all(sorted(v) == tasks for v in stats.values())
    assert all(
        sum(load) == pytest.approx(1.0, abs=1e-5) and len(load) == 2 for v in stats.values() for load in v.values()
    )
    image = imread(png)  # figure size (inches, 100 dpi): width 1.6 + 8 panels x (1.2 + 0.35 x 2 experts)
    assert image.shape[:2] == (round((1.4 + 0.3 * len(tasks)) * 100), round((1.6 + 8 * 1.9) * 100))
    sites = "encoder.block.0.layer.1.DenseReluDense.mov,decoder.block.0.layer.0.SelfAttention.k"
    assert main([*args, "--adapter", str(tmp_path / "mov" / "adapter.safetensors"), "--routing-sites", sites]) == 0
    assert list(json.loads(png.with_suffix(".json").read_text())) == sites.split(",")
    assert imread(png).shape[1] == round((1.6 + 2 * 1.9) * 100)
    capsys.readouterr()
    assert main([*args, "--adapter", str(tmp_path / "lora" / "adapter.safetensors")]) == 2
    assert "no routed site" in capsys.readouterr().err
