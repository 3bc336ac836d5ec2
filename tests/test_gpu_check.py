"""``python -m pemoe.bench.gpu_check``: its CPU-side logic in the dry mode (tiny shapes, the Triton and JAX
kernels in their interpreters), a failing comparison making it exit 1, and its refusal without a GPU."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from pemoe.bench import gpu_check
from pemoe.kernels.triton import interpreter

pytestmark = pytest.mark.skipif(not interpreter.INTERPRET, reason="the dry run needs TRITON_INTERPRET=1 (no GPU)")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cases_cover_the_matrix():
    cases = gpu_check.correctness_cases(gpu_check.SHAPES, gpu_check.EXPERTS)
    large = [c for c in cases if c.shape_name == "t5-large"]
    banked = {"molora_linear_banked", "molora_adapter_banked"}
    assert set(gpu_check.CHECKED_OPS) == {"mov_linear", "mov_ffn", "molora_linear", "molora_adapter"} | banked
    for op in gpu_check.CHECKED_OPS:
        got = {(c.dtype, c.experts, c.variant) for c in large if c.op == op}
        want = {(dt, e, "soft") for dt in gpu_check.DTYPES.values() for e in (1, 10, 30)}
        want |= {(torch.bfloat16, 10, "top2-renorm"), (torch.bfloat16, 10, "sentence")}
        if op == "mov_ffn":
            want.add((torch.bfloat16, 10, "silu"))
        if op in ("mov_linear", "mov_ffn"):
            want.add((torch.bfloat16, 10, "bank"))
        if op in banked:
            want.add((torch.bfloat16, 10, "decode"))
        assert got == want, op
        assert {c.shape_name for c in cases if c.op == op} == {"t5-large", "t5-xl", "llama-7b"}
    llama = gpu_check.SHAPES["llama-7b"]
    assert llama["mov_linear"]["K"] == 4096 and llama["mov_linear"]["N"] // llama["mov_linear"]["G"] == 128
    assert llama["mov_ffn"]["F"] == 11008


def test_dry_run_checks_every_case_and_writes_the_report(tmp_path):
    assert gpu_check.main(["--dry-run", "--skip-timing", "--skip-jax", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "gpu_check.csv")
    cases = gpu_check.correctness_cases(gpu_check.DRY_SHAPES, gpu_check.DRY_EXPERTS)
    seen = {(r["op"], r["dtype"], r["E"], r["variant"]) for r in rows}
    assert seen == {(c.op, str(c.dtype).removeprefix("torch."), str(c.experts), c.variant) for c in cases}
    assert all(r["ok"] == "True" and r["implementation"] == "triton" for r in rows)
    # output and every gradient: x and the adapter parameters (router_input too with sentence routing)
    sentence = {r["tensor"] for r in rows if r["op"] == "molora_linear" and r["variant"] == "sentence"}
    assert sentence == {"output", "dx", "drouter", "dlora_a", "dlora_b", "drouter_input"}
    adapter = {r["tensor"] for r in rows if r["op"] == "molora_adapter" and r["variant"] == "soft" and r["E"] == "3"}
    assert adapter == {"output", "dx", "drouter", "dlora_a", "dlora_b", "dbase"}
    bank = {(r["op"], r["tensor"]) for r in rows if r["variant"] == "bank"}
    assert bank == {("mov_linear", "output"), ("mov_linear", "mov output"), ("mov_ffn", "output")}
    # the adapter-bank kernels are forward only
    assert {r["tensor"] for r in rows if r["op"].endswith("_banked")} == {"output"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert f"{len(rows)} of {len(rows)} comparisons within the tolerance rule" in md and "Failures" not in md


def test_a_wrong_kernel_fails_the_check(tmp_path, monkeypatch):
    from pemoe.kernels.triton import mov_linear

    real = mov_linear.mov_linear
    monkeypatch.setattr(mov_linear, "mov_linear", lambda *a, **k: real(*a, **k) * 1.01)
    assert gpu_check.main(["--dry-run", "--skip-timing", "--skip-jax", "--out", str(tmp_path)]) == 1
    failed = [r for r in _rows(tmp_path / "gpu_check.csv") if r["ok"] == "False"]
    assert failed and {r["op"] for r in failed} == {"mov_linear"}
    assert "## Failures" in (tmp_path / "gpu_check.md").read_text()


def test_module_dry_run_with_timing_and_jax(tmp_path):
    """The command as run (``python -m``): correctness, the JAX paths, timing (Triton not timed on a CPU)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pemoe.bench.gpu_check", "--dry-run", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(tmp_path / "gpu_check.csv")
    assert {r["implementation"] for r in rows} == {"triton", "jax-pallas", "jax-triton"}
    timing = _rows(tmp_path / "results.csv")
    assert {r["provider"] for r in timing} == {"linear", "authors-einsum", "peft-ia3", "peft-lora"}
    bank = {(r["op"], r["tensor"]) for r in rows if r["variant"] == "bank"}
    assert bank == {("mov_linear", "output"), ("mov_linear", "mov output"), ("mov_ffn", "output")}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## Timing" in md and "pemoe-triton not timed" in md


def test_refuses_to_run_without_a_gpu_unless_dry(tmp_path):
    cmd = [sys.executable, "-m", "pemoe.bench.gpu_check", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no CUDA device here" in done.stderr


def test_traffic_report_covers_every_op_and_shape():
    from pemoe.bench import traffic_report

    rows = traffic_report.rows()
    assert len(rows) == 3 * len(gpu_check.SHAPES)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] in gpu_check.OPS and cells[1] in gpu_check.SHAPES
        assert float(cells[3].rstrip("x")) >= 0.999 and float(cells[6].rstrip("x")) >= 0.999  # ≥ the minimum


def test_bank_arguments():
    """The bank cases: stacked parameters (adapter 0 the single-adapter case's own), ids of every kind."""
    case = gpu_check.Case("molora_adapter_banked", "tiny", gpu_check.DRY_SHAPES["tiny"]["molora_linear"],
                          torch.bfloat16, 3)  # fmt: skip
    kw, names = gpu_check.make_arguments(case, torch.device("cpu"))
    one, _ = gpu_check.make_arguments(dataclasses.replace(case, op="molora_adapter"), torch.device("cpu"))
    assert names == () and kw["lora_a"].shape == (4, 3, 48, 4) and kw["router"].shape == (4, 48, 3)
    assert torch.equal(kw["lora_a"][0], one["lora_a"]) and not torch.equal(kw["lora_a"][1], one["lora_a"])
    ids = kw["adapter_ids"].tolist()
    assert len(ids) == 40 and set(ids) == {-1, 0, 1, 3} and ids != sorted(ids)
    decode, _ = gpu_check.make_arguments(dataclasses.replace(case, variant="decode"), torch.device("cpu"))
    assert decode["x"].shape[0] == decode["base"].shape[0] == 32
    assert set(decode["adapter_ids"].tolist()) == {-1, 0, 1, 2, 3}
