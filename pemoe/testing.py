"""The tolerance rule pemoe's tests and its GPU check hold every output and gradient to (SPEC §5).

For an implementation's output or gradient ``out`` computed from inputs in dtype ``dt``, with ``truth`` the
reference computed in float64 from the same (upcast) inputs and ``ref`` the reference computed eagerly in
``dt`` (after flash-attention's rule)::

    max|out - truth| <= 2 * max|ref - truth| + ATOL[dt] * max(max|truth|, 1)

ATOL is one to two units in the last place of the dtype: an implementation may be at most twice as wrong as
the plain reference, plus a rounding step at the tensor's scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2**-10,
    torch.bfloat16: 2**-7,
}


@dataclass(frozen=True)
class RuleCheck:
    """One comparison: the implementation's error, the reference's, the bound, and whether it holds."""

    err: float
    ref_err: float
    bound: float
    finite: bool
    shape_ok: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.shape_ok and self.err <= self.bound


def check_rule(out: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> RuleCheck:
    """Measure ``out`` against the rule (see the module docstring); never raises on a violation."""
    if out.shape != truth.shape:
        return RuleCheck(float("inf"), float("nan"), float("nan"), True, False)
    out64, ref64, truth64 = out.double(), ref.double(), truth.double()
    finite = bool(torch.isfinite(out64).all())
    empty = out.numel() == 0
    err = 0.0 if empty else (out64 - truth64).abs().max().item()
    ref_err = 0.0 if empty else (ref64 - truth64).abs().max().item()
    scale = max(0.0 if empty else truth64.abs().max().item(), 1.0)
    return RuleCheck(err, ref_err, 2 * ref_err + ATOL[dtype] * scale, finite, True)
