"""Shared test helpers: input factories and the tolerance rule (:mod:`pemoe.testing`, also used by the GPU
check: one rule for every test and check).

Tolerance rule (SPEC §5, after flash-attention): for an implementation's output or gradient
``out`` computed from inputs in dtype ``dt``, with ``truth`` the reference computed in float64
from the same (upcast) inputs and ``ref`` the reference computed eagerly in ``dt``:

    max|out - truth| <= 2 * max|ref - truth| + ATOL[dt] * max(max|truth|, 1)
"""

from __future__ import annotations

import torch

from pemoe.testing import ATOL, check_rule

__all__ = ["ATOL", "assert_within_rule", "cast_inputs", "run_with_grads"]


def assert_within_rule(
    out: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    c = check_rule(out, ref, truth, dtype)
    assert c.shape_ok, f"{what}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert c.finite, f"{what}: non-finite values"
    assert c.ok, f"{what}: max error {c.err:.3e} > bound {c.bound:.3e} (reference error {c.ref_err:.3e})"


def run_with_grads(fn, inputs: dict[str, torch.Tensor], grad_out: torch.Tensor | None = None):
    """Calls fn(**inputs) on fresh leaf copies; returns (output, {name: grad}) for inputs that require grad."""
    leaves = {
        k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
        for k, v in inputs.items()
    }
    out = fn(**leaves)
    if grad_out is None:
        grad_out = torch.ones_like(out)
    grads = {}
    need = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    if need:
        gs = torch.autograd.grad(out, [leaves[k] for k in need], grad_out.to(out.dtype), allow_unused=True)
        grads = {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(need, gs, strict=True)}
    return out.detach(), grads


def cast_inputs(inputs: dict, activation_dtype: torch.dtype, adapter_dtype: torch.dtype, activations: tuple[str, ...]):
    """Activations and frozen weights to activation_dtype; adapter parameters to adapter_dtype."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            dt = activation_dtype if k in activations else adapter_dtype
            out[k] = v.detach().to(dt).requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def snapshot_model(model) -> tuple:
    """What a failed call must leave as it was: every parameter (values and requires_grad), every state-dict
    tensor (buffers too), the module tree's types and the pemoe adapter config."""
    from pemoe.adapters import adapter_config

    return (
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        {n: t.detach().clone() for n, t in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
        adapter_config(model),
    )


def assert_model_unchanged(model, snap: tuple) -> None:
    from pemoe.adapters import adapter_config

    params, state, modules, config = snap
    now = dict(model.named_parameters())
    assert list(now) == list(params)
    for n, (t, requires_grad) in params.items():
        assert torch.equal(now[n], t) and now[n].requires_grad == requires_grad, n
    now_state = model.state_dict()
    assert list(now_state) == list(state) and all(torch.equal(now_state[k], v) for k, v in state.items())
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert adapter_config(model) == config
