"""Benchmark of ``pemoe.ops.mov_ffn``: the T5 v1.1 gated-GELU FFN with MoV on the activation.

Providers: ``linear`` (floor: the plain frozen T5 FFN ``F.linear(act(F.linear(x, wi_0)) * F.linear(x, wi_1),
wo)``, only x requires grad), ``pemoe-torch``, ``pemoe-triton`` (skipped where pemoe has no Triton
implementation), ``reference`` and ``authors-einsum`` (the MoV paper's formulation, inline). Run
``python -m bench.mov_ffn`` (the same options as ``pemoe bench``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import OpBench, op_main, standard_providers
from bench.mov_linear import authors_mov
from pemoe import ops

OP = "mov_ffn"
TRAINABLE = ("x", "router", "experts")
#: (M = d_model, F = d_ff) of T5 v1.1 large (the issue's shape), base and XL.
WIDTHS = {"large": (1024, 2816), "base": (768, 2048), "xl": (2048, 5120)}
NUM_EXPERTS = 10


def _act(t: torch.Tensor) -> torch.Tensor:
    return F.gelu(t, approximate="tanh")  # gelu_new


def shapes(full: bool) -> list[dict[str, int]]:
    """The issue's shape (T=2048, M=1024, F=2816, E=10, gated); --full adds base/XL and T in {16, 512}."""
    tokens = (16, 512, 2048) if full else (2048,)
    widths = ("large", "base", "xl") if full else ("large",)
    return [{"T": t, "M": WIDTHS[w][0], "F": WIDTHS[w][1], "E": NUM_EXPERTS} for w in widths for t in tokens]


def make_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """x [T, M], wi_0 / wi_1 [F, M], wo [M, F] in ``dtype``; router [F, E], experts [1, E, F] float32."""
    g = torch.Generator().manual_seed(0)
    T, M, Fd, E = shape["T"], shape["M"], shape["F"], shape["E"]
    t = {
        "x": torch.randn(T, M, generator=g).to(dtype),
        "wi_0": (torch.randn(Fd, M, generator=g) / M**0.5).to(dtype),
        "wi_1": (torch.randn(Fd, M, generator=g) / M**0.5).to(dtype),
        "wo": (torch.randn(M, Fd, generator=g) / Fd**0.5).to(dtype),
        "router": torch.randn(Fd, E, generator=g) * 0.02,
        "experts": 1 + 0.1 * torch.randn(1, E, Fd, generator=g),
    }
    return {k: v.to(device) for k, v in t.items()}


def _floor(i: dict[str, torch.Tensor]) -> torch.Tensor:
    x = i["x"]
    return F.linear(_act(F.linear(x, i["wi_0"])) * F.linear(x, i["wi_1"]), i["wo"])


def _pemoe(implementation: str):
    def fwd(i: dict[str, torch.Tensor]) -> torch.Tensor:
        return ops.mov_ffn(
            i["x"],
            i["wi_0"],
            i["wo"],
            i["router"],
            i["experts"],
            wi_1=i["wi_1"],
            activation="gelu_new",
            implementation=implementation,
        )

    return fwd


def _authors(i: dict[str, torch.Tensor]) -> torch.Tensor:
    x = i["x"]
    a = authors_mov(_act(F.linear(x, i["wi_0"])), i["router"], i["experts"])
    return F.linear(a * F.linear(x, i["wi_1"]), i["wo"])


PROVIDERS = standard_providers(_floor, _pemoe, _authors, TRAINABLE)
BENCH = OpBench(OP, shapes, make_inputs, PROVIDERS, scale_keys=("M", "F"))


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.mov_ffn [pemoe bench options]``: this op only."""
    return op_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
