"""Triton MoLoRA linear (pemoe.kernels.triton.molora_linear) in the interpreter: output and every
gradient vs the reference (tests/helpers.py rule) for both forward schedules (two kernels; one fused
kernel), multi-tile grids and several reduction chunks, the deterministic (atomic-free) backward, the
schedule model, bad input, the HBM-traffic model vs the interpreter's counted traffic, and
ahead-of-time compiles for sm_80 / sm_90."""

from __future__ import annotations

import pytest
import torch

from pemoe import ops
from pemoe.kernels.triton import interpreter
from tests.helpers import run_with_grads
from tests.test_ops import DTYPES, MoLoRAAdapterCases, MoLoRALinearCases

pytestmark = pytest.mark.skipif(not interpreter.INTERPRET, reason="needs TRITON_INTERPRET=1 (no GPU)")

if interpreter.INTERPRET:
    from pemoe.kernels.triton import molora_linear as kernel
    from pemoe.kernels.triton import molora_linear_analysis as analysis


class TestMoLoRALinearTriton(MoLoRALinearCases):
    """The public op with the two-kernel forward (the schedule the model picks at T5 shapes)."""

    implementation = "triton"
    schedule = "two_kernel"

    def check(self, inputs, dtype):
        with kernel.use_schedule(self.schedule):
            super().check(inputs, dtype)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("t", [1, 7, 123])
    @pytest.mark.parametrize("e", [1, 2, 10, 15])
    def test_matches_reference(self, dtype, t, e):
        self.check(self.inputs(t, e), dtype)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("r", [1, 16])
    def test_ranks(self, dtype, r):
        self.check(self.inputs(19, 3, r), dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_sentence_routing(self, dtype):
        self.check(self.inputs(5, 4, sentence=True), dtype)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    def test_sentence_routing_top_k(self, dtype):
        self.check(self.inputs(5, 4, sentence=True, top_k=2, renormalize=True), dtype)

    @pytest.mark.parametrize("e,r", [(60, 4), (15, 16)])
    def test_widest_adapters(self, e, r):
        """E·r = 240, the widest supported here (BLOCK_J = 256)."""
        self.check(self.inputs(33, e, r, top_k=2), torch.bfloat16)

    def test_trainable_bias(self):
        inputs = self.inputs(7, 10)
        inputs["bias"].requires_grad_()
        self.check(inputs, torch.bfloat16)

    @pytest.mark.parametrize("case", ["soft", "top2-renorm", "sentence", "lora"])
    def test_gradcheck_float64(self, case):
        """The kernels run float16 / bfloat16 / float32 activations; float64 is refused, never computed otherwise."""
        inputs = self.inputs(5, 1 if case == "lora" else 4, 2)
        x = inputs["x"].double()
        with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
            ops.molora_linear(
                x, inputs["weight"].double(), inputs["lora_a"], inputs["lora_b"], inputs["router"],
                scale=inputs["scale"], implementation="triton",
            )  # fmt: skip


class TestMoLoRALinearTritonFused(TestMoLoRALinearTriton):
    """The same op with the one-kernel forward (the backward is shared; a subset of the matrix)."""

    schedule = "fused"

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("t,e", [(1, 2), (7, 1), (123, 10), (7, 15)])
    def test_matches_reference(self, dtype, t, e):
        self.check(self.inputs(t, e), dtype)

    test_ranks = test_widest_adapters = test_gradcheck_float64 = test_trainable_bias = None


# ------------------------------------------------------------------------------------------
# Multi-tile grids, several reduction chunks, partial gradients, strided inputs
# (small forced tiles on small shapes)
# ------------------------------------------------------------------------------------------

# At T=37, K=40, N=72 with REDUCE_ROWS = 32: the fused forward runs 3x2 programs of two 16x32 y tiles
# each (the last tile wholly past N), 2 K steps per tile; the shrink / grad_u passes 3 programs of 16
# rows (3 and 5 reduction steps); the expand GEMM 3x3 tiles of 16x32 (2 K steps), the dx GEMM 3x3 tiles
# of 16x16 (5 N steps); the weight gradients 2 token chunks (32 + 5 rows, 16-row steps) x 3 column tiles
# of 16 (x: 40 columns, the last partial) or x 5 (dy: 72 columns).


def _small_configs() -> dict:
    return dict(
        pack=kernel._config(4, 1, BLOCK_C=16),
        fused=kernel._fused(16, 32, 32, 4, 2, 2),
        shrink=kernel._config(4, 2, BLOCK_M=16, BLOCK_K=16),
        expand=kernel._gemm(16, 32, 32, 4, 2),
        grad_u=kernel._config(4, 2, BLOCK_M=16, BLOCK_K=16),
        dx=kernel._gemm(16, 16, 16, 4, 2),
        wgrad_a=kernel._config(4, 2, BLOCK_C=16, BLOCK_T=16),
        wgrad_b=kernel._config(4, 2, BLOCK_C=16, BLOCK_T=16),
    )


MULTI_TILE_CASES = [
    (1, 4, {}),
    (10, 4, {}),
    (15, 1, {"top_k": 2}),
    (10, 16, {"top_k": 3, "renormalize": True}),
    (4, 4, {"sentence": True, "top_k": 2, "renormalize": True}),
]
MULTI_TILE_IDS = ["lora", "soft", "top2", "top3-renorm", "sentence"]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(kernel, "REDUCE_ROWS", 32)


@pytest.mark.usefixtures("small_chunks")
class TestMultiTile(MoLoRALinearCases):
    implementation = "triton"
    schedule = "two_kernel"

    def check(self, inputs, dtype):
        with kernel.use_configs(**_small_configs()), kernel.use_schedule(self.schedule):
            super().check(inputs, dtype)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("e,r,kw", MULTI_TILE_CASES, ids=MULTI_TILE_IDS)
    def test_matches_reference(self, dtype, e, r, kw):
        inputs = self.inputs(37, e, r, **kw)
        inputs["bias"].requires_grad_()
        self.check(inputs, dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_only_lora_b_and_bias_need_grad(self, dtype):
        """x, lora_a and router frozen: one column of backward programs computes d lora_b and d bias."""
        inputs = self.inputs(37, 10)
        for name in ("x", "lora_a", "router"):
            inputs[name].requires_grad_(False)
        inputs["bias"].requires_grad_()
        self.check(inputs, dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
    def test_only_x_needs_grad(self, dtype):
        inputs = self.inputs(37, 10, top_k=2)
        for name in ("lora_a", "lora_b", "router"):
            inputs[name].requires_grad_(False)
        self.check(inputs, dtype)

    # the inherited tests not re-run here (covered by TestMoLoRALinearTriton)
    test_ranks = test_top_k = test_sentence_routing = test_gradcheck_float64 = None


class TestMultiTileFused(TestMultiTile):
    """The one-kernel forward on multi-tile grids (two column tiles a program), bf16 (the dtypes: above)."""

    schedule = "fused"

    @pytest.mark.parametrize("e,r,kw", MULTI_TILE_CASES, ids=MULTI_TILE_IDS)
    def test_matches_reference(self, e, r, kw):
        super().test_matches_reference(torch.bfloat16, e, r, kw)

    test_only_lora_b_and_bias_need_grad = test_only_x_needs_grad = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("e,r,top_k", [(10, 4, None), (1, 4, None), (3, 4, 2)])
def test_schedules_agree_bitwise_on_matching_tiles(dtype, e, r, top_k):
    """Both schedules compute U with the same BLOCK_K steps here, round U′ once to the activation dtype and add
    the base GEMM and the tail in the same order, so y, U and p_soft agree bit for bit (module docstring)."""
    x, weight, bias, lora_a, lora_b, router = _molora_inputs(e=e, r=r, dtype=dtype)
    configs = dict(
        fused=kernel._fused(16, 32, 16, 4, 2, 1),
        shrink=kernel._config(4, 2, BLOCK_M=16, BLOCK_K=16),
        expand=kernel._gemm(16, 32, 16, 4, 2),
    )
    out = {}
    with kernel.use_configs(**configs):
        for schedule in kernel.SCHEDULES:
            out[schedule] = kernel.molora_forward(
                x, weight, bias, lora_a, lora_b, router, None, 4.0, top_k, False, True, schedule
            )
    for a, b in zip(out["fused"], out["two_kernel"], strict=True):
        if a is not None:
            assert torch.equal(a, b)


def _molora_inputs(t=37, k=40, n=72, e=10, r=4, dtype=torch.bfloat16):
    x = torch.randn(t, k).to(dtype)
    weight = (torch.randn(n, k) * k**-0.5).to(dtype)
    bias = torch.randn(n).to(dtype)
    lora_a = torch.randn(e, k, r) * 0.3
    lora_b = torch.randn(e, r, n) * 0.3
    router = None if e == 1 else torch.randn(k, e) * 0.5
    return x, weight, bias, lora_a, lora_b, router


def _grads(x, weight, bias, lora_a, lora_b, router, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, bias, lora_a, lora_b, router)]
    xg, bg, ag, bbg, rg = leaves
    y = kernel.molora_linear(xg, weight, bg, ag, bbg, rg, None, 4.0, 2, True)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    return y.detach(), grads


def test_strided_inputs_give_the_contiguous_result():
    """Kernels take strides: non-contiguous x, a transposed weight view and permuted adapter views work."""
    x, weight, bias, lora_a, lora_b, router = _molora_inputs()
    dy = torch.randn(x.shape[0], weight.shape[0]).to(x.dtype)
    expected = _grads(x, weight, bias, lora_a, lora_b, router, dy)
    x_s = torch.stack([x, x], dim=-1)[..., 0]  # stride (2K, 2)
    weight_s = weight.t().contiguous().t()  # stride (1, N)
    lora_a_s = lora_a.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    lora_b_s = lora_b.transpose(1, 2).contiguous().transpose(1, 2)
    router_s = router.t().contiguous().t()
    dy_s = torch.stack([dy, dy], dim=0)[1]
    assert not any(t.is_contiguous() for t in (x_s, weight_s, lora_a_s, lora_b_s, router_s))
    got = _grads(x_s, weight_s, bias, lora_a_s, lora_b_s, router_s, dy_s)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    for g, e in zip(got[1], expected[1], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_router_gradient_survives_tiny_d_logits_in_float16():
    """d router = xᵀ·d logits with d logits far below float16's smallest normal (6e-5; dy ~ 1e-7 makes them
    ~1e-6): the kernel scales them by powers of two before their float16 hi/lo split. Unscaled, their low
    parts vanish and the gradient is 2 % off; scaled, it keeps float16-grade relative accuracy (3e-4: the
    float16 casts of the adapters for the tensor-core dots bound it)."""
    x, weight, bias, lora_a, lora_b, router = _molora_inputs(t=64, k=40, e=4, dtype=torch.float16)
    router = router.clone().requires_grad_()
    dy = (torch.randn(64, 72) * 1e-7).half()
    y = kernel.molora_linear(x, weight, bias, lora_a, lora_b, router, None, 4.0, None, False)
    (got,) = torch.autograd.grad(y, router, dy)
    ref = reference_molora(x.double(), weight.double(), bias.double(), lora_a, lora_b, router.double(), dy.double())
    rel = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert ref.abs().max().item() < 1e-4 and rel < 2e-3, (ref.abs().max().item(), rel)


def reference_molora(x, weight, bias, lora_a, lora_b, router, dy):
    """d router of the reference op in float64."""
    from pemoe import reference

    r = router.clone().requires_grad_()
    y = reference.molora_linear(x, weight, lora_a.double(), lora_b.double(), r, scale=4.0, bias=bias)
    (g,) = torch.autograd.grad(y, r, dy)
    return g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_router_is_float32_accurate_with_16_bit_activations(dtype):
    """SPEC §5: logits = x32 · router in float32. The kernel multiplies the 16-bit x by a hi/lo split of the
    float32 router (router_hi + router_lo carry 16 mantissa bits in bfloat16, 22 in float16); a plain 16-bit
    router is ~100x further off. Logits here have std ~8 (router std 0.5, K = 256)."""
    x, weight, bias, lora_a, lora_b, router = _molora_inputs(t=123, k=256, e=10, dtype=dtype)
    _, _, p_soft = kernel.molora_forward(x, weight, bias, lora_a, lora_b, router, None, 4.0, None, False, True)
    truth = torch.softmax(x.double() @ router.double(), dim=-1)
    float32_err = (torch.softmax(x.float() @ router, dim=-1).double() - truth).abs().max().item()
    bound = {torch.bfloat16: 5e-5, torch.float16: 2e-6}[dtype]
    assert (p_soft.double() - truth).abs().max().item() < bound
    assert float32_err < bound
    rounded = torch.softmax(x.double() @ router.to(dtype).double(), dim=-1)
    assert (rounded - truth).abs().max().item() > 20 * bound  # a 16-bit router would fail


# ------------------------------------------------------------------------------------------
# Bad input specific to the kernels (pemoe.ops validates shapes before dispatching)
# ------------------------------------------------------------------------------------------


def test_unsupported_activation_dtype_is_refused():
    x, weight, bias, lora_a, lora_b, router = _molora_inputs()
    with pytest.raises(TypeError, match="float16, bfloat16 or float32, got torch.float64"):
        kernel.molora_linear(x.double(), weight.double(), None, lora_a, lora_b, router, None, 4.0, None, False)


@pytest.mark.parametrize("name", ["lora_a", "lora_b", "router"])
def test_kernel_launcher_takes_float32_adapters(name):
    """The launcher takes float32 adapter parameters; the public op casts other dtypes for it
    (tests/test_bad_input.py: the same result as float32 values, for every implementation)."""
    x, weight, bias, lora_a, lora_b, router = _molora_inputs()
    args = dict(lora_a=lora_a, lora_b=lora_b, router=router)
    args[name] = args[name].to(torch.bfloat16)
    with pytest.raises(TypeError, match=f"{name} must be float32"):
        kernel.molora_linear(x, weight, bias, args["lora_a"], args["lora_b"], args["router"], None, 4.0, None, False)
    assert ops.molora_linear(x, weight, **args, scale=4.0, implementation="triton").shape == (37, 72)


def test_weight_gradient_is_refused():
    x, weight, bias, lora_a, lora_b, router = _molora_inputs()
    with pytest.raises(NotImplementedError, match="weight.requires_grad"):
        kernel.molora_linear(x, weight.requires_grad_(), bias, lora_a, lora_b, router, None, 4.0, None, False)


def test_empty_batch_gives_an_empty_output_and_wrong_rank_is_refused():
    x, weight, bias, lora_a, lora_b, router = _molora_inputs()
    assert kernel.molora_linear(x[:0], weight, bias, lora_a, lora_b, router, None, 4.0, None, False).shape == (0, 72)
    with pytest.raises(ValueError, match=r"x must be 2-D \[T, K\]"):
        kernel.molora_linear(x[None], weight, bias, lora_a, lora_b, router, None, 4.0, None, False)


def test_too_many_adapter_columns_are_refused():
    x, weight, _, _, _, _ = _molora_inputs()
    lora_a, lora_b, router = torch.randn(64, 40, 16), torch.randn(64, 16, 72), torch.randn(40, 64)
    with pytest.raises(ValueError, match=r"lora_a \[E, K, r\] with E = 64, r = 16 needs 1024 padded"):
        kernel.molora_linear(x.float(), weight.float(), None, lora_a, lora_b, router, None, 1.0, None, False)


def test_unsupported_device_is_refused():
    x, weight, bias, lora_a, lora_b, router = _molora_inputs()
    with pytest.raises(ValueError, match="x is on meta"):
        kernel.molora_linear(x.to("meta"), weight, bias, lora_a, lora_b, router, None, 4.0, None, False)
    with pytest.raises(ValueError, match="lora_b is on meta"):
        kernel.molora_linear(x, weight, bias, lora_a, lora_b.to("meta"), router, None, 4.0, None, False)


# ------------------------------------------------------------------------------------------
# HBM-traffic model vs the interpreter's counted traffic
# ------------------------------------------------------------------------------------------


class _count_atomics:
    """Bytes added by interpreted atomic adds (masked lanes excluded); count_traffic does not see them."""

    def __enter__(self):
        from triton.runtime import interpreter as ti

        self._builder = ti.InterpreterBuilder
        self._rmw = rmw = self._builder.create_atomic_rmw
        self.bytes = 0

        def counted(b, op, ptr, val, mask, sem, scope):
            self.bytes += int(mask.data.sum()) * ti._get_np_dtype(ptr.get_element_ty()).itemsize
            return rmw(b, op, ptr, val, mask, sem, scope)

        self._builder.create_atomic_rmw = counted
        return self

    def __exit__(self, *exc):
        self._builder.create_atomic_rmw = self._rmw


TRAFFIC_CASES = [
    # (dtype, E, r, routing mode, needs (dx, d bias, d lora_a, d lora_b, d router, d probs))
    (torch.bfloat16, 10, 4, 1, (True,) * 5 + (False,)),
    (torch.float32, 1, 4, 0, (True, False, True, True, False, False)),
    (torch.float16, 3, 16, 2, (False, True, False, True, False, True)),
]


@pytest.mark.parametrize("dtype,e,r,mode,needs", TRAFFIC_CASES, ids=["token-bf16", "lora-fp32", "probs-fp16"])
@pytest.mark.parametrize("schedule", kernel.SCHEDULES if interpreter.INTERPRET else [])
@pytest.mark.parametrize("tiles", ["small", "default"])
def test_traffic_model_matches_the_interpreter(dtype, e, r, mode, needs, schedule, tiles, monkeypatch):
    """Every load and store the interpreter counts, per pass, equals the model's; the backward issues no atomics."""
    t, k, n = 37, 40, 72
    x, weight, bias, lora_a, lora_b, router = _molora_inputs(t, k, n, e, r, dtype)
    probs = torch.softmax(torch.randn(t, e), -1) if mode == kernel.GIVEN_PROBS else None
    router = router if mode == kernel.TOKEN_ROUTER else None
    configs = _small_configs() if tiles == "small" else {}
    if tiles == "small":
        monkeypatch.setattr(kernel, "REDUCE_ROWS", 32)  # two token chunks
    model = analysis.hbm_traffic(
        t, k, n, e, r, dtype, routing_mode=mode, needs=needs, schedule=schedule, configs=configs
    )
    with kernel.use_configs(**configs):
        with interpreter.count_traffic() as forward:
            _, u, p_soft = kernel.molora_forward(
                x, weight, bias, lora_a, lora_b, router, probs, 4.0, None, False, True, schedule
            )
        dy = torch.randn(t, n).to(dtype)
        with interpreter.count_traffic() as backward, _count_atomics() as atomics:
            kernel.molora_backward(dy, x, weight, lora_a, lora_b, router, probs, u, p_soft, 4.0, None, False, needs)
    assert (forward.loaded, forward.stored) == (model.forward.loaded, model.forward.stored)
    interpreted = analysis._total("interpreted", model.backward_kernels)
    assert (backward.loaded, backward.stored) == (interpreted.loaded, interpreted.stored)
    assert atomics.bytes == 0  # deterministic: partial sums, no atomics


@pytest.mark.parametrize("schedule", ["fused", "two_kernel"])
def test_forward_without_grad_stores_only_what_the_schedule_needs(schedule):
    x, weight, bias, lora_a, lora_b, router = _molora_inputs()
    lora_a.requires_grad_()
    y_grad = kernel.molora_linear(x, weight, bias, lora_a, lora_b, router, None, 4.0, None, False, schedule)
    with torch.no_grad(), interpreter.count_traffic() as traffic:
        y = kernel.molora_linear(x, weight, bias, lora_a, lora_b, router, None, 4.0, None, False, schedule)
    u_scaled = 0 if schedule == "fused" else x.shape[0] * 10 * 4 * x.element_size()  # U′ [T, E·r]
    packed = (x.shape[1] + weight.shape[0]) * 16 * 4 * x.element_size()  # A_cat [K, 64], B_cat [64, N]
    assert traffic.stored == y.numel() * y.element_size() + u_scaled + packed
    torch.testing.assert_close(y, y_grad.detach(), rtol=0, atol=0)
    model = analysis.hbm_traffic(*x.shape, weight.shape[0], 10, 4, x.dtype, save_for_backward=False, schedule=schedule)
    assert traffic.loaded == model.forward.loaded


def test_adapter_gradients_do_not_depend_on_the_chunking_beyond_rounding(monkeypatch):
    """The weight gradients are Σ over chunks of per-chunk partial sums: one chunk or five give the same
    gradients up to float32 summation order (a chunk-indexing error would not)."""
    x, weight, bias, lora_a, lora_b, router = _molora_inputs(t=77, dtype=torch.float32)
    dy = torch.randn(x.shape[0], weight.shape[0])
    _, one = _grads(x, weight, bias, lora_a, lora_b, router, dy)
    monkeypatch.setattr(kernel, "REDUCE_ROWS", 16)
    with kernel.use_configs(wgrad_a=kernel._config(4, 2, BLOCK_C=16, BLOCK_T=16)):
        _, five = _grads(x, weight, bias, lora_a, lora_b, router, dy)
    for a, b in zip(one, five, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _reversed_program_order:
    """Runs every interpreted grid in reverse program order (the last program first)."""

    def __enter__(self):
        from triton.runtime import interpreter as ti

        self._builder = ti.InterpreterBuilder
        self._set = original = self._builder.set_grid_idx

        def reversed_idx(b, x, y, z):
            nx, ny, nz = b.grid_dim
            return original(b, nx - 1 - x, ny - 1 - y, nz - 1 - z)

        self._builder.set_grid_idx = reversed_idx
        return self

    def __exit__(self, *exc):
        self._builder.set_grid_idx = self._set


def _atomic_column_sum(x: torch.Tensor) -> torch.Tensor:
    """Control for the determinism test: column sums of x [R, 16] by float32 atomics, one program per row."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel_(x_ptr, out_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.atomic_add(out_ptr + offs, tl.load(x_ptr + tl.program_id(0) * BLOCK + offs))

    out = torch.zeros(x.shape[1])
    kernel_[(x.shape[0],)](x, out, BLOCK=x.shape[1])
    return out


@pytest.mark.parametrize("schedule", ["fused", "two_kernel"])
def test_results_do_not_depend_on_program_order(schedule, monkeypatch):
    """Deterministic kernels: running every grid's programs in reverse order gives bit-identical y and
    gradients (every cross-program sum is a partial per token chunk, added by torch). The control shows
    the check bites: float32 atomics (the earlier backward's reduction) give a different sum reversed."""
    rows = torch.tensor([1.0, 1e8, -1e8])[:, None].expand(3, 16).contiguous()
    forward_order = _atomic_column_sum(rows)
    with _reversed_program_order():
        assert not torch.equal(_atomic_column_sum(rows), forward_order)

    monkeypatch.setattr(kernel, "REDUCE_ROWS", 16)  # 5 token chunks of partial sums
    x, weight, bias, lora_a, lora_b, router = _molora_inputs(t=77, dtype=torch.bfloat16)
    dy = torch.randn(x.shape[0], weight.shape[0]).to(x.dtype)
    with kernel.use_configs(**_small_configs()), kernel.use_schedule(schedule):
        expected = _grads(x, weight, bias, lora_a, lora_b, router, dy)
        with _reversed_program_order():
            got = _grads(x, weight, bias, lora_a, lora_b, router, dy)
    assert torch.equal(got[0], expected[0])
    for g, e in zip(got[1], expected[1], strict=True):
        assert torch.equal(g, e)


def test_unknown_schedule_or_role_is_refused():
    x, weight, bias, lora_a, lora_b, router = _molora_inputs()
    with pytest.raises(ValueError, match="schedule must be 'auto' or one of"):
        kernel.molora_linear(x, weight, bias, lora_a, lora_b, router, None, 4.0, None, False, "three_kernel")
    with pytest.raises(ValueError, match="unknown launch roles"):
        kernel.use_configs(backward=None)


# ------------------------------------------------------------------------------------------
# The schedule model (FLOPs, bytes, modelled time) at T5 shapes
# ------------------------------------------------------------------------------------------


def _mib(b: int) -> str:
    return f"{b / 2**20:8.2f}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_schedule_model_at_t5_shapes(dtype):
    """The forward schedule by FLOPs + bytes. At T5-large (K = N = 1024, T = 2048, E = 10, r = 4) the
    one-kernel schedule moves <= 1.1x the minimum bytes (SPEC §6: inputs once, output once; here also U and
    p_soft saved for backward and the packed A_cat / B_cat written and read once) but does 1.8x a plain
    linear's FLOPs (the shrink recomputed per column tile); two kernels do <= 1.2x the FLOPs and read x twice
    (~1.5x the bytes). The GEMM is compute-bound there, so the model picks two kernels; with few tokens
    (decode) it keeps one kernel."""
    print("\n" + analysis.report(dtype))
    large = {s: analysis.hbm_traffic(2048, 1024, 1024, 10, 4, dtype, schedule=s) for s in kernel.SCHEDULES}
    assert large["fused"].forward.unique <= 1.1 * large["fused"].minimum_forward
    no_save = analysis.hbm_traffic(2048, 1024, 1024, 10, 4, dtype, schedule="fused", save_for_backward=False)
    assert no_save.forward.unique <= 1.05 * no_save.minimum_forward  # the packed copies only
    assert large["fused"].forward_flops_ratio > 1.7
    assert large["two_kernel"].forward_flops_ratio < 1.2
    assert 1.4 < large["two_kernel"].forward_ratio < 1.6  # x read by both kernels
    costs = analysis.schedule_costs(2048, 1024, 1024, 10, 4, dtype)
    assert costs["two_kernel"] < costs["fused"]
    assert analysis.choose_schedule(2048, 1024, 1024, 10, 4, dtype) == "two_kernel"
    assert analysis.choose_schedule(2048, 2048, 5120, 10, 4, dtype) == "two_kernel"  # T5-XL wi
    assert analysis.choose_schedule(2048, 1024, 1024, 15, 16, dtype) == "two_kernel"  # fused: 10x the FLOPs
    assert analysis.choose_schedule(16, 1024, 1024, 10, 4, dtype) == "fused"  # decode: one launch, W-bound
    assert analysis.choose_schedule(2048, 1024, 1024, 1, 4, dtype) == "fused"  # LoRA: 16 padded columns
    for m in large.values():
        assert m.minimum_forward <= m.forward.unique < m.authors_forward / 5
    # the backward computes G = dy·B_catᵀ once (the earlier single kernel recomputed it per dx tile: 2.25x a
    # plain dgrad's FLOPs at E = 10, r = 4 and 9.8x at E = 15, r = 16), as two dots with 16-bit dy and a router
    # (B_cat and its low part): 1.39x and 2.42x
    assert large["two_kernel"].backward_flops_ratio < 1.4
    assert analysis.hbm_traffic(2048, 1024, 1024, 15, 16, dtype).backward_flops_ratio < 2.5


# ------------------------------------------------------------------------------------------
# Ahead-of-time compiles for sm_80 / sm_90
# ------------------------------------------------------------------------------------------


def _aot(monkeypatch, defaults_only: bool, select: str = ""):
    from pemoe.kernels.triton.aot import compile_module_in_subprocess, format_reports

    monkeypatch.setenv("PEMOE_AOT_DEFAULTS_ONLY", "1" if defaults_only else "0")
    monkeypatch.setenv("PEMOE_AOT_SELECT", select)
    reports = compile_module_in_subprocess("pemoe.kernels.triton.molora_linear_analysis")
    print("\n" + format_reports(reports))
    assert reports
    assert not [r for r in reports if r.error], [r.error for r in reports if r.error]
    for r in reports:  # every config must launch on A100 (163 KiB of shared memory) and H100 (227 KiB)
        assert r.shared_bytes <= {80: 163, 90: 227}[r.capability] * 1024, f"{r.name} sm_{r.capability} shared memory"
        if r.default:  # float32 too (FMA dots: small tiles, calibrated on these reports)
            assert r.spill_bytes == 0, f"{r.name} sm_{r.capability} spills {r.spill_bytes} bytes"
        # the GEMM-shaped launches use wgmma on sm_90 (the row passes' 16-32-row tiles use mma.sync)
        if r.default and r.capability == 90 and not r.name.startswith("float32") and WGMMA_ROLES.search(r.name):
            assert r.uses_wgmma, f"{r.name} does not use wgmma on sm_90"
    return reports


WGMMA_ROLES = __import__("re").compile(r" (fused|expand|dx|wgrad_a|wgrad_b) ")


def test_aot_default_configs_bf16_t5_large(monkeypatch):
    """Default tiles of every launch at T5-large, E = 10, r = 4 (bf16) and of the widest adapters' backward
    launches that spilled before calibration (E = 15, r = 16: dx, wgrad_a; the earlier single backward kernel
    spilled there too), and float32 grad_u at E = 15, r = 16 (spilled on sm_90 while U stayed live across its N
    loop): no spills, wgmma on sm_90 for the GEMM-shaped launches. All dtypes and shapes: -m slow, or
    ``python -m pemoe.kernels.triton.aot pemoe.kernels.triton.molora_linear_analysis``."""
    select = "^(bfloat16 (E=10 r=4|E=15 r=16 (dx|wgrad_a))|float32 E=15 r=16 grad_u)"
    reports = _aot(monkeypatch, defaults_only=True, select=select)
    roles = {r.name.split()[3] for r in reports}
    assert roles == {"pack", "fused", "shrink", "expand", "grad_u", "dx", "wgrad_a", "wgrad_b"}
    assert {r.capability for r in reports} == {80, 90}


@pytest.mark.slow
def test_aot_every_default_config(monkeypatch):
    """Defaults of every launch role, fp16 / bf16 / fp32, E·r from 4 to 240: no spills, wgmma on sm_90."""
    _aot(monkeypatch, defaults_only=True)


@pytest.mark.slow
def test_aot_every_config(monkeypatch):
    _aot(monkeypatch, defaults_only=False)


class TestMoLoRAAdapterTriton(MoLoRAAdapterCases):
    """The adapter-only op: the shrink kernel, then the expand GEMM with no base reduction (K = 0) adding base."""

    implementation = "triton"

    def test_equals_molora_linear_on_the_linears_output(self):
        """base = x Wᵀ + b (float32) gives the fused molora_linear's output and gradients, to float32 rounding."""
        inputs = self.inputs(23, 4)
        inputs.pop("base")
        weight, bias = torch.randn(72, 40) * 40**-0.5, torch.randn(72)
        params = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}

        def adapter(**kw):
            base = torch.nn.functional.linear(kw["x"], weight, bias)
            return ops.molora_adapter(**kw, base=base, implementation="triton")

        def linear(**kw):
            return ops.molora_linear(**kw, weight=weight, bias=bias, implementation="triton")

        out, grads = run_with_grads(adapter, inputs)
        want, want_grads = run_with_grads(linear, inputs)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert set(grads) == set(want_grads) == set(params)
        for name in params:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-4, msg=name)

    @pytest.mark.parametrize("case", ["soft", "sentence", "lora"])
    def test_gradcheck_float64(self, case):
        """float64 is refused (the kernels run 16-bit and float32 activations), never computed otherwise."""
        inputs = self.inputs(5, 1 if case == "lora" else 4, 2, sentence=case == "sentence")
        for name in ("x", "base"):
            inputs[name] = inputs[name].double()
        with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
            ops.molora_adapter(**inputs, implementation="triton")


@pytest.mark.usefixtures("small_chunks")
class TestMoLoRAAdapterMultiTile(MoLoRAAdapterCases):
    implementation = "triton"

    def check(self, inputs, dtype):
        with kernel.use_configs(**_small_configs()):
            super().check(inputs, dtype)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("e,r,kw", MULTI_TILE_CASES, ids=MULTI_TILE_IDS)
    def test_matches_reference(self, dtype, e, r, kw):
        self.check(self.inputs(37, e, r, **kw), dtype)

    # the inherited tests not re-run here (covered by TestMoLoRAAdapterTriton)
    test_without_base = test_top_k = test_sentence_routing = test_gradcheck_float64 = None
    test_equals_molora_linear_on_the_linears_output = None
