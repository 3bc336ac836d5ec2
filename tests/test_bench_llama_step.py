"""The Llama training-step benchmark compares like with like: every provider's model is the same frozen
backbone, pemoe's (IA)3 and LoRA train as many parameters as PEFT's on the same sites, freshly adapted
models start at the base model's loss (pemoe's (IA)3 with PEFT's gradients), and a step trains only the
adapters, downhill. Run on a tiny Llama (GQA kept: 8 heads over 4 key/value heads) so that it takes seconds."""

from __future__ import annotations

import pytest
import torch

from pemoe.bench import llama_step
from tests.step_checks import (
    assert_fresh_losses_equal_the_floors,
    assert_step_trains_only_the_adapters_downhill,
    step_bench_rows,
)

TINY = dict(llama_step.shapes(False)[0], M=32, F=48, D=8, layers=2, V=64, S=12, B=2)
#: other widths than TINY's: the providers rebuild fresh models for it, so the steps taken on it leave the
#: fresh-adapter tests on TINY unaffected in any order
STEPPED = dict(TINY, layers=1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is fastest and steady when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def inputs():
    return llama_step.make_inputs(TINY, torch.float32, torch.device("cpu"))


@pytest.fixture
def stepped_inputs():
    return llama_step.make_inputs(STEPPED, torch.float32, torch.device("cpu"))


def _trainable(name: str, inputs) -> list[torch.Tensor]:
    prov = llama_step.PROVIDERS[name]
    prov.forward(inputs)  # builds the provider's model for these inputs
    return [p for p in prov.owned() if p.requires_grad]


def test_providers_share_one_frozen_backbone(inputs):
    """Every provider's frozen weights are the same tensors' storage (one random backbone, no copies)."""
    storages = {}
    for name, prov in llama_step.PROVIDERS.items():
        prov.forward(inputs)
        frozen = sorted(p.untyped_storage().data_ptr() for p in prov.owned() if not p.requires_grad)
        storages[name] = frozen
    assert len({tuple(v) for v in storages.values()}) == 1, storages


def test_trainable_counts_equal_pefts_on_the_same_sites(inputs):
    """(IA)3: k_proj and v_proj outputs (KV·D each) and down_proj's input (F) per layer; LoRA r = 4 on all
    seven linears: r·(in + out) each. pemoe and PEFT must both train exactly these counts."""
    M, F, KV, H, D, L = (TINY[k] for k in ("M", "F", "KV", "H", "D", "layers"))
    ia3 = L * (2 * KV * D + F)
    io = [(M, H * D), (M, KV * D), (M, KV * D), (H * D, M), (M, F), (M, F), (F, M)]
    lora = L * sum(4 * (i + o) for i, o in io)
    counts = {n: sum(p.numel() for p in _trainable(n, inputs)) for n in llama_step.PROVIDERS}
    assert counts[llama_step.FLOOR] == 0
    assert counts["peft-ia3"] == counts["pemoe-ia3"] == ia3, counts
    assert counts["peft-lora"] == counts["pemoe-lora"] == lora, counts
    # the mixtures train more: E experts and a router per site
    assert counts["pemoe-mov-10"] > 10 * ia3 and counts["pemoe-molora-8"] > 8 * lora, counts


def test_fresh_adapters_start_at_the_base_models_loss(inputs):
    assert_fresh_losses_equal_the_floors(llama_step.PROVIDERS, llama_step.FLOOR, inputs)


def test_pemoe_ia3_starts_where_peft_ia3_does(inputs):
    """Same loss and the same adapter gradients (compared as sorted values: the layouts differ, e.g. PEFT's
    k_proj vector is [KV·D, 1]); pemoe's FFN vector scales act_fn's output, PEFT's down_proj's input, and
    (h·l)·u = (h·u)·l gives both the same gradient."""
    grads = {}
    for name in ("peft-ia3", "pemoe-ia3"):
        prov = llama_step.PROVIDERS[name]
        loss = prov.forward(inputs)
        loss.backward()
        grads[name] = (loss.item(), torch.cat([p.grad.flatten() for p in prov.owned() if p.requires_grad]).sort()[0])
    (ours, g_ours), (peft, g_peft) = grads["pemoe-ia3"], grads["peft-ia3"]
    assert ours == pytest.approx(peft, rel=1e-6)
    assert g_ours.abs().max() > 0
    torch.testing.assert_close(g_ours, g_peft, rtol=1e-4, atol=1e-4 * g_peft.abs().max().item())


@pytest.mark.parametrize("name", [n for n in llama_step.PROVIDERS if n != llama_step.FLOOR])
def test_step_trains_only_the_adapters_downhill(stepped_inputs, name):
    assert_step_trains_only_the_adapters_downhill(llama_step.PROVIDERS[name], stepped_inputs)


def test_bench_rows_for_the_step(tmp_path):
    rows = step_bench_rows("llama_step", tmp_path, ["float32", "bfloat16"])
    for dtype in ("float32", "bfloat16"):
        metrics = {(r["provider"], r["metric"]) for r in rows if r["mode"] in ("step", "fwd") and r["dtype"] == dtype}
        for name in llama_step.PROVIDERS:
            assert (name, "time_ms") in metrics and (name, "ratio_vs_floor") in metrics, (dtype, name)
            assert (name, "saved_mb") in metrics, (dtype, name)
        for name in ("pemoe-ia3", "pemoe-mov-10"):
            assert (name, "ratio_vs_peft-ia3") in metrics, (dtype, name)
        for name in ("pemoe-lora", "pemoe-molora-8"):
            assert (name, "ratio_vs_peft-lora") in metrics, (dtype, name)
    saved = {(r["provider"], r["dtype"]): float(r["p50"]) for r in rows if r["metric"] == "saved_mb"}
    assert all(v > 0 for v in saved.values()), saved
    table = (tmp_path / "results.md").read_text()
    assert "step vs baseline" in table and "pemoe-molora-8" in table
