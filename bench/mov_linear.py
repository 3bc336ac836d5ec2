"""Benchmark of ``pemoe.ops.mov_linear``: MoV on a frozen linear's output (T5 attention k / v).

Providers: ``linear`` (floor: the frozen ``F.linear(x, W, b)``, only x requires grad), ``pemoe-torch``,
``pemoe-triton`` (skipped where pemoe has no Triton implementation), ``reference``,
``authors-einsum`` (the MoV paper's formulation, written inline below) and, on E = 1 shapes (``--full``),
``peft-ia3`` (PEFT's IA3 on the same frozen linear). Run ``python -m pemoe.bench.mov_linear`` (the same options
as ``pemoe bench``).

Cost formula (:func:`cost`; s = bytes per activation element, D = N / G):
  fwd     FLOPs 2TKN + 4TNE + TN;  bytes s(TK + NK + N + TN) + 4(DE + GED)
  bwd     FLOPs 2TNK + 8TNE + 3TN; bytes s(3TN + NK + TK) + 4(TGE + 2(DE + GED))   (dy, saved h, y-grad
          terms; p saved in float32; the adapter parameters read and their gradients written)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pemoe import ops
from pemoe.bench.harness import OpBench, Provider, op_main, peft_module_forward, standard_providers

OP = "mov_linear"
TRAINABLE = ("x", "router", "experts")
#: (K = N, G): T5 large (the issue's shape), then T5 base and XL for --full; heads of D = 64.
WIDTHS = {"large": (1024, 16), "base": (768, 12), "xl": (2048, 32)}
NUM_EXPERTS = 10


def shapes(full: bool) -> list[dict[str, int]]:
    """The issue's shape (T=2048, K=N=1024, G=16, E=10); --full adds base/XL widths, T in {16, 512} and
    the (IA)3 case E = 1 at the large width (where PEFT's IA3 runs too)."""
    tokens = (16, 512, 2048) if full else (2048,)
    widths = ("large", "base", "xl") if full else ("large",)
    out = [
        {"T": t, "K": WIDTHS[w][0], "N": WIDTHS[w][0], "G": WIDTHS[w][1], "E": NUM_EXPERTS}
        for w in widths
        for t in tokens
    ]
    if full:
        out += [{"T": t, "K": 1024, "N": 1024, "G": 16, "E": 1} for t in (512, 2048)]
    return out


def cost(shape: dict[str, int], dtype: torch.dtype, mode: str) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of one call; the formula is in the module docstring."""
    T, K, N, G, E = shape["T"], shape["K"], shape["N"], shape["G"], shape["E"]
    s, D = torch.finfo(dtype).bits // 8, N // G
    adapters = 4 * (D * E + G * E * D)
    fwd = (2 * T * K * N + 4 * T * N * E + T * N, s * (T * K + N * K + N + T * N) + adapters)
    bwd = (2 * T * N * K + 8 * T * N * E + 3 * T * N, s * (3 * T * N + N * K + T * K) + 4 * T * G * E + 2 * adapters)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": (fwd[0] + bwd[0], fwd[1] + bwd[1])}[mode]


def make_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """x [T, K], weight [N, K], bias [N] in ``dtype``; router [D, E], experts [G, E, D] float32."""
    g = torch.Generator().manual_seed(0)
    T, K, N, G, E = shape["T"], shape["K"], shape["N"], shape["G"], shape["E"]
    D = N // G
    t = {
        "x": torch.randn(T, K, generator=g).to(dtype),
        "weight": (torch.randn(N, K, generator=g) / K**0.5).to(dtype),
        "bias": (torch.randn(N, generator=g) * 0.02).to(dtype),
        # E = 1 is (IA)3: no router (the tensor is made, unused, to keep one input layout)
        "router": torch.randn(D, E, generator=g) * 0.02,
        "experts": 1 + 0.1 * torch.randn(G, E, D, generator=g),
    }
    return {k: v.to(device) for k, v in t.items()}


def _floor(i: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.linear(i["x"], i["weight"], i["bias"])


def _router(i: dict[str, torch.Tensor]) -> torch.Tensor | None:
    return None if i["experts"].shape[1] == 1 else i["router"]


def _pemoe(implementation: str):
    def fwd(i: dict[str, torch.Tensor]) -> torch.Tensor:
        return ops.mov_linear(
            i["x"], i["weight"], _router(i), i["experts"], bias=i["bias"], implementation=implementation
        )

    return fwd


def _peft_ia3_module(i: dict[str, torch.Tensor]) -> torch.nn.Module:
    """PEFT's IA3 on a frozen nn.Linear sharing the bench's weight; its vector set to the experts' values."""
    from peft import IA3Config, inject_adapter_in_model

    N, K = i["weight"].shape
    lin = torch.nn.Linear(K, N, device=i["x"].device, dtype=i["x"].dtype)
    lin.weight, lin.bias = torch.nn.Parameter(i["weight"].detach()), torch.nn.Parameter(i["bias"].detach())
    model = inject_adapter_in_model(
        IA3Config(target_modules=["lin"], feedforward_modules=[]), torch.nn.ModuleDict({"lin": lin})
    )
    with torch.no_grad():
        vector = model["lin"].ia3_l["default"]  # [N, 1]: it scales the output
        vector.copy_(i["experts"].reshape(vector.shape))
    return model["lin"]


def _only_ia3(shape: dict[str, int]) -> str | None:
    return None if shape["E"] == 1 else "PEFT's IA3 is the E = 1 case only"


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
PROVIDERS["peft-ia3"] = Provider("peft-ia3", peft_module_forward(_peft_ia3_module), ("x",), supports=_only_ia3)
BENCH = OpBench(OP, shapes, make_inputs, PROVIDERS, scale_keys=("K", "N"), cost=cost)


def main(argv: list[str] | None = None) -> int:
    """``python -m pemoe.bench.mov_linear [pemoe bench options]``: this op only."""
    return op_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
