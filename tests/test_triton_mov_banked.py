"""The forward-only Triton kernels for MoV over an adapter bank (kernels/triton/mov_banked.py), in the Triton
interpreter: ``pemoe.ops.mov`` / ``mov_linear`` / ``mov_ffn`` with ``adapter_ids`` and implementation="triton"
against the banked ``"reference"`` by the tolerance rule of tests/helpers.py (``ref``: the banked reference in
the inputs' dtype; ``truth``: in float64 from the same inputs), the refusal of inputs that require grad, and
ahead-of-time compiles for sm_80 / sm_90.

Shapes: D = 16 (the smallest head width the kernels take) and G = 3 heads, N = 48 (not a multiple of the
column tiles); K = 40 (a ragged K tail); the FFN's F = 56. Ids: an unsorted cycle over adapters 0, 1 and -1
(adapter 2 of the bank unused), or one id for every token, or a bank of one adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pemoe import ops
from pemoe.kernels.triton import aot, interpreter
from pemoe.kernels.triton import mov_banked as kernel
from tests.helpers import assert_within_rule

pytestmark = pytest.mark.skipif(not interpreter.INTERPRET, reason="needs TRITON_INTERPRET=1 (no GPU)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTIVATIONS = ("x", "h", "weight", "bias", "wi_0", "wi_1", "wo", "router_input")
K, G, D, F, A = 40, 3, 16, 56, 3
PATTERN = (0, 1, -1, 1, 0, 0, 1)
#: Small tiles: 16-row tiles (several adapters in one tile), two heads per column tile, a K loop with a tail.
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


def _ids(shape, pattern: str = "mixed", num_adapters: int = A) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    if pattern == "mixed":  # unsorted, with -1
        ids = [PATTERN[(i * 5 + 1) % len(PATTERN)] for i in range(n)]
    elif pattern == "one":
        ids = [num_adapters - 1] * n
    elif pattern == "none":
        ids = [-1] * n
    else:  # "all": every adapter and -1, in a scrambled order
        ids = [((i * 7) % (num_adapters + 1)) - 1 for i in range(n)]
    return torch.tensor(ids, dtype=torch.long).reshape(shape)


def inputs(op: str, t: int, e: int, *, top_k=None, renormalize=False, sentence=False, ids="mixed", a=A) -> dict:
    lead = (2, t) if sentence else (t,)
    width, groups = (F, 1) if op == "mov_ffn" else (G * D, G)
    head = F if op == "mov_ffn" else D
    std = 0.2 if op == "mov_ffn" else 0.5
    args = dict(top_k=top_k, renormalize=renormalize, adapter_ids=_ids(lead, ids, a))
    args["experts"] = 1.0 + 0.3 * torch.randn(a, groups, e, head)
    args["router"] = None if e == 1 else torch.randn(a, 9 if sentence else head, e) * std
    if sentence:
        args["router_input"] = torch.randn(2, 9)
    if op == "mov":
        args["h"] = torch.randn(*lead, width)
    elif op == "mov_linear":
        args |= dict(x=torch.randn(*lead, K), weight=torch.randn(width, K) * K**-0.5, bias=torch.randn(width))
    else:
        args |= dict(x=torch.randn(*lead, K), wi_0=torch.randn(F, K) * K**-0.5, wi_1=torch.randn(F, K) * K**-0.5)
        args |= dict(wo=torch.randn(K, F) * F**-0.5, activation="gelu_new")
    return args


def _cast(args: dict, dtype: torch.dtype, adapter_dtype: torch.dtype) -> dict:
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = v.to(dtype if k in ACTIVATIONS else adapter_dtype)
        else:
            out[k] = v
    return out


def check(op: str, args: dict, dtype: torch.dtype, call=None) -> None:
    """The Triton output (``call``: pemoe.ops.<op> by default) against the banked reference by the rule."""
    call = call or (lambda **kw: getattr(ops, op)(**kw, implementation="triton"))
    run = _cast(args, dtype, torch.float32)
    with torch.no_grad():
        out = call(**run)
        ref = getattr(ops, op)(**run, implementation="reference")
        truth = getattr(ops, op)(**_cast(args, torch.float64, torch.float64), implementation="reference")
    assert out.dtype == dtype and out.shape == truth.shape
    assert_within_rule(out, ref, truth, dtype, f"{op} (triton, bank) output")


OPS = ["mov", "mov_linear", "mov_ffn"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t,e", [(1, 4), (7, 1), (37, 4)])
def test_matches_reference(op, dtype, t, e):
    check(op, inputs(op, t, e), dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, True)])
def test_top_k(op, top_k, renormalize):
    check(op, inputs(op, 23, 4, top_k=top_k, renormalize=renormalize), torch.bfloat16)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sentence_routing(op, dtype):
    check(op, inputs(op, 5, 4, sentence=True), dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("ids,a", [("one", A), ("none", A), ("all", 5), ("one", 1), ("all", 1)])
def test_id_patterns(op, ids, a):
    """One adapter for every token, no adapter at all, every adapter of a larger bank, a bank of one."""
    check(op, inputs(op, 19, 4, ids=ids, a=a), torch.bfloat16)


@pytest.mark.parametrize("e", [1, 4, 20])
def test_small_tiles_many_adapters_per_tile(e):
    """Forced 16 × 32 tiles: several adapters in one row tile, two heads per column tile (the last half empty),
    a K tail; E = 20 pads the experts to BLOCK_E = 32."""
    args = inputs("mov_linear", 29, e, ids="all", a=5)

    def call(x, weight, bias, router, experts, adapter_ids, top_k, renormalize):
        ids = adapter_ids.reshape(-1)
        return kernel.mov_linear_banked(
            x, weight, bias, ids, router, experts, None, top_k, renormalize, config=SMALL_TILES
        )

    check("mov_linear", args, torch.bfloat16, call)


def test_ffn_small_tiles_sum_the_logit_partials():
    """Forced narrow F tiles: the FFN router's logits are the sum of four F tiles' shares (one F chunk at this
    size: the up kernel's loop over the chunk's tiles)."""
    args = inputs("mov_ffn", 21, 4, ids="all", a=4)
    up = {"BLOCK_M": 16, "BLOCK_F": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
    scale = {"BLOCK_M": 16, "BLOCK_F": 32, "num_warps": 4, "num_stages": 1}

    def call(x, wi_0, wi_1, wo, router, experts, adapter_ids, activation, top_k, renormalize):
        ids = adapter_ids.reshape(-1)
        return kernel.mov_ffn_banked(
            x, wi_0, wi_1, wo, ids, router, experts, None, activation, top_k, renormalize, up_config=up,
            scale_config=scale,
        )  # fmt: skip

    check("mov_ffn", args, torch.float32, call)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk", [16, 32, 48])
@pytest.mark.parametrize("t", [0, 1, 37])
def test_ffn_f_chunks_sum_every_f_tile(monkeypatch, dtype, chunk, t):
    """The up kernel loops over the 16-column F tiles of its F chunk, accumulates their logit shares and writes
    one partial slot per chunk, which the scaling sums: F = 56 in chunks of 16 (4 slots of one tile), 32 (2 and
    2 tiles, the last one partial) or 48 (3 tiles, then one partial tile: the chunk's end cuts the F range, not a
    tile). A skipped F tile or a dropped slot changes the routing and the output."""
    monkeypatch.setattr(kernel, "f_chunk", lambda F, E, itemsize, configs, programs: chunk)
    launched = {}
    launch = kernel._launch

    def spy(k, grid, args, constexprs, config):
        launched[k] = (grid, args)
        launch(k, grid, args, constexprs, config)

    monkeypatch.setattr(kernel, "_launch", spy)
    args = inputs("mov_ffn", t, 4, ids="all" if t > 1 else "one", a=4)  # "all" gives token 0 id -1
    up = {"BLOCK_M": 16, "BLOCK_F": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}

    def call(x, wi_0, wi_1, wo, router, experts, adapter_ids, activation, top_k, renormalize):
        ids = adapter_ids.reshape(-1)
        return kernel.mov_ffn_banked(
            x, wi_0, wi_1, wo, ids, router, experts, None, activation, top_k, renormalize, up_config=up
        )

    check("mov_ffn", args, dtype, call)
    if t == 0:  # no rows: nothing to launch
        assert not launched
        return
    slots = -(-F // chunk)
    grid, up_args = launched[kernel.mov_ffn_banked_up_kernel]
    assert up_args[7].shape == (slots, t, 4) and grid({"BLOCK_M": 16}) == (-(-t // 16) * slots,)
    assert launched[kernel.mov_ffn_banked_scale_kernel][1][12] == slots


@pytest.mark.parametrize("activation,gated", [("silu", True), ("relu", False)])
def test_ffn_activations(activation, gated):
    args = inputs("mov_ffn", 9, 4) | dict(activation=activation)
    if not gated:
        args["wi_1"] = None
    check("mov_ffn", args, torch.bfloat16)


@pytest.mark.parametrize("op", OPS)
def test_every_autotune_candidate(op):
    """Every configuration autotuning may pick runs correctly (the interpreter's stand-in for a GPU's tuning)."""
    from pemoe.kernels.triton import mov_banked

    args = inputs(op, 13, 4)
    for winner in ("first", "last"):
        with interpreter.autotune_every_config(interpreter.autotuners(mov_banked), winner=winner):
            check(op, args, torch.bfloat16)


def test_empty_batch():
    args = _cast(inputs("mov_linear", 0, 4), torch.bfloat16, torch.float32)
    with torch.no_grad():
        y = ops.mov_linear(**args, implementation="triton")
    assert y.shape == (0, G * D)


# ------------------------------------------------------------------------------------------
# forward only: inputs that require grad are refused, never run elsewhere
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["x", "experts", "router", "router_input"])
def test_inputs_requiring_grad_are_refused(op, name):
    args = inputs(op, 5, 4, sentence=name == "router_input")
    name = "h" if (op == "mov" and name == "x") else name
    args[name].requires_grad_()
    with pytest.raises(NotImplementedError, match=rf"forward only, but {name} requires grad.*implementation='torch'"):
        getattr(ops, op)(**args, implementation="triton")
    with torch.no_grad():  # the same call without autograd runs
        getattr(ops, op)(**args, implementation="triton")


def test_bad_ids_are_refused_as_for_every_implementation():
    args = inputs("mov_linear", 7, 4)
    args["adapter_ids"][3] = A
    with pytest.raises(ValueError, match=r"index 3, outside \[-1, 3\)"), torch.no_grad():
        ops.mov_linear(**args, implementation="triton")


def test_unsupported_head_width_is_refused_by_name():
    args = inputs("mov", 5, 4)
    args["h"] = torch.randn(5, G * 24)
    args["experts"] = torch.ones(A, G, 4, 24)
    args["router"] = torch.randn(A, 24, 4)
    with pytest.raises(NotImplementedError, match=r"head width D = N / G = 24 is not supported"), torch.no_grad():
        ops.mov(**args, implementation="triton")


# ------------------------------------------------------------------------------------------
# ahead-of-time compiles: default configurations for sm_80 and sm_90, without spills
# ------------------------------------------------------------------------------------------

# The default run compiles one default configuration per kernel (T5-large, E = 10, bfloat16: mov_linear, mov,
# the FFN's up and scaling kernels) in a child process started with this module, beside the interpreter tests
# (compiling takes seconds per kernel and capability); the slow test compiles every default of aot_cases().
_AOT_DEFAULTS = """
import dataclasses, json, torch
from pemoe.kernels.triton import aot, mov_banked_analysis as m
cases = m.aot_cases(dtypes=(torch.bfloat16,), shapes=m.AOT_SHAPES[:1], ffn_shapes=m.FFN_SHAPES[:1])
print(json.dumps([dataclasses.asdict(aot.compile_case(c, cc)) for c in cases for cc in aot.CAPABILITIES]))
"""


@pytest.fixture(scope="module", autouse=True)
def _aot_defaults_in_background():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    child = subprocess.Popen(
        [sys.executable, "-c", _AOT_DEFAULTS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    yield child
    if child.poll() is None:  # the AOT test was not selected
        child.kill()
        child.communicate()


def _check_reports(reports: list[aot.CompileReport]) -> None:
    from pemoe.kernels.triton import mov_banked_analysis

    errors = [f"{r.name} sm_{r.capability}: {r.error}" for r in reports if r.error]
    assert reports and not errors, "\n".join(errors)
    spilled = {(r.name.rsplit(" ", 1)[0], r.capability) for r in reports if r.default and r.spill_bytes}
    assert spilled <= mov_banked_analysis.KNOWN_SPILLS, aot.format_reports(reports)


def test_aot_default_configs_compile_without_spills(_aot_defaults_in_background):
    out, err = _aot_defaults_in_background.communicate(timeout=900)
    assert _aot_defaults_in_background.returncode == 0, err[-4000:]
    reports = [aot.CompileReport(**r) for r in json.loads(out)]
    print(f"\n{aot.format_reports(reports)}")
    assert {r.kernel for r in reports} == {
        "mov_banked_kernel",
        "mov_ffn_banked_up_kernel",
        "mov_ffn_banked_scale_kernel",
    }
    assert len(reports) == 8
    _check_reports(reports)


@pytest.mark.slow
def test_aot_every_default_compiles():
    """The default configuration of every kernel at every example shape and dtype (aot_cases()); the spills are
    exactly the documented ones."""
    from pemoe.kernels.triton import mov_banked_analysis

    reports = aot.compile_module_in_subprocess("pemoe.kernels.triton.mov_banked_analysis")
    print(f"\n{aot.format_reports(reports)}")
    assert len(reports) == 2 * len(mov_banked_analysis.aot_cases())
    _check_reports(reports)
    spilled = {(r.name.rsplit(" ", 1)[0], r.capability) for r in reports if r.spill_bytes}
    assert spilled == mov_banked_analysis.KNOWN_SPILLS
