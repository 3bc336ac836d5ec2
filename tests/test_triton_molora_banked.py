"""Adapter-bank MoLoRA Triton kernels (pemoe.kernels.triton.molora_banked) in the interpreter, forward only:
``molora_linear`` / ``molora_adapter`` with ``adapter_ids`` and ``implementation="triton"`` against the banked
reference by the tests/helpers.py rule (dtypes, odd T, E, odd r, top-k, sentence routing, ids with -1, unsorted
ids, one adapter for every token, adapters absent from the batch, A = 1, with and without ``base``), several
row tiles per segment and column tiles, autotuning's trial runs on the in-place output, the launch plan against
hand-computed tables, bitwise agreement with the single-adapter kernels, the refusal of inputs that require
grad, and ahead-of-time compiles for sm_80 / sm_90."""

from __future__ import annotations

import pytest
import torch

from pemoe import ops
from pemoe.kernels.triton import interpreter
from tests.helpers import assert_within_rule

pytestmark = pytest.mark.skipif(not interpreter.INTERPRET, reason="needs TRITON_INTERPRET=1 (no GPU)")

if interpreter.INTERPRET:
    from pemoe.kernels.triton import molora_banked as kernel
    from pemoe.kernels.triton import molora_linear as single

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
K, N, A = 40, 72, 3
#: Unsorted ids over adapters 0 and 1 and -1 (the base alone); adapter 2 of the 3 names no token.
PATTERN = (0, 1, -1, 1, 0, 0, 1)
ACTIVATIONS = ("x", "weight", "bias", "base", "router_input")


def _ids(n: int, pattern=PATTERN) -> torch.Tensor:
    return torch.tensor([pattern[(i * 5 + 1) % len(pattern)] for i in range(n)], dtype=torch.long)


def _inputs(op, t, e, r=4, *, a=A, top_k=None, renormalize=False, sentence=False, base=True, ids=None):
    lead = (2, t) if sentence else (t,)
    args = dict(
        x=torch.randn(*lead, K),
        lora_a=torch.randn(a, e, K, r) * 0.3,
        lora_b=torch.randn(a, e, r, N) * 0.3,
        router=None if e == 1 else torch.randn(a, 9 if sentence else K, e) * 0.5,
        scale=16.0 / r,
        top_k=top_k,
        renormalize=renormalize,
        adapter_ids=(_ids(t * len(lead)) if ids is None else ids).reshape(lead),
    )
    if sentence:
        args["router_input"] = torch.randn(2, 9)
    if op == "molora_linear":
        args.update(weight=torch.randn(N, K) * K**-0.5, bias=torch.randn(N))
    elif base:
        args["base"] = torch.randn(*lead, N)
    return args


def _cast(inputs: dict, dtype: torch.dtype, adapter_dtype: torch.dtype) -> dict:
    return {
        k: (v.to(dtype if k in ACTIVATIONS else adapter_dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in inputs.items()
    }


def check(op: str, inputs: dict, dtype: torch.dtype) -> torch.Tensor:
    """The Triton output against the banked reference (tolerance rule); returns the Triton output."""
    args = _cast(inputs, dtype, torch.float32)
    with torch.no_grad():
        out = getattr(ops, op)(**args, implementation="triton")
        ref = getattr(ops, op)(**args, implementation="reference")
        truth = getattr(ops, op)(**_cast(inputs, torch.float64, torch.float64), implementation="reference")
    assert out.dtype == dtype and out.shape == truth.shape
    assert_within_rule(out, ref, truth, dtype, f"{op} output")
    return out


OPS = ["molora_linear", "molora_adapter"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [1, 7, 37])
@pytest.mark.parametrize("e", [1, 4])
def test_molora_linear_matches_reference(dtype, t, e):
    check("molora_linear", _inputs("molora_linear", t, e), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("base", [True, False], ids=["base", "no-base"])
def test_molora_adapter_matches_reference(dtype, base):
    check("molora_adapter", _inputs("molora_adapter", 23, 3, base=base), dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("e,r", [(3, 1), (3, 3), (2, 5)])
def test_odd_ranks(op, e, r):
    check(op, _inputs(op, 19, e, r), torch.bfloat16)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, False), (2, True)])
def test_top_k(op, top_k, renormalize):
    check(op, _inputs(op, 23, 4, top_k=top_k, renormalize=renormalize), torch.bfloat16)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sentence_routing(op, dtype):
    check(op, _inputs(op, 5, 4, sentence=True), dtype)


def test_sentence_routing_top_k():
    check("molora_linear", _inputs("molora_linear", 5, 4, sentence=True, top_k=2, renormalize=True), torch.bfloat16)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fill", [0, 2, -1])
def test_one_id_for_every_token(op, fill):
    """Every token one adapter (no permutation: ``perm`` is the identity), or every token the base alone (no
    launch at all: molora_adapter then returns base itself, molora_linear x Wᵀ + b)."""
    inputs = _inputs(op, 9, 3)
    inputs["adapter_ids"] = torch.full_like(inputs["adapter_ids"], fill)
    out = check(op, inputs, torch.float32)
    if fill == -1 and op == "molora_adapter":
        assert torch.equal(out, inputs["base"])


@pytest.mark.parametrize("op", OPS)
def test_single_adapter_bank(op):
    """A = 1: ids in {-1, 0}."""
    check(op, _inputs(op, 13, 4, a=1, ids=_ids(13, (0, -1, 0, 0))), torch.bfloat16)


@pytest.mark.parametrize("op", OPS)
def test_sorted_and_reversed_ids(op):
    """Ids already sorted, and sorted descending: the permutation is the identity, or reverses the segments."""
    ids = torch.tensor([-1] * 3 + [0] * 5 + [1] * 4 + [2] * 3)
    check(op, _inputs(op, 15, 2, ids=ids), torch.bfloat16)
    check(op, _inputs(op, 15, 2, ids=ids.flip(0)), torch.bfloat16)


def test_strided_stacked_parameters():
    """Stacked parameters with non-unit inner strides (views of other layouts): strides are passed as they are."""
    inputs = _inputs("molora_adapter", 11, 3)
    inputs["lora_a"] = inputs["lora_a"].transpose(2, 3).contiguous().transpose(2, 3)
    inputs["lora_b"] = inputs["lora_b"].permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    inputs["router"] = inputs["router"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not inputs["lora_a"].is_contiguous() and not inputs["lora_b"].is_contiguous()
    check("molora_adapter", inputs, torch.bfloat16)


def test_base_is_not_modified():
    inputs = _cast(_inputs("molora_adapter", 17, 3), torch.bfloat16, torch.float32)
    before = inputs["base"].clone()
    with torch.no_grad():
        y = ops.molora_adapter(**inputs, implementation="triton")
    assert torch.equal(inputs["base"], before) and not torch.equal(y, before)


@pytest.mark.parametrize("sentence", [False, True])
def test_no_tokens(sentence):
    inputs = _inputs("molora_linear", 0, 3, sentence=sentence)
    with torch.no_grad():
        y = ops.molora_linear(**inputs, implementation="triton")
    assert y.shape == inputs["x"].shape[:-1] + (N,)


# ------------------------------------------------------------------------------------------
# Several row tiles per segment, several column tiles, autotuning on the in-place output
# ------------------------------------------------------------------------------------------


def _small_configs():
    return dict(block_m=16, shrink=kernel._config(4, 2, BLOCK_K=16), expand=kernel._config(4, 2, BLOCK_N=32))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_tile(op, dtype):
    """T = 123 over adapters 0 and 1: segments of ~53 rows -> 4 row tiles of 16 each (the last partial), N = 72
    -> 3 column tiles of 32 (the last partial), K = 40 -> 3 reduction steps of 16."""
    with kernel.use_configs(**_small_configs()):
        check(op, _inputs(op, 123, 4, top_k=2), dtype)


@pytest.mark.parametrize("winner", ["first", "last"])
def test_autotuning_restores_the_output_between_trials(winner):
    """Every legal configuration runs on the same buffers (as a GPU's autotuner does), then the winner: the
    in-place expand must start each run from the base (``restore_value``), else the delta is added many times."""
    inputs = _inputs("molora_linear", 37, 4)
    with interpreter.autotune_every_config(interpreter.autotuners(kernel), winner=winner) as _:
        check("molora_linear", inputs, torch.bfloat16)


# ------------------------------------------------------------------------------------------
# Launch plan (tables computed by hand)
# ------------------------------------------------------------------------------------------


def test_plan_segments_by_hand():
    ids = torch.tensor([1, -1, 0, 1, 1, 0])
    with kernel.use_configs(block_m=16):
        plan = kernel.plan_segments(ids, 4)
    # stable sort: -1 (token 1), 0 (tokens 2, 5), 1 (tokens 0, 3, 4); adapters 2 and 3 absent
    assert plan.perm.tolist() == [1, 2, 5, 0, 3, 4]
    assert plan.counts == (1, 2, 3, 0, 0)
    assert plan.tiles.tolist() == [[0, 1, 3], [1, 3, 6]]
    assert plan.tiles.dtype == torch.int64 and plan.adapter_tokens == 5


def test_plan_splits_long_segments():
    ids = torch.tensor([2] * 17 + [-1] * 5 + [0] * 40)
    with kernel.use_configs(block_m=16):
        plan = kernel.plan_segments(ids, 3)
    # sorted: -1 at [0, 5), 0 at [5, 45), 2 at [45, 62)
    assert plan.tiles.tolist() == [[0, 5, 45], [0, 21, 45], [0, 37, 45], [2, 45, 62], [2, 61, 62]]
    assert plan.perm[:5].tolist() == list(range(17, 22)) and plan.perm[45:].tolist() == list(range(17))


@pytest.mark.parametrize(
    "counts,dtype,want",
    [
        ((0, 1, 1, 1), torch.bfloat16, 16),  # decode: one token per adapter
        ((5, 30, 0, 34), torch.bfloat16, 32),  # mean of the present segments: 32
        ((0, 40, 200), torch.float16, 64),
        ((0, 40, 200), torch.float32, 32),  # float32: at most 32 rows
    ],
)
def test_choose_block_m(counts, dtype, want):
    assert kernel.choose_block_m(counts, dtype) == want


# ------------------------------------------------------------------------------------------
# The same numerics as the single-adapter kernels
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("e,top_k", [(4, None), (1, None), (4, 2)])
def test_one_adapter_is_bitwise_the_single_adapter_kernel(dtype, e, top_k):
    """Every token on adapter 1, matching tiles (16 rows, 16-wide K steps, 32 columns): the banked kernels compute
    U′ with the same K loop, round it once, and add U′·B_cat and then the base as the single-adapter shrink and
    expand GEMM (K = 0) do, so the outputs agree bit for bit."""
    inputs = _cast(_inputs("molora_adapter", 37, e, top_k=top_k), dtype, torch.float32)
    ids = torch.ones(37, dtype=torch.long)
    x, base = inputs["x"], inputs["base"]
    router = inputs["router"]
    with torch.no_grad(), kernel.use_configs(**_small_configs()):
        got = kernel.molora_adapter(
            x, base, ids, inputs["lora_a"], inputs["lora_b"], router, None, inputs["scale"], top_k, False
        )
    configs = dict(shrink=single._config(4, 2, BLOCK_M=16, BLOCK_K=16), expand=single._gemm(16, 32, 16, 4, 2))
    with torch.no_grad(), single.use_configs(**configs):
        want = single.molora_adapter(
            x, base, inputs["lora_a"][1], inputs["lora_b"][1], None if router is None else router[1], None,
            inputs["scale"], top_k, False,
        )  # fmt: skip
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------
# Forward only; the same argument checks as every implementation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["x", "lora_a", "lora_b", "router", "bias/base", "router_input"])
def test_refuses_inputs_that_require_grad(op, name):
    """No backward: an input that requires grad while autograd records is refused, naming it and pointing to
    implementation='torch'; never another implementation in its place."""
    inputs = _inputs(op, 7, 4, sentence=name == "router_input")
    if name == "bias/base":
        name = "bias" if op == "molora_linear" else "base"
    inputs[name].requires_grad_()
    with pytest.raises(NotImplementedError, match=rf"forward only, but {name} require.*implementation='torch'"):
        getattr(ops, op)(**inputs, implementation="triton")
    with torch.no_grad():  # nothing is recorded: the kernels run
        check(op, inputs, torch.float32)


def test_kernel_entry_refuses_grad():
    inputs = _inputs("molora_adapter", 7, 4)
    x, ids, lora_a, lora_b, router = (inputs[k] for k in ("x", "adapter_ids", "lora_a", "lora_b", "router"))
    lora_a.requires_grad_()
    with pytest.raises(NotImplementedError, match="forward only, but lora_a require"):
        kernel.molora_adapter(x, None, ids, lora_a, lora_b, router, None, 1.0, None, False)


BAD = {
    "index = A": (lambda a: a["adapter_ids"].__setitem__(3, A), ValueError, r"index 3, outside \[-1, 3\)"),
    "float ids": (lambda a: a.update(adapter_ids=a["adapter_ids"].float()), TypeError, r"integer tensor"),
    "A differs": (lambda a: a.update(router=a["router"][:2]), ValueError, r"different numbers of adapters"),
    "rank differs": (lambda a: a.update(lora_b=a["lora_b"][:, :, :2]), ValueError, r"lora_b must have shape"),
}


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_same_for_every_implementation(impl, case):
    change, exc, match = BAD[case]
    args = _inputs("molora_linear", 7, 4)
    change(args)
    with torch.no_grad(), pytest.raises(exc, match=match):
        ops.molora_linear(**args, implementation=impl)


def test_float64_is_refused():
    """The kernels run 16-bit and float32 activations; float64 is refused, never computed otherwise."""
    args = _cast(_inputs("molora_linear", 7, 4), torch.float64, torch.float32)
    with torch.no_grad(), pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        ops.molora_linear(**args, implementation="triton")


# ------------------------------------------------------------------------------------------
# Larger cases (-m slow)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_adapters_long_batch(op, dtype):
    """A = 8 adapters, T = 600 tokens in a random order (some adapters absent): 64-row tiles (32 for float32)."""
    ids = torch.randint(-1, 6, (600,))
    check(op, _inputs(op, 600, 4, a=8, ids=ids, top_k=2, renormalize=True), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("e,r", [(60, 4), (15, 16)])
def test_widest_adapters(e, r):
    """E·r = 240: 256 padded adapter columns, the widest supported."""
    check("molora_linear", _inputs("molora_linear", 33, e, r, top_k=2), torch.bfloat16)


# ------------------------------------------------------------------------------------------
# Ahead-of-time compiles for sm_80 / sm_90
# ------------------------------------------------------------------------------------------


def _aot(monkeypatch, selection: str):
    from pemoe.kernels.triton.aot import compile_module_in_subprocess, format_reports

    monkeypatch.setenv("PEMOE_AOT_SELECTION", selection)
    reports = compile_module_in_subprocess("pemoe.kernels.triton.molora_banked_analysis")
    print("\n" + format_reports(reports))
    assert reports
    assert not [r for r in reports if r.error], [r.error for r in reports if r.error]
    for r in reports:
        assert r.shared_bytes <= {80: 163, 90: 227}[r.capability] * 1024, f"{r.name} sm_{r.capability} shared memory"
        if r.default:
            assert r.spill_bytes == 0, f"{r.name} sm_{r.capability} spills {r.spill_bytes} bytes"
            assert r.uses_mma or r.name.startswith("fp32"), f"{r.name} sm_{r.capability}: no tensor-core dot"
    return reports


def test_aot_default_configs_smoke(monkeypatch):
    """Default tiles of both kernels, bf16, E = 10, r = 4, the smallest and largest row tiles: no spills. Every
    dtype, E·r, row tile and configuration: -m slow, or ``python -m pemoe.kernels.triton.aot
    pemoe.kernels.triton.molora_banked_analysis``."""
    reports = _aot(monkeypatch, "smoke")
    assert {r.kernel for r in reports} == {"_banked_shrink_kernel", "_banked_expand_kernel"}
    assert {r.capability for r in reports} == {80, 90}


@pytest.mark.slow
def test_aot_every_config(monkeypatch):
    _aot(monkeypatch, "all")
