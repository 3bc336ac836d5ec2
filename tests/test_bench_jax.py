"""The JAX benches (bench/jax_ops.py): every provider computes what it claims, and ``pemoe bench`` runs them.

Provider correctness: each JAX provider's jitted output, and the gradients its ``fwd_bwd`` and ``bwd``
closures compute (x and the adapters; the floor: x), against the PyTorch benches' own providers on the same
inputs — the torch ``reference`` for the JAX ops, the torch ``linear`` floor for the JAX floor — held to the
tolerance rule of tests/helpers.py (``max|out − truth| ≤ 2·max|ref − truth| + atol·max(|truth|, 1)``, truth =
the torch provider in float64, ref = the torch provider in the tested dtype).

Smoke: ``pemoe bench --ops jax_*`` on tiny shapes writes the CSV / markdown / PNG with every provider, mode
and dtype, and reports the providers that cannot run here.

Run: ``.venv/bin/python -m pytest -q tests/test_bench_jax.py``.
"""

from __future__ import annotations

import csv

import jax
import numpy as np
import pytest
import torch

from pemoe.bench import jax_ops, molora_linear, mov_ffn, mov_linear
from pemoe.cli import main
from tests.helpers import assert_within_rule

CPU = torch.device("cpu")
TORCH_BENCHES = {"jax_mov_linear": mov_linear, "jax_molora_linear": molora_linear, "jax_mov_ffn": mov_ffn}
TINY = {  # odd sizes on purpose
    "jax_mov_linear": {"T": 9, "K": 48, "N": 64, "G": 4},
    "jax_molora_linear": {"T": 9, "K": 48, "N": 40, "r": 4},
    "jax_mov_ffn": {"T": 9, "M": 24, "F": 56},
}
RUNNABLE = ("linear", "pemoe-xla", "reference")  # on the CPU; pallas / triton are skipped (see test_smoke)
CASES = [
    (op, p, e, dt)
    for op in jax_ops.OPS
    for p in RUNNABLE
    for e, dt in ((1, torch.float32), (5, torch.float32), (5, torch.bfloat16))
    if dt == torch.float32 or p == "pemoe-xla"
]


def _np(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _torch_run(provider, inputs: dict[str, torch.Tensor], float64: bool, grad_out: torch.Tensor):
    """(output, {trainable: grad}) of a torch bench provider on ``inputs`` (upcast to float64 on request)."""
    leaves = {k: (v.double() if float64 else v).detach().clone() for k, v in inputs.items()}
    for k in provider.trainable:
        leaves[k].requires_grad_(True)
    out = provider.forward(leaves)
    wrt = [leaves[k] for k in provider.trainable]
    grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype), allow_unused=True)  # E = 1: no router
    grads = [torch.zeros_like(w) if gr is None else gr for w, gr in zip(wrt, grads, strict=True)]
    return out.detach(), dict(zip(provider.trainable, grads, strict=True))


@pytest.mark.parametrize(
    ("op", "provider", "e", "dtype"),
    CASES,
    ids=[f"{op}-{p}-E{e}-{str(dt).removeprefix('torch.')}" for op, p, e, dt in CASES],
)
def test_provider_matches_torch(op: str, provider: str, e: int, dtype: torch.dtype) -> None:
    bench = jax_ops.BENCHES[op]
    prov = bench.providers[provider]
    assert jax_ops.harness.unavailable_reason(op, prov, CPU) is None
    torch_bench = TORCH_BENCHES[op]
    torch_prov = torch_bench.PROVIDERS["linear" if provider == "linear" else "reference"]
    assert set(prov.trainable) == set(torch_prov.trainable)
    inputs = bench.make_inputs(dict(TINY[op], E=e), dtype, CPU)
    arrays = jax_ops.to_jax(inputs, CPU)

    out = jax_ops.jitted(prov, "fwd")(arrays)
    grad_out = torch.randn(tuple(out.shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = jax.numpy.asarray(grad_out.numpy(), dtype=out.dtype)
    out2, grads = jax_ops.jitted(prov, "fwd_bwd")(arrays, g)
    bwd, vjp_fn = jax_ops.recorded_backward(prov, arrays)
    grads_bwd = bwd(vjp_fn, g)

    assert out.dtype == arrays["x"].dtype
    truth, truth_grads = _torch_run(torch_prov, inputs, True, grad_out)
    ref, ref_grads = _torch_run(torch_prov, inputs, False, grad_out)
    assert_within_rule(_np(out), ref, truth, dtype, f"{op}/{provider} output")
    np.testing.assert_array_equal(np.asarray(out2, dtype=np.float32), np.asarray(out, dtype=np.float32))
    assert set(grads) == set(grads_bwd) == set(prov.trainable)
    for name in prov.trainable:
        assert grads[name].dtype == arrays[name].dtype, f"d{name} dtype"
        for what, gr in (("fwd_bwd", grads[name]), ("bwd", grads_bwd[name])):
            assert_within_rule(_np(gr), ref_grads[name], truth_grads[name], dtype, f"{op}/{provider} {what} d{name}")


def test_saved_bytes_counts_token_residuals_only() -> None:
    """The floor keeps only x-independent values (W) for dx: 0 bytes; the reference MoV keeps float32
    [T, N]-sized activations; XLA's custom_vjp keeps h in bf16 and p [T, G, E] float32 (SPEC §3)."""
    bench = jax_ops.BENCHES["jax_mov_linear"]
    shape = {"T": 33, "K": 48, "N": 64, "G": 4, "E": 5}
    arrays = jax_ops.to_jax(bench.make_inputs(shape, torch.bfloat16, CPU), CPU)
    saved = {p: jax_ops.saved_bytes(bench.providers[p], arrays) for p in RUNNABLE}
    assert saved["linear"] == 0
    t, n, g, e = shape["T"], shape["N"], shape["G"], shape["E"]
    assert saved["pemoe-xla"] == 2 * t * n + 4 * t * g * e
    assert saved["reference"] >= 4 * t * n > saved["pemoe-xla"] - 4 * t * g * e


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke(tmp_path, capsys) -> None:
    """All three JAX ops through ``pemoe bench`` on tiny shapes (float32; bfloat16 and bwd for one op)."""
    tiny = ["bench", "--tokens", "8", "--shape-scale", "32"]
    ops = ",".join(jax_ops.OPS)
    assert (
        main([*tiny, "--out", str(tmp_path), "--ops", ops, "--dtypes", "float32", "--modes", "fwd,fwd_bwd,step"]) == 0
    )
    rows = _rows(tmp_path / "results.csv")
    out = capsys.readouterr().out
    b_dir = tmp_path / "b"
    assert main([*tiny, "--out", str(b_dir), "--ops", "jax_mov_linear", "--dtypes", "bfloat16", "--modes", "bwd"]) == 0
    rows_b = _rows(b_dir / "results.csv")

    for op in jax_ops.OPS:
        for p in RUNNABLE:
            for mode in ("fwd", "fwd_bwd"):
                got = {r["metric"] for r in rows if (r["op"], r["provider"], r["mode"]) == (op, p, mode)}
                assert {"time_ms", "ratio_vs_floor"} <= got, (op, p, mode, got)
            assert {"saved_mb", "out_mb"} <= {r["metric"] for r in rows if (r["op"], r["provider"]) == (op, p)}
            assert f"skipped {op} / pemoe-pallas on cpu" in out and f"skipped {op} / pemoe-triton on cpu" in out
        assert f"{op}: mode 'step' is not measured for the JAX ops" in out
    assert {r["dtype"] for r in rows} == {"float32"} and {r["device"] for r in rows} == {"cpu"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd_bwd"}
    for r in rows:
        if r["provider"] == "linear" and r["metric"] == "ratio_vs_floor":
            assert float(r["p50"]) == pytest.approx(1.0)
        if r["metric"] == "time_ms":
            assert 0 < float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
    assert {(r["provider"], r["mode"]) for r in rows_b if r["metric"] == "time_ms"} == {(p, "bwd") for p in RUNNABLE}
    assert {r["dtype"] for r in rows_b} == {"bfloat16"}
    md = (tmp_path / "results.md").read_text()
    assert "| jax_molora_linear | T=8,K=32,N=32,E=10,r=4 | float32 | pemoe-xla |" in md
    assert "fwd ratio" in md and "fwd+bwd ratio" in md and "saved MB" in md
    assert "JAX " in md and "implementation='auto' -> xla" in md
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
