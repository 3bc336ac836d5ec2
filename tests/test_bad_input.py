"""Bad input gets a clear ValueError/TypeError naming the argument (every implementation), and
the documented edge cases (empty batch, non-finite values, strided inputs) behave."""

from __future__ import annotations

import pytest
import torch

from pemoe import ops
from pemoe.ops import resolve_implementation

IMPLEMENTATIONS = ["reference", "torch", "auto"]
T, K, G, D, E, R = 6, 16, 2, 8, 3, 2
N = G * D


def mov_linear_args(**over):
    args = dict(x=torch.randn(T, K), weight=torch.randn(N, K), router=torch.randn(D, E), experts=torch.ones(G, E, D))
    args.update(over)
    return args


def molora_args(**over):
    args = dict(
        x=torch.randn(T, K),
        weight=torch.randn(N, K),
        lora_a=torch.randn(E, K, R),
        lora_b=torch.randn(E, R, N),
        router=torch.randn(K, E),
        scale=8.0,
    )
    args.update(over)
    return args


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "over,exc,match",
    [
        ({"experts": torch.ones(G, E, D + 1)}, ValueError, r"experts has shape \[2, 3, 9\].*width must be G\*D = 18"),
        ({"router": torch.randn(D, E + 1)}, ValueError, r"router must have shape \[8, 3\]"),
        ({"experts": torch.ones(G, 0, D), "router": torch.randn(D, 0)}, ValueError, r"E = 0"),
        ({"x": torch.randint(0, 3, (T, K))}, TypeError, r"x must be a floating tensor"),
        ({"x": torch.randn(T, K, dtype=torch.bfloat16)}, TypeError, r"x and weight must share one dtype"),
        ({"weight": torch.randn(N, K + 1)}, ValueError, r"weight must have shape \[N, K\] with K = x.shape\[-1\] = 16"),
        ({"bias": torch.randn(N + 1)}, ValueError, r"bias must have shape \[16\]"),
        ({"top_k": E + 1}, ValueError, r"top_k must be in \[1, num_experts=3\]"),
        ({"top_k": 0}, ValueError, r"top_k must be in"),
        ({"router": None}, ValueError, r"router is required when num_experts > 1"),
        ({"router_input": torch.randn(3, 5), "router": torch.randn(5, E)}, ValueError, r"router_input has shape"),
        ({"experts": torch.ones(G, E, D).to(torch.int32)}, TypeError, r"experts must be a floating tensor"),
        ({"x": [[1.0]]}, TypeError, r"x must be a torch.Tensor"),
    ],
)
def test_mov_linear_rejects(impl, over, exc, match):
    with pytest.raises(exc, match=match):
        ops.mov_linear(**mov_linear_args(**over), implementation=impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "over,exc,match",
    [
        ({"lora_a": torch.randn(E, K, 0), "lora_b": torch.randn(E, 0, N)}, ValueError, r"rank must be >= 1"),
        (
            {"lora_a": torch.randn(0, K, R), "lora_b": torch.randn(0, R, N), "router": torch.randn(K, 0)},
            ValueError,
            r"at least one expert",
        ),
        ({"lora_b": torch.randn(E + 1, R, N)}, ValueError, r"lora_b must have shape \[E, r, N\] = \[3, 2, 16\]"),
        ({"lora_b": torch.randn(E, R + 1, N)}, ValueError, r"lora_b must have shape"),
        ({"lora_b": torch.randn(E, R, N + 1)}, ValueError, r"lora_b must have shape"),
        ({"lora_a": torch.randn(E, K + 1, R)}, ValueError, r"lora_a must have shape \[E, K, r\] = \[3, 16, 2\]"),
        ({"router": torch.randn(K, E + 1)}, ValueError, r"router must have shape \[16, 3\]"),
        ({"router": torch.randn(K + 1, E)}, ValueError, r"router must have shape \[16, 3\]"),
        ({"x": torch.randn(T, K, dtype=torch.float16)}, TypeError, r"x and weight must share one dtype"),
        ({"x": torch.randint(0, 3, (T, K)), "weight": torch.randint(0, 3, (N, K))}, TypeError, r"floating"),
        ({"scale": torch.tensor(2.0)}, TypeError, r"scale must be a Python float"),
        ({"top_k": 4}, ValueError, r"top_k must be in \[1, num_experts=3\]"),
    ],
)
def test_molora_linear_rejects(impl, over, exc, match):
    with pytest.raises(exc, match=match):
        ops.molora_linear(**molora_args(**over), implementation=impl)


def test_mov_ffn_rejects():
    x, wi_0, wo = torch.randn(T, K), torch.randn(20, K), torch.randn(K, 20)
    with pytest.raises(ValueError, match=r"wo must have shape \[M, F\] = \[16, 20\]"):
        ops.mov_ffn(x, wi_0, wo.T, torch.randn(20, E), torch.ones(1, E, 20))
    with pytest.raises(ValueError, match=r"activation must be one of"):
        ops.mov_ffn(x, wi_0, wo, torch.randn(20, E), torch.ones(1, E, 20), activation="swish")
    with pytest.raises(ValueError, match=r"wi_1 must have wi_0's shape"):
        ops.mov_ffn(x, wi_0, wo, torch.randn(20, E), torch.ones(1, E, 20), wi_1=torch.randn(21, K))
    with pytest.raises(ValueError, match=r"wi_0 output width must be G\*D = 21"):
        ops.mov_ffn(x, wi_0, wo, torch.randn(21, E), torch.ones(1, E, 21))


def test_mov_rejects_width_mismatch():
    with pytest.raises(ValueError, match=r"h width must be G\*D = 16, got 15"):
        ops.mov(torch.randn(T, 15), torch.randn(D, E), torch.ones(G, E, D))


def test_unknown_and_missing_implementations():
    with pytest.raises(ValueError, match=r"unknown implementation 'cuda'.*'reference', 'torch'"):
        ops.mov_linear(**mov_linear_args(), implementation="cuda")
    with pytest.raises(NotImplementedError, match=r"mov: implementation='triton' does not exist"):
        ops.mov(torch.randn(T, G * D), torch.randn(D, E), torch.ones(G, E, D), implementation="triton")


def test_triton_refuses_devices_it_cannot_run_on(monkeypatch):
    """Asking for the Triton kernels where they cannot run raises; it never falls back."""
    from pemoe.kernels.triton import interpreter

    monkeypatch.setattr(interpreter, "INTERPRET", False)
    with pytest.raises(NotImplementedError, match=r"implementation='triton' cannot run here.*CUDA tensors.*got cpu"):
        ops.molora_linear(**molora_args(), implementation="triton")
    monkeypatch.setattr(interpreter, "INTERPRET", True)
    with pytest.raises(NotImplementedError, match=r"CPU tensors only, got meta"):
        resolve_implementation("mov_linear", "triton", torch.device("meta"))
    # "auto" never picks Triton on the CPU, interpreter or not: it is a correctness tool, not a fast path.
    assert resolve_implementation("mov_linear", "auto", torch.device("cpu")) == "torch"


def test_devices_must_match():
    meta = torch.randn(D, E, device="meta")
    with pytest.raises(ValueError, match=r"one device.*router on meta"):
        ops.mov_linear(**mov_linear_args(router=meta))
    with pytest.raises(ValueError, match=r"one device.*lora_b on meta"):
        ops.molora_linear(**molora_args(lora_b=torch.randn(E, R, N, device="meta")))


def test_auto_choice_is_reported(caplog):
    from pemoe.ops import _dispatch

    _dispatch._announced.clear()
    with caplog.at_level("INFO", logger="pemoe"):
        ops.mov_linear(**mov_linear_args())
    assert "implementation='auto' chose 'torch' on cpu" in caplog.text
    assert ops.resolve_implementation("mov_linear", "auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_empty_batch(impl):
    x = torch.randn(0, K, requires_grad=True)
    a = mov_linear_args(x=x, router=torch.randn(D, E, requires_grad=True), experts=torch.ones(G, E, D).requires_grad_())
    y = ops.mov_linear(**a, implementation=impl)
    assert y.shape == (0, N)
    y.sum().backward()
    assert x.grad.shape == (0, K) and torch.equal(a["router"].grad, torch.zeros(D, E))
    assert torch.equal(a["experts"].grad, torch.zeros(G, E, D))
    x2 = torch.randn(2, 0, K, requires_grad=True)
    a = molora_args(x=x2, router=torch.randn(K, E, requires_grad=True))
    y2 = ops.molora_linear(**a, implementation=impl)
    assert y2.shape == (2, 0, N)
    y2.sum().backward()
    assert x2.grad.shape == (2, 0, K) and torch.equal(a["router"].grad, torch.zeros(K, E))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_non_finite_router_input_does_not_crash(impl):
    x = torch.randn(T, K)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    y = ops.mov_linear(**mov_linear_args(x=x), implementation=impl)
    assert y.shape == (T, N)
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3:]).all()  # other tokens untouched
    y2 = ops.molora_linear(**molora_args(x=x), implementation=impl)
    assert y2.shape == (T, N) and torch.isfinite(y2[3:]).all()


def test_strided_inputs():
    x = torch.randn(K, T).t()  # non-contiguous
    args = mov_linear_args(x=x, weight=torch.randn(K, N).t())
    torch.testing.assert_close(
        ops.mov_linear(**args, implementation="torch"), ops.mov_linear(**args, implementation="reference")
    )
    args = molora_args(x=x[::1, :], lora_a=torch.randn(E, R, K).transpose(1, 2))
    torch.testing.assert_close(
        ops.molora_linear(**args, implementation="torch"), ops.molora_linear(**args, implementation="reference")
    )


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    """On CUDA "auto" takes the Triton kernels where the op has them (no GPU here: only the choice is tested)."""
    from pemoe.kernels.triton import interpreter

    monkeypatch.setattr(interpreter, "INTERPRET", False)
    cuda = torch.device("cuda")
    for op in ("mov_linear", "mov_ffn", "molora_linear"):
        assert resolve_implementation(op, "auto", cuda) == "triton"
    assert resolve_implementation("mov", "auto", cuda) == "torch"  # no Triton kernel for the bare site
