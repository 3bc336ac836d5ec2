"""Benchmark of ``pemoe.ops.mov_linear``: MoV on a frozen linear's output (T5 attention k / v).

Providers: ``linear`` (floor: the frozen ``F.linear(x, W, b)``, only x requires grad), ``pemoe-torch``,
``pemoe-triton`` (skipped where pemoe has no Triton implementation), ``reference`` and
``authors-einsum`` (the MoV paper's formulation, written inline below). Run ``python -m bench.mov_linear``
(the same options as ``pemoe bench``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import OpBench, op_main, standard_providers
from pemoe import ops

OP = "mov_linear"
TRAINABLE = ("x", "router", "experts")
#: (K = N, G): T5 large (the issue's shape), then T5 base and XL for --full; heads of D = 64.
WIDTHS = {"large": (1024, 16), "base": (768, 12), "xl": (2048, 32)}
NUM_EXPERTS = 10


def shapes(full: bool) -> list[dict[str, int]]:
    """The issue's shape (T=2048, K=N=1024, G=16, E=10); --full adds base/XL widths and T in {16, 512}."""
    tokens = (16, 512, 2048) if full else (2048,)
    widths = ("large", "base", "xl") if full else ("large",)
    return [
        {"T": t, "K": WIDTHS[w][0], "N": WIDTHS[w][0], "G": WIDTHS[w][1], "E": NUM_EXPERTS}
        for w in widths
        for t in tokens
    ]


def make_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """x [T, K], weight [N, K], bias [N] in ``dtype``; router [D, E], experts [G, E, D] float32."""
    g = torch.Generator().manual_seed(0)
    T, K, N, G, E = shape["T"], shape["K"], shape["N"], shape["G"], shape["E"]
    D = N // G
    t = {
        "x": torch.randn(T, K, generator=g).to(dtype),
        "weight": (torch.randn(N, K, generator=g) / K**0.5).to(dtype),
        "bias": (torch.randn(N, generator=g) * 0.02).to(dtype),
        "router": torch.randn(D, E, generator=g) * 0.02,
        "experts": 1 + 0.1 * torch.randn(G, E, D, generator=g),
    }
    return {k: v.to(device) for k, v in t.items()}


def _floor(i: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.linear(i["x"], i["weight"], i["bias"])


def _pemoe(implementation: str):
    def fwd(i: dict[str, torch.Tensor]) -> torch.Tensor:
        return ops.mov_linear(
            i["x"], i["weight"], i["router"], i["experts"], bias=i["bias"], implementation=implementation
        )

    return fwd


def authors_mov(h: torch.Tensor, router: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The MoV authors' formulation on h [T, G*D]: router in float32, the merged vector cast back."""
    G, _, D = experts.shape
    hg = h.reshape(h.shape[0], G, D)
    p = torch.softmax(torch.einsum("tgd,de->tge", hg.float(), router), dim=-1)
    y = hg * torch.einsum("tge,ged->tgd", p, experts).to(h.dtype)
    return y.reshape(h.shape)


def _authors(i: dict[str, torch.Tensor]) -> torch.Tensor:
    return authors_mov(F.linear(i["x"], i["weight"], i["bias"]), i["router"], i["experts"])


PROVIDERS = standard_providers(_floor, _pemoe, _authors, TRAINABLE)
BENCH = OpBench(OP, shapes, make_inputs, PROVIDERS, scale_keys=("K", "N"))


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.mov_linear [pemoe bench options]``: this op only."""
    return op_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
