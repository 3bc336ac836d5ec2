"""Benchmark of ``pemoe.ops.mov_ffn``: the T5 v1.1 gated-GELU FFN with MoV on the activation.

Providers: ``linear`` (floor: the plain frozen T5 FFN ``F.linear(act(F.linear(x, wi_0)) * F.linear(x, wi_1),
wo)``, only x requires grad), ``pemoe-torch``, ``pemoe-triton`` (skipped where pemoe has no Triton
implementation), ``reference``, ``authors-einsum`` (the MoV paper's formulation, inline) and, on E = 1
shapes (``--full``), ``peft-ia3`` (PEFT's IA3 with wo as a feed-forward module, which scales wo's input:
the same (IA)3 by SPEC §2). Run ``python -m pemoe.bench.mov_ffn`` (the same options as ``pemoe bench``).

Cost formula (:func:`cost`; s = bytes per activation element):
  fwd     FLOPs 6TMF + 4TFE + 3TF;  bytes s(2TM + 3MF) + 8FE
  bwd     FLOPs 6TMF + 8TFE + 6TF;  bytes s(2TM + 3MF + 2TF) + 4(TE + 4FE)
          (d inter = dy·wo, then dx through wi_0 and wi_1; the activation and the wi_1 product saved)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pemoe import ops
from pemoe.bench.harness import OpBench, Provider, op_main, peft_module_forward, standard_providers
from pemoe.bench.mov_linear import authors_mov

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
    out = [{"T": t, "M": WIDTHS[w][0], "F": WIDTHS[w][1], "E": NUM_EXPERTS} for w in widths for t in tokens]
    if full:
        out += [{"T": t, "M": 1024, "F": 2816, "E": 1} for t in (512, 2048)]
    return out


def cost(shape: dict[str, int], dtype: torch.dtype, mode: str) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of one call; the formula is in the module docstring."""
    T, M, Fd, E = shape["T"], shape["M"], shape["F"], shape["E"]
    s = torch.finfo(dtype).bits // 8
    fwd = (6 * T * M * Fd + 4 * T * Fd * E + 3 * T * Fd, s * (2 * T * M + 3 * M * Fd) + 8 * Fd * E)
    bwd = (
        6 * T * M * Fd + 8 * T * Fd * E + 6 * T * Fd,
        s * (2 * T * M + 3 * M * Fd + 2 * T * Fd) + 4 * (T * E + 4 * Fd * E),
    )
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": (fwd[0] + bwd[0], fwd[1] + bwd[1])}[mode]


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
            None if i["experts"].shape[1] == 1 else i["router"],
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


class _GatedFFN(torch.nn.Module):
    """T5 v1.1's gated-GELU FFN on the bench's frozen weights (what PEFT's IA3 wraps)."""

    def __init__(self, i: dict[str, torch.Tensor]) -> None:
        super().__init__()
        Fd, M = i["wi_0"].shape
        kw = {"bias": False, "device": i["x"].device, "dtype": i["x"].dtype}
        self.wi_0, self.wi_1, self.wo = (
            torch.nn.Linear(M, Fd, **kw),
            torch.nn.Linear(M, Fd, **kw),
            torch.nn.Linear(Fd, M, **kw),
        )
        for name in ("wi_0", "wi_1", "wo"):
            getattr(self, name).weight = torch.nn.Parameter(i[name].detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(_act(self.wi_0(x)) * self.wi_1(x))


def _peft_ia3_module(i: dict[str, torch.Tensor]) -> torch.nn.Module:
    from peft import IA3Config, inject_adapter_in_model

    model = inject_adapter_in_model(IA3Config(target_modules=["wo"], feedforward_modules=["wo"]), _GatedFFN(i))
    with torch.no_grad():
        model.wo.ia3_l["default"].copy_(i["experts"].reshape(1, -1))
    return model


def _only_ia3(shape: dict[str, int]) -> str | None:
    return None if shape["E"] == 1 else "PEFT's IA3 is the E = 1 case only"


PROVIDERS = standard_providers(_floor, _pemoe, _authors, TRAINABLE)
PROVIDERS["peft-ia3"] = Provider("peft-ia3", peft_module_forward(_peft_ia3_module), ("x",), supports=_only_ia3)
BENCH = OpBench(OP, shapes, make_inputs, PROVIDERS, scale_keys=("M", "F"), cost=cost)


def main(argv: list[str] | None = None) -> int:
    """``python -m pemoe.bench.mov_ffn [pemoe bench options]``: this op only."""
    return op_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
