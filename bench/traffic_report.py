"""Modelled HBM bytes and FLOPs of the fused Triton ops against a plain GEMM, at model shapes.

``python -m pemoe.bench.traffic_report`` prints one markdown table: for ``mov_linear`` (k/v projection,
E = 10), ``mov_ffn`` (gated FFN, E = 10) and ``molora_linear`` (E = 10, r = 4) at T5-large, T5-XL and
Llama-7B-like widths (2048 tokens, bfloat16), the DRAM bytes the kernels' traffic models give for the
forward and the backward (operands re-read by several programs counted once: served from L2), their ratio
to the minimum (every input read once, every output written once) and to the plain frozen op (the same
GEMM(s) without the adapter), and the FLOPs ratio to the plain op (the op's own cost formula in
``pemoe.bench.<op>``). The models are those the interpreter's counted traffic is checked against
(tests/test_triton_*.py).
"""

from __future__ import annotations

import torch

from pemoe.bench.gpu_check import SHAPES

E, DTYPE = 10, torch.bfloat16


def _row(op: str, shape: str, fwd: float, fwd_min: float, fwd_plain: float, bwd: float, bwd_min: float,
         bwd_plain: float | None, flops: tuple[float, float]) -> str:  # fmt: skip
    mb = 2**20
    bwd_vs_plain = f"{bwd / bwd_plain:.2f}x" if bwd_plain else "–"
    return (
        f"| {op} | {shape} | {fwd / mb:.1f} | {fwd / fwd_min:.2f}x | {fwd / fwd_plain:.2f}x | {bwd / mb:.1f} | "
        f"{bwd / bwd_min:.2f}x | {bwd_vs_plain} | {flops[0]:.3f}x | {flops[1]:.3f}x |"
    )


def _gemm_flops(op: str, s: dict[str, int]) -> float:
    if op == "mov_ffn":
        return 6 * s["T"] * s["M"] * s["F"]
    return 2 * s["T"] * s["K"] * s["N"]


def rows() -> list[str]:
    from pemoe.bench import mov_ffn as b_ffn
    from pemoe.bench import mov_linear as b_mov
    from pemoe.kernels.triton import molora_linear_analysis as mo
    from pemoe.kernels.triton import mov_ffn_analysis as mf
    from pemoe.kernels.triton import mov_linear_analysis as ml

    isz = torch.finfo(DTYPE).bits // 8
    out = []
    for name, per_op in SHAPES.items():
        s = per_op["mov_linear"]
        T, K, N, G = s["T"], s["K"], s["N"], s["G"]
        r = ml.hbm_traffic(T, K, N, G, E, DTYPE)
        gemm_fwd = isz * (T * K + N * K + T * N)
        gemm_bwd = isz * (T * N + N * K + T * K)  # dgrad: dy, W in; dx out
        cost = b_mov.cost(dict(s, E=E), DTYPE, "fwd")[0], b_mov.cost(dict(s, E=E), DTYPE, "bwd")[0]
        flops = cost[0] / _gemm_flops("mov_linear", s), cost[1] / _gemm_flops("mov_linear", s)
        fwd, bwd = r.forward_hbm, r.backward_hbm
        out.append(_row("mov_linear", name, fwd, r.forward_minimum, gemm_fwd, bwd, r.backward_minimum, gemm_bwd, flops))

        s = per_op["mov_ffn"]
        m = mf.hbm_traffic(s["T"], s["M"], s["F"], E, dtype=DTYPE)
        cost = b_ffn.cost(dict(s, E=E), DTYPE, "fwd")[0], b_ffn.cost(dict(s, E=E), DTYPE, "bwd")[0]
        flops = cost[0] / _gemm_flops("mov_ffn", s), cost[1] / _gemm_flops("mov_ffn", s)
        out.append(
            _row(
                "mov_ffn", name, m.total("forward", "unique"), m.minimum["forward"], m.plain("unique"),
                m.total("backward", "unique"), m.minimum["backward"], None, flops,
            )
        )  # fmt: skip

        s = per_op["molora_linear"]
        t = mo.hbm_traffic(s["T"], s["K"], s["N"], E, s["r"], DTYPE)
        flops = t.forward_flops_ratio, t.backward_flops_ratio
        out.append(
            _row(
                "molora_linear", name, t.forward.unique, t.minimum_forward, t.linear_forward,
                t.backward.unique, t.minimum_backward, t.linear_backward, flops,
            )
        )  # fmt: skip
    return out


def backward_h_rows() -> list[str]:
    """mov_linear's backward, per way of getting h (``mov_linear_analysis.backward_strategies``): modelled
    H100 time of getting h plus the epilogue, bytes, and the activation memory it holds."""
    from pemoe.kernels.triton import mov_linear_analysis as ml

    out = []
    for name, per_op in SHAPES.items():
        s = per_op["mov_linear"]
        for dtype in (torch.bfloat16, torch.float32):
            for st in ml.backward_strategies(s["T"], s["K"], s["N"], s["G"], E, dtype):
                out.append(
                    f"| {name} | {str(dtype).removeprefix('torch.')} | {st.name} | {st.seconds * 1e6:.1f} | "
                    f"{st.dram / 2**20:.1f} | {st.l2_requested / 2**20:.1f} | {st.saved / 2**20:.1f} |"
                )
    return out


def main() -> int:
    header = (
        "| op | shape | fwd MB | fwd / minimum | fwd / plain | bwd MB | bwd / minimum | bwd / plain | "
        "fwd FLOPs / plain | bwd FLOPs / plain |"
    )
    print("\n".join([header, "|" + "---|" * 10, *rows()]))
    print()
    header = "| shape | dtype | mov_linear backward: h from | modelled µs (H100) | DRAM MB | L2 MB | held MB |"
    print("\n".join([header, "|" + "---|" * 7, *backward_h_rows()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
