"""Benchmark of ``pemoe.ops.molora_linear``: a frozen linear plus a soft mixture of LoRA experts.

Providers: ``linear`` (floor: the frozen ``F.linear(x, W, b)``, only x requires grad), ``pemoe-torch``,
``pemoe-triton`` (skipped where pemoe has no Triton implementation), ``reference`` and
``authors-einsum`` (the MoLoRA paper's formulation, written inline below), ``matmuls-only`` (a yardstick,
not MoLoRA: the frozen linear plus only the adapter's unavoidable matrix products, see
:func:`matmuls_only`) and, on E = 1 shapes (``--full``), ``peft-lora`` (PEFT's LoRA, alpha = 16, on the
same frozen linear). Run ``python -m pemoe.bench.molora_linear`` (the same options as ``pemoe bench``).

Cost formula (:func:`cost`; s = bytes per activation element, R = E·r):
  fwd     FLOPs 2TKN + 2TK(R + E) + 2TRN + TN;   bytes s(TK + NK + N + TN) + 4(KR + RN + KE)
  bwd     FLOPs 2TNK + 4TNR + 4TK(R + E);        bytes s(2TK + NK + TN) + 4(TE + 2(KR + RN + KE))
          (dx through W and the adapters, dU′ = dy·B_catᵀ, d lora_b, d lora_a and d router; x and dy
          read, dx written, p saved in float32)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pemoe import ops
from pemoe.bench.harness import OpBench, Provider, op_main, peft_module_forward, standard_providers

OP = "molora_linear"
TRAINABLE = ("x", "router", "lora_a", "lora_b")
WIDTHS = {"large": 1024, "base": 768, "xl": 2048}
NUM_EXPERTS = 10
RANK = 4


def shapes(full: bool) -> list[dict[str, int]]:
    """The issue's shape (T=2048, K=N=1024, E=10, r=4); --full adds base/XL widths, T in {16, 512} and the
    LoRA case E = 1 at the large width (where PEFT's LoRA runs too)."""
    tokens = (16, 512, 2048) if full else (2048,)
    widths = ("large", "base", "xl") if full else ("large",)
    out = [{"T": t, "K": WIDTHS[w], "N": WIDTHS[w], "E": NUM_EXPERTS, "r": RANK} for w in widths for t in tokens]
    if full:
        out += [{"T": t, "K": 1024, "N": 1024, "E": 1, "r": RANK} for t in (512, 2048)]
    return out


def cost(shape: dict[str, int], dtype: torch.dtype, mode: str) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of one call; the formula is in the module docstring."""
    T, K, N, E = shape["T"], shape["K"], shape["N"], shape["E"]
    s, R = torch.finfo(dtype).bits // 8, E * shape["r"]
    adapters = 4 * (K * R + R * N + K * E)
    fwd = (2 * T * K * N + 2 * T * K * (R + E) + 2 * T * R * N + T * N, s * (T * K + N * K + N + T * N) + adapters)
    bwd = (
        2 * T * N * K + 4 * T * N * R + 4 * T * K * (R + E),
        s * (2 * T * K + N * K + T * N) + 4 * T * E + 2 * adapters,
    )
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": (fwd[0] + bwd[0], fwd[1] + bwd[1])}[mode]


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


def _router(i: dict[str, torch.Tensor]) -> torch.Tensor | None:
    return None if i["lora_a"].shape[0] == 1 else i["router"]


def _pemoe(implementation: str):
    def fwd(i: dict[str, torch.Tensor]) -> torch.Tensor:
        return ops.molora_linear(
            i["x"],
            i["weight"],
            i["lora_a"],
            i["lora_b"],
            _router(i),
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


def matmuls_only(i: dict[str, torch.Tensor]) -> torch.Tensor:
    """A yardstick, not MoLoRA: x Wᵀ + b + (x·A_cat)·B_cat, the experts summed unweighted.

    The matrix products any MoLoRA formulation must make beside the frozen linear (2TK(E·r + E) + 2T·E·r·N
    FLOPs: 8.8 % of the linear's at T5-large, E = 10, r = 4), issued as pemoe's ``"torch"`` issues them — the
    shrink and the router logits as one GEMM x·[A_cat | router] (router in x's dtype here, cheaper than
    pemoe's float32 router for 16-bit x), the expand accumulated into the output — with no softmax, routing
    or scaling. Its ratio to the linear is what these FLOPs alone cost on the machine, a floor for any
    composition of torch ops; its gradients cost what theirs cost.
    """
    x = i["x"]
    num_experts, k, rank = i["lora_a"].shape
    a_cat = i["lora_a"].to(x.dtype).permute(1, 0, 2).reshape(k, num_experts * rank)
    router = _router(i)
    cols = a_cat if router is None else torch.cat([a_cat, router.to(x.dtype)], dim=1)
    u = (x @ cols)[:, : num_experts * rank]
    return F.linear(x, i["weight"], i["bias"]).addmm_(u, i["lora_b"].to(x.dtype).reshape(num_experts * rank, -1))


def _peft_lora_module(i: dict[str, torch.Tensor]) -> torch.nn.Module:
    """PEFT's LoRA (r, alpha = 16) on a frozen nn.Linear sharing the bench's weight; A and B set to lora_a/b."""
    from peft import LoraConfig, inject_adapter_in_model

    N, K = i["weight"].shape
    r = i["lora_a"].shape[-1]
    lin = torch.nn.Linear(K, N, device=i["x"].device, dtype=i["x"].dtype)
    lin.weight, lin.bias = torch.nn.Parameter(i["weight"].detach()), torch.nn.Parameter(i["bias"].detach())
    config = LoraConfig(r=r, lora_alpha=16, target_modules=["lin"])
    model = inject_adapter_in_model(config, torch.nn.ModuleDict({"lin": lin}))
    with torch.no_grad():
        model["lin"].lora_A["default"].weight.copy_(i["lora_a"][0].t())
        model["lin"].lora_B["default"].weight.copy_(i["lora_b"][0].t())
    return model["lin"]


def _only_lora(shape: dict[str, int]) -> str | None:
    return None if shape["E"] == 1 else "PEFT's LoRA is the E = 1 case only"


PROVIDERS = standard_providers(_floor, _pemoe, _authors, TRAINABLE)
PROVIDERS["matmuls-only"] = Provider("matmuls-only", matmuls_only, TRAINABLE)
PROVIDERS["peft-lora"] = Provider("peft-lora", peft_module_forward(_peft_lora_module), ("x",), supports=_only_lora)
BENCH = OpBench(OP, shapes, make_inputs, PROVIDERS, scale_keys=("K", "N"), cost=cost)


def main(argv: list[str] | None = None) -> int:
    """``python -m pemoe.bench.molora_linear [pemoe bench options]``: this op only."""
    return op_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
