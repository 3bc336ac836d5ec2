"""Checks every training-step benchmark (bench/t5_step.py, bench/llama_step.py) must pass, whatever the model
family: fresh adapters start at the frozen model's loss, a step trains the adapters only and downhill, and the
``pemoe bench`` command writes the step's rows."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import pytest
import torch

from pemoe.bench import harness
from pemoe.bench.harness import Provider


def assert_fresh_losses_equal_the_floors(
    providers: dict[str, Provider], floor: str, inputs: dict[str, torch.Tensor]
) -> None:
    """Every provider's first loss equals the floor's (fresh adapters are the identity)."""
    losses = {name: p.forward(inputs).item() for name, p in providers.items()}
    base = losses[floor]
    for name, loss in losses.items():
        # MoV's fresh experts are ones (Σp = 1 up to float32 rounding); LoRA's B is zero: exact
        assert loss == pytest.approx(base, rel=1e-6), (name, losses)


def assert_step_trains_only_the_adapters_downhill(prov: Provider, inputs: dict[str, torch.Tensor]) -> None:
    """One step (forward, backward, optimizer step) gives every adapter parameter a gradient, moves them along
    a descent direction (Σ grad·Δ < 0: first order, so no float32 loss differences of a few ulps are
    compared) and leaves every frozen weight as it was."""
    name = prov.name
    loss = prov.forward(inputs)
    params = prov.owned  # the provider's model parameters
    frozen_before = {id(p): p.detach().clone() for p in params() if not p.requires_grad}
    trainable = [p for p in params() if p.requires_grad]
    assert trainable, name
    before = [p.detach().clone() for p in trainable]
    loss.backward()
    prov.optimizer_step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable, strict=True)), f"{name}: nothing moved"
    assert all(p.grad is not None for p in trainable), f"{name}: an adapter got no gradient"
    descent = sum((p.grad * (p.detach() - b)).sum() for b, p in zip(before, trainable, strict=True))
    assert descent < 0, f"{name}: the step went uphill ({descent})"
    for p in params():
        if not p.requires_grad:
            assert torch.equal(frozen_before[id(p)], p), f"{name}: a frozen weight changed"


def step_bench_rows(op: str, out: pathlib.Path, dtypes: Sequence[str]) -> list[dict[str, str]]:
    """``pemoe bench --ops <op> --modes step`` on widths / 16 and 8 tokens, one thread; its CSV rows."""
    from pemoe.cli import main

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["bench", "--ops", op, "--shape-scale", "16", "--tokens", "8", "--dtypes", ",".join(dtypes)]
        assert main([*argv, "--modes", "step", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    return harness.read_csv(out / "results.csv")
