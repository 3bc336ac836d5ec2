"""Folding adapters into the frozen weights: :func:`merge` (in place) and :func:`unmerge` (bit-exact undo).

What folds, and how (W [N, K] in torch Linear layout; GPT-2's ``Conv1D`` holds Wᵀ and is folded in that
layout; s is the site's scaling vector, p the router's probabilities):

* (IA)3 / MoV on a linear's output (k, v; GPT-2's k and v blocks of ``c_attn``): y = (x Wᵀ + b) ⊙ s with
  s[g·D + d] = Σ_e p_e experts[g, e, d], so W' = diag(s) W (rows scaled) and b' = s ⊙ b (the q block of a
  packed ``c_attn`` is scaled by 1).
* (IA)3 / MoV on the FFN activation (act(gate·x), act(wi_0·x), act(c_fc·x)): the MLP's output is
  down((act ⊙ s) ⊙ up) = down(act ⊙ up ⊙ s) since the products commute, so the down projection
  (``down_proj``, T5's ``wo``, GPT-2's MLP ``c_proj``) takes W' = W diag(s) (columns scaled).
* LoRA / MoLoRA: W' = W + scale · Σ_e p_e (A_e B_e)ᵀ with A_e = lora_a[e] [K, r], B_e = lora_b[e] [r, N],
  scale = alpha / r.

With one expert p ≡ 1. With more experts the sum is a constant only when p is: sentence routing with one
fixed router input (one task), given as ``merge(model, router_input=vector)``; token routing computes p
from each token's own activation, so no single weight reproduces the layer and :func:`merge` refuses it.
The fold is computed in float32 (float64 for float64 weights) and rounded once to the weight's dtype, so
merged outputs differ from unmerged ones by rounding only.

Merged sites become plain modules (``nn.Linear``, the model's own ``Conv1D``, the MLP's activation, a plain
gated MLP): no adapter cost at inference. The adapter modules, with the original frozen weights untouched,
are kept aside, so :func:`unmerge` puts them back and restores every weight bit for bit (a subtraction
would not); merged weights are new tensors, so a merged model holds the adapted layers twice. The modules
kept aside are not the model's children: move the model (``.to(device)``, ``.half()``) while unmerged, or
unmerge before moving it. Quantized
frozen weights (bitsandbytes, torchao: :func:`pemoe.layers.runs_own_forward`) cannot take a fold.
"""

from __future__ import annotations

import torch
from torch import nn

from pemoe.injection import _require_injected, require_unmerged
from pemoe.layers import MoLoRALinear, MoV, MoVLinear, runs_own_forward
from pemoe.placements import Conv1DLinear, FusedGatedMLP, MoVActivation, PackedMoV
from pemoe.placements._common import conv1d_type
from pemoe.reference import compute_dtype, router_probs

__all__ = ["merge", "unmerge", "is_merged"]

_DOWN_NAMES = ("down_proj", "wo", "c_proj")


class MergedGatedMLP(nn.Module):
    """y = down_proj(act_fn(gate_proj·x) ⊙ up_proj·x) with plain linears: a fused MoV MLP after merging
    (same child names, hence the same state-dict keys, as the MLP it stands for)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def is_merged(model: nn.Module) -> bool:
    """Whether ``model``'s pemoe adapters are folded into its weights."""
    state = getattr(model, "_pemoe_adapter", None)
    return state is not None and state.get("merged") is not None


# ---------------------------------------------------------------------------------------------
# the folds (pure: they build new modules and never write into the model's tensors)


def _plain(module: nn.Module, what: str) -> tuple[nn.Module, bool]:
    """(the frozen layer itself, whether it is a Conv1D holding Wᵀ); ValueError for a quantized one."""
    if isinstance(module, Conv1DLinear):
        module = module.conv
    conv = conv1d_type()
    is_conv = conv is not None and isinstance(module, conv)
    if isinstance(module, nn.Linear) and runs_own_forward(module):
        raise ValueError(
            f"pemoe.merge: {what} is a quantized or custom linear ({type(module).__name__}): an adapter cannot be "
            "folded into quantized weights; keep the adapters unmerged (they run on top of the quantized base)"
        )
    if not (is_conv or isinstance(module, nn.Linear)) or type(module.weight.data) is not torch.Tensor:
        raise ValueError(f"pemoe.merge: {what} ({type(module).__name__}) is not a plain nn.Linear or Conv1D")
    return module, is_conv


def _new_layer(like: nn.Module, is_conv: bool, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A frozen layer of ``like``'s kind holding ``weight`` (in ``like``'s own layout) and ``bias``."""
    if is_conv:
        layer = type(like)(weight.shape[1], weight.shape[0])
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return layer


def _scaled_outputs(module: nn.Module, s: torch.Tensor, what: str) -> nn.Module:
    """The layer with its outputs scaled by s [N]: rows of W (columns of a Conv1D's Wᵀ) and the bias."""
    layer, is_conv = _plain(module, what)
    w, b = layer.weight, layer.bias
    cd = compute_dtype(w.dtype)
    s = s.to(device=w.device, dtype=cd)
    new_w = (w.to(cd) * (s[None, :] if is_conv else s[:, None])).to(w.dtype)
    new_b = None if b is None else (b.to(cd) * s).to(b.dtype)
    return _new_layer(layer, is_conv, new_w, new_b)


def _scaled_inputs(module: nn.Module, s: torch.Tensor, what: str) -> nn.Module:
    """The layer with its inputs scaled by s [K]: columns of W (rows of a Conv1D's Wᵀ); the bias unchanged."""
    layer, is_conv = _plain(module, what)
    w = layer.weight
    cd = compute_dtype(w.dtype)
    s = s.to(device=w.device, dtype=cd)
    new_w = (w.to(cd) * (s[:, None] if is_conv else s[None, :])).to(w.dtype)
    return _new_layer(layer, is_conv, new_w, layer.bias)


def _probs(site: nn.Module, router_input: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """p [E]: ones(1) for one expert, else the router's (top-k masked) softmax of the fixed router input."""
    router = site.router
    if router is None:
        return torch.ones(1, dtype=dtype, device=site.adapter_parameters()[0].device)
    p = router_probs(router_input.to(router.device), router, top_k=site.top_k, renormalize=site.renormalize)
    return p[0].to(dtype)


def _mov_scale(site: MoV, router_input: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """s [G·D] = Σ_e p_e experts[:, e, :], flattened."""
    experts = site.experts.detach().to(dtype)
    if site.router is None:
        return experts[:, 0, :].reshape(-1)
    p = _probs(site, router_input, dtype)
    return torch.einsum("e,ged->gd", p, experts).reshape(-1)


def _molora_delta(m: MoLoRALinear, router_input: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """scale · Σ_e p_e (A_e B_e)ᵀ [N, K]."""
    a, b = m.lora_a.detach().to(dtype), m.lora_b.detach().to(dtype)
    p = _probs(m, router_input, dtype)
    return torch.einsum("e,ekr,ern->nk", p, a, b) * m.scale


def _molora_merged(m: MoLoRALinear, key: str, router_input: torch.Tensor | None) -> nn.Module:
    layer, is_conv = _plain(m.base, key)
    w = layer.weight
    cd = compute_dtype(w.dtype)
    delta = _molora_delta(m, router_input, cd).to(w.device)
    new_w = (w.to(cd) + (delta.t() if is_conv else delta)).to(w.dtype)
    return _new_layer(layer, is_conv, new_w, layer.bias)


def _down(mlp: nn.Module, key: str) -> tuple[str, nn.Module]:
    for name in _DOWN_NAMES:
        layer = getattr(mlp, name, None)
        if isinstance(layer, nn.Module):
            return name, layer
    raise ValueError(f"pemoe.merge: {key}: the MLP {type(mlp).__name__} has no down projection {_DOWN_NAMES}")


def _plan(model: nn.Module, router_input: torch.Tensor | None) -> list[tuple[nn.Module, str, object]]:
    """(parent, attribute, new module) for every change a merge makes; changes nothing."""
    state = _require_injected(model)
    changes: list[tuple[nn.Module, str, object]] = []
    done: set[tuple[int, str]] = set()
    for key, site in state["sites"].items():
        if (id(site.parent), site.attr) in done:
            continue
        done.add((id(site.parent), site.attr))
        m = getattr(site.parent, site.attr)
        if isinstance(m, MoLoRALinear):
            changes.append((site.parent, site.attr, _molora_merged(m, key, router_input)))
        elif isinstance(m, MoVLinear):
            cd = compute_dtype(m.base.weight.dtype)
            changes.append((site.parent, site.attr, _scaled_outputs(m.base, _mov_scale(m.site, router_input, cd), key)))
        elif isinstance(m, PackedMoV):
            layer, _ = _plain(m.base, key)
            cd = compute_dtype(layer.weight.dtype)
            blocks = [
                _mov_scale(part, router_input, cd)
                if (part := m._modules.get(name)) is not None
                else torch.ones(m.width, dtype=cd, device=layer.weight.device)
                for name in m.parts
            ]
            changes.append((site.parent, site.attr, _scaled_outputs(m.base, torch.cat(blocks), key)))
        elif isinstance(m, (MoVActivation, FusedGatedMLP, MoV)):
            mlp = m if isinstance(m, FusedGatedMLP) else site.parent
            name, down = _down(mlp, key)
            layer, _ = _plain(down, f"{key} (its down projection {name})")
            mov = m.mov if isinstance(m, FusedGatedMLP) else m.site if isinstance(m, MoVActivation) else m
            new_down = _scaled_inputs(down, _mov_scale(mov, router_input, compute_dtype(layer.weight.dtype)), key)
            if isinstance(m, FusedGatedMLP):
                changes.append((site.parent, site.attr, MergedGatedMLP(m.gate_proj, m.up_proj, new_down, m.act_fn)))
            else:
                changes.append((site.parent, site.attr, m.act if isinstance(m, MoVActivation) else None))
                changes.append((mlp, name, new_down))
        else:  # pragma: no cover - every site kind is handled above
            raise TypeError(f"pemoe.merge: {key}: no fold for {type(m).__name__}")
    return changes


def _check_router_input(config, router_input: torch.Tensor | None) -> torch.Tensor | None:
    name = type(config).__name__
    if config.num_experts == 1:
        if router_input is not None:
            raise ValueError(f"pemoe.merge: router_input is for sentence-routed adapters; {name} has one expert")
        return None
    if config.router_input == "token":
        raise ValueError(
            f"pemoe.merge: {name} with num_experts={config.num_experts} routes each token by its own activation, "
            "so the expert mixture changes from token to token and no single weight reproduces it: token-routed "
            "MoV/MoLoRA cannot be merged (only (IA)3, LoRA, and sentence routing with one fixed router input)"
        )
    dim = config.router_input_dim
    if router_input is None:
        raise ValueError(
            f"pemoe.merge: {name} routes by sentence: give the one fixed router input (router_input=[{dim}] vector "
            "of the task) whose expert mixture to fold in"
        )
    if not isinstance(router_input, torch.Tensor) or not router_input.is_floating_point():
        raise TypeError(f"pemoe.merge: router_input must be a floating tensor, got {router_input!r:.80}")
    if router_input.dim() == 2 and router_input.shape[0] == 1:
        router_input = router_input[0]
    if router_input.dim() != 1 or router_input.shape[0] != dim:
        raise ValueError(
            f"pemoe.merge: router_input must be one vector of shape [{dim}] (or [1, {dim}]): one task's mixture is "
            f"a constant, a batch of them is not; got shape {list(router_input.shape)}"
        )
    return router_input[None, :]


def merge(model: nn.Module, router_input: torch.Tensor | None = None) -> None:
    """Fold the model's adapters into its frozen weights, in place (see the module docstring for the math).

    ``router_input``: for sentence-routed MoV/MoLoRA with more than one expert, the one router input vector
    [R] (or [1, R]) of the task whose mixture is folded in; must be None otherwise. Undo with
    :func:`unmerge`. Raises ValueError (the model unchanged) for a model without adapters, already merged
    adapters, token-routed adapters with more than one expert, a missing or batched ``router_input``, or a
    quantized frozen base.
    """
    state = require_unmerged(model, "pemoe.merge")
    ri = _check_router_input(state["config"], router_input)
    with torch.no_grad():
        changes = _plan(model, ri)
    old = [(parent, attr, getattr(parent, attr)) for parent, attr, _ in changes]
    for parent, attr, new in changes:
        setattr(parent, attr, new)
    state["merged"] = old


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`: the adapter modules and the original frozen weights return, bit for bit.
    ValueError for a model whose adapters are not merged."""
    state = _require_injected(model)
    old = state.get("merged")
    if old is None:
        raise ValueError("pemoe.unmerge: the model's adapters are not merged")
    for parent, attr, module in reversed(old):
        setattr(parent, attr, module)
    state["merged"] = None
