"""``pemoe bench`` on tiny shapes: outputs, validation, and an interrupted run keeping its rows."""

from __future__ import annotations

import csv

import pytest
import torch

from pemoe.cli import main

TINY = ["bench", "--tokens", "8", "--shape-scale", "16", "--ops", "mov_linear", "--dtypes", "float32"]
COLUMNS = [
    "op",
    "provider",
    "mode",
    "shape",
    "dtype",
    "device",
    "metric",
    "p50",
    "p20",
    "p80",
    "commit",
    "time",
    "clock",
]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: keep the test quick on a busy machine
    yield
    torch.set_num_threads(n)


def _rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def test_bench_writes_csv_markdown_png(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "results.csv")
    providers = ["linear", "pemoe-torch", "reference", "authors-einsum"]
    for p in providers:
        for mode in ("fwd", "fwd_bwd"):
            got = {r["metric"] for r in rows if r["provider"] == p and r["mode"] == mode}
            assert {"time_ms", "ratio_vs_floor"} <= got, (p, mode, got)
        assert {"saved_mb", "out_mb"} <= {r["metric"] for r in rows if r["provider"] == p}
    assert {r["shape"] for r in rows} == {"T=8,K=64,N=64,G=16,E=10"}
    assert {(r["op"], r["dtype"], r["device"]) for r in rows} == {("mov_linear", "float32", "cpu")}
    assert {r["clock"] for r in rows} == {"wall"}  # the default clock
    for r in rows:
        if r["provider"] == "linear" and r["metric"] == "ratio_vs_floor":
            assert float(r["p50"]) == pytest.approx(1.0)
        if r["metric"] == "time_ms":
            assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
    # the frozen floor saves nothing beyond its inputs; the adapters save activations
    saved = {r["provider"]: float(r["p50"]) for r in rows if r["metric"] == "saved_mb"}
    assert saved["linear"] == 0.0 and saved["reference"] > 0.0
    md = (tmp_path / "results.md").read_text()
    assert "| op | shape | dtype | provider | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio | saved MB |" in md
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "Device: CPU" in out and "mov_linear -> torch" in out
    # a provider that cannot run here is reported, not dropped
    assert "skipped mov_linear / pemoe-triton on cpu" in out and "skipped mov_linear / pemoe-triton" in md
    assert str(tmp_path / "results.csv") in out and str(tmp_path / "ratios.png") in out


@pytest.mark.parametrize(
    ("args", "valid"),
    [
        (["--ops", "mov_linear,nope"], "mov_linear, molora_linear, mov_ffn"),
        (["--providers", "fastest"], "linear, pemoe-torch, pemoe-triton, reference, authors-einsum"),
        (["--dtypes", "int8"], "float32, bfloat16"),
    ],
)
def test_unknown_names_exit_with_the_valid_ones(tmp_path, capsys, args, valid):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--out", str(tmp_path), *args])
    assert e.value.code == 2
    assert valid in capsys.readouterr().err
    assert not (tmp_path / "results.csv").exists()


def test_interrupted_run_keeps_finished_rows(tmp_path, monkeypatch):
    from pemoe.bench import mov_linear

    prov = mov_linear.PROVIDERS["pemoe-torch"]
    real = prov.forward

    def forward(inputs):
        if inputs["x"].dtype == torch.bfloat16:  # the second case
            raise KeyboardInterrupt
        return real(inputs)

    monkeypatch.setattr(prov, "forward", forward)
    args = [a if a != "float32" else "float32,bfloat16" for a in TINY]
    assert main([*args, "--out", str(tmp_path)]) == 130
    rows = _rows(tmp_path / "results.csv")
    first = [r for r in rows if r["dtype"] == "float32"]
    assert {(r["provider"], r["mode"]) for r in first if r["metric"] == "time_ms"} == {
        (p, m) for p in ("linear", "pemoe-torch", "reference", "authors-einsum") for m in ("fwd", "fwd_bwd")
    }
    assert "Interrupted" in (tmp_path / "results.md").read_text()


def test_bwd_mode_and_throughput_columns(tmp_path):
    """--modes adds the backward alone; every pemoe provider gets tflops/gbps from the op's cost formula."""
    assert main([*TINY, "--out", str(tmp_path), "--modes", "fwd,bwd", "--providers", "pemoe-torch"]) == 0
    rows = _rows(tmp_path / "results.csv")
    assert {r["mode"] for r in rows if r["metric"] == "time_ms"} == {"fwd", "bwd"}
    from pemoe.bench.mov_linear import cost

    shape = {"T": 8, "K": 64, "N": 64, "G": 16, "E": 10}
    for mode in ("fwd", "bwd"):
        by_metric = {r["metric"]: float(r["p50"]) for r in rows if r["provider"] == "pemoe-torch" and r["mode"] == mode}
        flops, nbytes = cost(shape, torch.float32, mode)
        # the rates are the formula's counts over the measured median time
        assert by_metric["tflops"] == pytest.approx(flops / by_metric["time_ms"] / 1e9, rel=1e-4)
        assert by_metric["gbps"] == pytest.approx(nbytes / by_metric["time_ms"] / 1e6, rel=1e-4)
        assert "roofline_pct" not in by_metric  # no known peak for a CPU
    md = (tmp_path / "results.md").read_text()
    assert "| bwd ms | bwd ratio |" in md and "fwd TFLOP/s" in md and "fwd+bwd ms" not in md


def test_shape_restricted_providers_are_reported(tmp_path, capsys):
    """PEFT's IA3 applies to E = 1 only: at E = 10 it is skipped with the reason, in the output and the table."""
    assert main([*TINY, "--out", str(tmp_path), "--modes", "fwd", "--providers", "peft-ia3,peft-lora"]) == 0
    out = capsys.readouterr().out
    assert "skipped mov_linear / peft-ia3 at T=8,K=64,N=64,G=16,E=10: PEFT's IA3 is the E = 1 case only" in out
    assert "skipped mov_linear / peft-lora: not a provider of this op" in out
    assert "PEFT's IA3 is the E = 1 case only" in (tmp_path / "results.md").read_text()


def test_rounds_sets_the_number_of_interleaved_rounds(tmp_path, monkeypatch):
    """--rounds N: every provider is timed in exactly N rounds of ``reps`` calls, whatever the time budget."""
    from pemoe.bench import harness

    batches = []
    real = harness._sample

    def sample(fn, reps, device, clock="wall"):
        batches.append(reps)
        return real(fn, reps, device, clock)

    monkeypatch.setattr(harness, "_sample", sample)
    argv = [*TINY, "--out", str(tmp_path), "--providers", "pemoe-torch", "--modes", "fwd"]
    assert main([*argv, "--rounds", "7"]) == 0
    assert len(batches) == 2 * 7  # linear and pemoe-torch, 7 rounds each
    with pytest.raises(SystemExit):
        main([*argv, "--rounds", "0"])
