"""The T5 training-step benchmark compares like with like: every provider's model is the same frozen
backbone, freshly adapted models start at the base model's loss, and the step trains only adapters."""

from __future__ import annotations

import pytest
import torch

from pemoe.bench import harness, t5_step

TINY = dict(t5_step.shapes(False)[0], M=32, F=64, H=2, Dkv=8, layers=1, V=64, S=12, L=5, B=2)


@pytest.fixture(scope="module")
def inputs():
    return t5_step.make_inputs(TINY, torch.float32, torch.device("cpu"))


def test_fresh_adapters_start_at_the_base_models_loss(inputs):
    losses = {name: p.forward(inputs).item() for name, p in t5_step.PROVIDERS.items()}
    base = losses[t5_step.FLOOR]
    for name, loss in losses.items():
        # MoV's fresh experts are ones (Σp = 1 up to float32 rounding); LoRA's B is zero: exact
        assert loss == pytest.approx(base, rel=1e-6), (name, losses)


@pytest.mark.parametrize("name", [n for n in t5_step.PROVIDERS if n != t5_step.FLOOR])
def test_step_trains_only_the_adapters(inputs, name):
    prov = t5_step.PROVIDERS[name]
    loss = prov.forward(inputs)
    model = prov.owned  # the provider's model parameters
    frozen_before = {id(p): p.detach().clone() for p in model() if not p.requires_grad}
    trainable = [p for p in model() if p.requires_grad]
    assert trainable, name
    before = [p.detach().clone() for p in trainable]
    loss.backward()
    prov.optimizer_step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable, strict=True)), f"{name}: nothing moved"
    for p in model():
        if not p.requires_grad:
            assert torch.equal(frozen_before[id(p)], p), f"{name}: a frozen weight changed"


def test_bench_rows_for_the_step(tmp_path):
    from pemoe.cli import main

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["bench", "--ops", "t5_step", "--shape-scale", "16", "--tokens", "8", "--dtypes", "float32"]
        assert main([*argv, "--modes", "step", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(n)
    rows = harness.read_csv(tmp_path / "results.csv")
    metrics = {(r["provider"], r["metric"]) for r in rows if r["mode"] in ("step", "fwd")}
    for name in t5_step.PROVIDERS:
        assert (name, "time_ms") in metrics and (name, "ratio_vs_floor") in metrics
    assert ("pemoe-mov-30", "ratio_vs_peft-ia3") in metrics and ("pemoe-molora-15", "ratio_vs_peft-lora") in metrics
    saved = {r["provider"]: float(r["p50"]) for r in rows if r["metric"] == "saved_mb"}
    assert saved["pemoe-mov-30"] > 0 and saved["peft-ia3"] > 0
    assert "step vs baseline" in (tmp_path / "results.md").read_text()
