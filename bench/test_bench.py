"""pytest-benchmark view of the same cases as ``pemoe bench``: ``pytest bench/ --benchmark-only``.

Parametrized over op x provider x mode (x dtype, ``--bench-dtypes``) on the issue's widths with a small
token count (``--bench-tokens``, default 256). Each benchmark times one call of the mode's closure
(``fwd``: a training forward; ``bwd``: the backward alone over one recorded graph; ``fwd_bwd``: forward +
backward with a fixed grad_out), exactly as
bench/harness.py does; ``extra_info`` records saved_mb (activation memory saved for backward, the op's
inputs excluded) and out_mb. The benchmarks of one op / shape / dtype / mode share a group, so the
``linear`` floor sits next to the providers in pytest-benchmark's tables.
"""

from __future__ import annotations

import pytest
import torch

from pemoe.bench import harness, molora_linear, mov_ffn, mov_linear

BENCHES = {b.OP: b.BENCH for b in (mov_linear, molora_linear, mov_ffn)}
CASES = [(op, p) for op, b in BENCHES.items() for p in b.providers]


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--bench-device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.parametrize("mode", ("fwd", "bwd", "fwd_bwd"))
@pytest.mark.parametrize(("op", "provider"), CASES, ids=[f"{op}-{p}" for op, p in CASES])
def test_bench(benchmark, request, device, op: str, provider: str, mode: str, dtype_name: str) -> None:
    bench = BENCHES[op]
    prov = bench.providers[provider]
    reason = harness.unavailable_reason(op, prov, device)
    if reason is not None:
        pytest.skip(f"{provider} unavailable on {device.type}: {reason}")
    shape = dict(bench.shapes(False)[0], T=request.config.getoption("--bench-tokens"))
    reason = harness.shape_skip_reason(prov, shape)
    if reason is not None:
        pytest.skip(f"{provider} does not apply at {harness.shape_str(shape)}: {reason}")
    dtype = harness.DTYPES[dtype_name]
    base = bench.make_inputs(shape, dtype, device)
    inputs = {k: v.detach().requires_grad_(k in prov.trainable) for k, v in base.items()}
    saved, out = harness.saved_for_backward(lambda: prov.forward(inputs), harness.storage_ptrs(base.values()))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, out.dtype)
    fn = harness._closure(prov, inputs, mode, grad_out)
    if device.type == "cuda":

        def run() -> None:
            fn()
            torch.cuda.synchronize()

    else:
        run = fn
    benchmark.group = f"{op} {harness.shape_str(shape)} {dtype_name} {mode}"
    benchmark.extra_info.update(
        saved_mb=saved / 2**20, out_mb=out.untyped_storage().nbytes() / 2**20, shape=harness.shape_str(shape)
    )
    benchmark(run)
