"""Benchmark of ``pemoe.ops.molora_linear``: a frozen linear plus a soft mixture of LoRA experts.

Providers: ``linear`` (floor: the frozen ``F.linear(x, W, b)``, only x requires grad), ``pemoe-torch``,
``pemoe-triton`` (skipped where pemoe has no Triton implementation), ``reference`` and
``authors-einsum`` (the MoLoRA paper's formulation, written inline below). Run
``python -m bench.molora_linear`` (the same options as ``pemoe bench``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import OpBench, op_main, standard_providers
from pemoe import ops

OP = "molora_linear"
TRAINABLE = ("x", "router", "lora_a", "lora_b")
WIDTHS = {"large": 1024, "base": 768, "xl": 2048}
NUM_EXPERTS = 10
RANK = 4


def shapes(full: bool) -> list[dict[str, int]]:
    """The issue's shape (T=2048, K=N=1024, E=10, r=4); --full adds base/XL widths and T in {16, 512}."""
    tokens = (16, 512, 2048) if full else (2048,)
    widths = ("large", "base", "xl") if full else ("large",)
    return [{"T": t, "K": WIDTHS[w], "N": WIDTHS[w], "E": NUM_EXPERTS, "r": RANK} for w in widths for t in tokens]


def make_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """x [T, K], weight [N, K], bias [N] in ``dtype``; router [K, E], lora_a [E, K, r], lora_b [E, r, N]
    float32."""
    g = torch.Generator().manual_seed(0)
    T, K, N, E, r = shape["T"], shape["K"], shape["N"], shape["E"], shape["r"]
    t = {
        "x": torch.randn(T, K, generator=g).to(dtype),
        "weight": (torch.randn(N, K, generator=g) / K**0.5).to(dtype),
        "bias": (torch.randn(N, generator=g) * 0.02).to(dtype),
        "router": torch.randn(K, E, generator=g) * 0.02,
        "lora_a": torch.randn(E, K, r, generator=g) * 0.02,
        "lora_b": torch.randn(E, r, N, generator=g) * 0.02,
    }
    return {k: v.to(device) for k, v in t.items()}


def _scale(i: dict[str, torch.Tensor]) -> float:
    return 16 / i["lora_a"].shape[-1]


def _floor(i: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.linear(i["x"], i["weight"], i["bias"])


def _pemoe(implementation: str):
    def fwd(i: dict[str, torch.Tensor]) -> torch.Tensor:
        return ops.molora_linear(
            i["x"],
            i["weight"],
            i["lora_a"],
            i["lora_b"],
            i["router"],
            scale=_scale(i),
            bias=i["bias"],
            implementation=implementation,
        )

    return fwd


def _authors(i: dict[str, torch.Tensor]) -> torch.Tensor:
    """The MoLoRA authors' formulation: per-expert LoRA outputs in x's dtype, mixed by p."""
    x = i["x"]
    base = F.linear(x, i["weight"], i["bias"])
    p = torch.softmax(x.float() @ i["router"], dim=-1)
    delta = torch.einsum("tk,ekr->ter", x, i["lora_a"].to(x.dtype))
    delta = torch.einsum("ter,ern->ten", delta, i["lora_b"].to(x.dtype))
    return base + _scale(i) * torch.einsum("te,ten->tn", p.to(x.dtype), delta)


PROVIDERS = standard_providers(_floor, _pemoe, _authors, TRAINABLE)
BENCH = OpBench(OP, shapes, make_inputs, PROVIDERS, scale_keys=("K", "N"))


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.molora_linear [pemoe bench options]``: this op only."""
    return op_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
