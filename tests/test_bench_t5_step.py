"""The T5 training-step benchmark compares like with like: every provider's model is the same frozen
backbone, freshly adapted models start at the base model's loss, and the step trains only adapters."""

from __future__ import annotations

import pytest
import torch

from pemoe.bench import t5_step
from tests.step_checks import (
    assert_fresh_losses_equal_the_floors,
    assert_step_trains_only_the_adapters_downhill,
    step_bench_rows,
)

TINY = dict(t5_step.shapes(False)[0], M=32, F=64, H=2, Dkv=8, layers=1, V=64, S=12, L=5, B=2)


@pytest.fixture(scope="module")
def inputs():
    return t5_step.make_inputs(TINY, torch.float32, torch.device("cpu"))


def test_fresh_adapters_start_at_the_base_models_loss(inputs):
    assert_fresh_losses_equal_the_floors(t5_step.PROVIDERS, t5_step.FLOOR, inputs)


@pytest.mark.parametrize("name", [n for n in t5_step.PROVIDERS if n != t5_step.FLOOR])
def test_step_trains_only_the_adapters(inputs, name):
    assert_step_trains_only_the_adapters_downhill(t5_step.PROVIDERS[name], inputs)


def test_bench_rows_for_the_step(tmp_path):
    rows = step_bench_rows("t5_step", tmp_path, ["float32"])
    metrics = {(r["provider"], r["metric"]) for r in rows if r["mode"] in ("step", "fwd")}
    for name in t5_step.PROVIDERS:
        assert (name, "time_ms") in metrics and (name, "ratio_vs_floor") in metrics
    assert ("pemoe-mov-30", "ratio_vs_peft-ia3") in metrics and ("pemoe-molora-15", "ratio_vs_peft-lora") in metrics
    saved = {r["provider"]: float(r["p50"]) for r in rows if r["metric"] == "saved_mb"}
    assert saved["pemoe-mov-30"] > 0 and saved["peft-ia3"] > 0
    assert "step vs baseline" in (tmp_path / "results.md").read_text()
