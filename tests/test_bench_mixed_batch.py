"""The mixed-batch serving benchmark compares like with like: on a tiny Llama, every way of serving the batch
(one adapter for all, a loop over the adapters' sub-batches, pemoe's mixed batch, PEFT's mixed-batch LoRA)
gives each sequence its own adapter's logits and greedy tokens, the bench's decode is ``generate``'s, and the
run writes the rows and table columns the targets are read from."""

from __future__ import annotations

import pytest
import torch

from pemoe.bench import harness, mixed_batch
from pemoe.bench.runner import main as bench_main

#: 3 adapters over 7 sequences: groups of 3, 2 and 2 sequences, interleaved (b mod 3)
TINY = dict(mixed_batch.shapes(False)[0], adapters=3, B=7, S=5, new=4, M=32, F=48, D=8, layers=2, V=64)
CLOSE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built():
    inputs = mixed_batch.make_inputs(TINY, torch.float32, torch.device("cpu"))
    return inputs, mixed_batch.setup(inputs)


@pytest.fixture(scope="module")
def outputs(built):
    """provider -> (prefill last logits [B, V], decoded tokens [B, new])"""
    _, s = built
    return {name: (served.prefill(), served.decode()) for name, served in s.served.items()}


def _rows_of(adapter: int) -> list[int]:
    return [b for b in range(TINY["B"]) if b % TINY["adapters"] == adapter]


@pytest.mark.parametrize("method", list(mixed_batch.METHODS))
def test_mixed_batch_equals_the_loop_over_adapters(outputs, method):
    """Each sequence gets its own adapter's logits and tokens, whether its adapter's sequences run as a sub-batch
    (the loop) or mixed with the others (the bank)."""
    mixed_logits, mixed_tokens = outputs[f"{method}-mixed"]
    loop_logits, loop_tokens = outputs[f"{method}-loop"]
    assert mixed_logits.shape == (TINY["B"], TINY["V"]) and mixed_tokens.shape == (TINY["B"], TINY["new"])
    torch.testing.assert_close(mixed_logits, loop_logits, **CLOSE)
    assert mixed_tokens.tolist() == loop_tokens.tolist()


@pytest.mark.parametrize("method", list(mixed_batch.METHODS))
def test_one_adapter_for_all_is_adapter_0_and_the_adapters_differ(outputs, method):
    one_logits, one_tokens = outputs[f"{method}-one"]
    mixed_logits, mixed_tokens = outputs[f"{method}-mixed"]
    frozen_logits, _ = outputs[mixed_batch.FLOOR]
    rows = _rows_of(0)
    torch.testing.assert_close(mixed_logits[rows], one_logits[rows], **CLOSE)
    assert mixed_tokens[rows].tolist() == one_tokens[rows].tolist()
    others = [b for b in range(TINY["B"]) if b not in rows]
    assert (mixed_logits[others] - one_logits[others]).abs().max() > 1e-3  # other adapters, other logits
    assert (one_logits - frozen_logits).abs().max() > 1e-3  # the adapter is not the identity


def test_peft_mixed_lora_equals_pemoes(outputs):
    """PEFT's model holds the same LoRA adapters: the same logits (another summation order) and tokens."""
    peft_logits, peft_tokens = outputs[mixed_batch.PEFT]
    lora_logits, lora_tokens = outputs["lora-mixed"]
    torch.testing.assert_close(peft_logits, lora_logits, **CLOSE)
    assert peft_tokens.tolist() == lora_tokens.tolist()


@pytest.mark.parametrize("name", ["lora-mixed", mixed_batch.PEFT, "mov-loop"])
def test_decode_is_generates_greedy_decoding_and_repeats(built, outputs, name):
    """The timed decode (from a cache prefilled once, cropped back at each call) generates what
    ``generate(do_sample=False)`` does, call after call."""
    inputs, s = built
    served = s.served[name]
    prompt = inputs["input_ids"]
    want = torch.empty(TINY["B"], TINY["new"], dtype=torch.long)
    with torch.inference_mode():
        for part in served.parts:
            rows = torch.arange(TINY["B"]) if part.rows is None else part.rows
            out = part.model.generate(
                prompt[rows], max_new_tokens=TINY["new"], do_sample=False, use_cache=True, pad_token_id=0,
                eos_token_id=None, **part.kwargs,
            )  # fmt: skip
            want[rows] = out[:, TINY["S"] :]
    assert outputs[name][1].tolist() == want.tolist()
    assert served.decode().tolist() == want.tolist()


def test_loop_runs_one_sub_batch_per_adapter(built):
    _, s = built
    for method in mixed_batch.METHODS:
        parts = s.served[f"{method}-loop"].parts
        assert [p.rows.tolist() for p in parts] == [_rows_of(a) for a in range(TINY["adapters"])]
        assert len({id(p.model) for p in parts}) == TINY["adapters"]
        assert all(not p.kwargs for p in parts)


def test_lora_yardstick_is_the_lora_bank(outputs):
    """LoRA has no routing: the matmuls-only yardstick's products are the whole op (the same logits, tokens)."""
    torch.testing.assert_close(outputs["lora-matmuls"][0], outputs["lora-mixed"][0], **CLOSE)
    assert outputs["lora-matmuls"][1].tolist() == outputs["lora-mixed"][1].tolist()


@pytest.mark.parametrize("names", [["adapter-2", "adapter-0", "adapter-2"], ["adapter-1", None, "adapter-1"]])
def test_molora_yardstick_sums_each_adapters_experts_unweighted(built, names):
    """A yardstick site: base + scale·Σ_e (x A_e) B_e with each sequence's own adapter (even and padded groups;
    a base sequence keeps the base), against the formula written out per token."""
    from pemoe.banks import adapter_batch
    from pemoe.layers import MoLoRALinear

    _, s = built
    model = s.served["molora-matmuls"].parts[0].model
    site = next(m for m in model.modules() if isinstance(m, MoLoRALinear))
    x = torch.randn(len(names), 3, site.in_features)
    ids = [None if n is None else int(n.rsplit("-", 1)[1]) for n in names]
    with torch.no_grad(), adapter_batch(model, names):
        got = site(x)
    with torch.no_grad():
        want = site.base(x)
        for b, a in enumerate(ids):
            if a is not None:
                delta = torch.einsum("tk,ekr,ern->tn", x[b], site.lora_a[a], site.lora_b[a])
                want[b] += site.scale * delta
    torch.testing.assert_close(got, want, **CLOSE)
    assert (got - site.base(x)).abs().max() > 1e-4  # the adapters do something


def test_yardsticks_are_molora_and_lora_only():
    names = mixed_batch.provider_names()
    assert {n for n in names if n.endswith("-matmuls")} == {"molora-matmuls", "lora-matmuls"}
    with pytest.raises(ValueError, match="adapter bank"):
        mixed_batch.matmuls_only(torch.nn.Linear(2, 2))


def test_bench_rows_and_table(tmp_path, monkeypatch):
    """``pemoe bench --ops mixed_batch`` (float32 by default): time, tokens/s and the targets' throughput ratios
    for every provider and mode, and the table's columns."""
    monkeypatch.setattr(mixed_batch, "ADAPTER_COUNTS", (2,))
    monkeypatch.setattr(mixed_batch, "BATCH", {"B": 3, "S": 4, "new": 2})
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["--ops", "mixed_batch", "--shape-scale", "16", "--rounds", "1", "--out", str(tmp_path)]
        assert bench_main(argv) == 0
    finally:
        torch.set_num_threads(n)
    rows = harness.read_csv(tmp_path / "results.csv")
    assert {r["dtype"] for r in rows} == {"float32"}
    got = {(r["provider"], r["mode"], r["metric"]) for r in rows}
    for mode in mixed_batch.MODES:
        for name in mixed_batch.provider_names():
            assert (name, mode, "time_ms") in got and (name, mode, "tokens_per_s") in got, (name, mode)
        for method in mixed_batch.METHODS:
            for metric in ("throughput_vs_one", "throughput_vs_loop", "throughput_vs_peft"):
                assert (f"{method}-mixed", mode, metric) in got, (method, mode, metric)
            assert (f"{method}-loop", mode, "throughput_vs_one") in got
        for method in mixed_batch.YARDSTICK_METHODS:
            assert (f"{method}-matmuls", mode, "throughput_vs_one") in got
    # tokens/s is tokens per call over the call's time; the ratio is the baseline's time over the provider's
    p50 = {(r["provider"], r["mode"], r["metric"]): float(r["p50"]) for r in rows}
    for mode, tokens in (("prefill", 3 * 4), ("decode", 3 * 2)):
        t = p50[("lora-mixed", mode, "time_ms")]
        assert p50[("lora-mixed", mode, "tokens_per_s")] == pytest.approx(tokens / t * 1e3, rel=1e-4)
        ratio = p50[(mixed_batch.PEFT, mode, "time_ms")] / t
        assert p50[("lora-mixed", mode, "throughput_vs_peft")] == pytest.approx(ratio, rel=1e-4)
    table = (tmp_path / "results.md").read_text()
    for col in ("prefill tok/s", "prefill vs one", "decode tok/s", "decode vs one", "decode vs loop", "decode vs PEFT"):
        assert col in table
    assert "lora-mixed" in table and mixed_batch.PEFT in table


def test_process_clock_counts_this_process_work_not_waiting():
    """``clock="process"`` reads the process's CPU time: a call that sleeps costs (almost) nothing on it and its
    sleep on the wall clock; a call that computes costs about the same on both."""
    import time

    def sleep():
        time.sleep(0.05)

    def compute():
        t_end = time.process_time() + 0.03
        while time.process_time() < t_end:
            pass

    fns = {"sleep": sleep, "compute": compute}
    kw = dict(warmup=0, reps=1, min_rounds=2, max_rounds=2, budget_s=0.0)
    wall = harness.time_interleaved(fns, torch.device("cpu"), **kw)
    process = harness.time_interleaved(fns, torch.device("cpu"), **kw, clock="process")
    assert wall["sleep"][1] >= 50.0 and process["sleep"][1] < 10.0
    assert process["compute"][1] >= 30.0 and wall["compute"][1] >= process["compute"][1] * 0.99
    with pytest.raises(ValueError, match="clock must be one of"):
        harness.time_interleaved(fns, torch.device("cpu"), **kw, clock="cycles")


@pytest.mark.parametrize("clock", ["wall", "process"])
def test_bench_clock_is_recorded(tmp_path, monkeypatch, clock):
    """``--clock process`` times on the process clock with one torch thread; every CSV row and the table's
    header name the clock (wall without the option)."""
    monkeypatch.setattr(mixed_batch, "ADAPTER_COUNTS", (2,))
    monkeypatch.setattr(mixed_batch, "BATCH", {"B": 3, "S": 4, "new": 2})
    used = []
    timed = harness.time_interleaved

    def spy(*a, **k):
        used.append((k.get("clock", "wall"), torch.get_num_threads()))
        return timed(*a, **k)

    monkeypatch.setattr(harness, "time_interleaved", spy)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        argv = ["--ops", "mixed_batch", "--providers", "lora-one,lora-mixed", "--shape-scale", "16", "--rounds", "1"]
        argv += ["--out", str(tmp_path)] + ([] if clock == "wall" else ["--clock", clock])
        assert bench_main(argv) == 0
    finally:
        torch.set_num_threads(n)
    assert used and {c for c, _ in used} == {clock}
    assert {t for _, t in used} == ({1} if clock == "process" else {2})
    rows = harness.read_csv(tmp_path / "results.csv")
    assert rows and {r["clock"] for r in rows} == {clock}
    header = (tmp_path / "results.md").read_text()
    assert ("Clock: process CPU time" in header) == (clock == "process")
    assert ("Clock: wall" in header) == (clock == "wall")
