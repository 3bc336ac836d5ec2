"""``target_modules``: sites named by the user, on any model, matched as PEFT matches them.

A list of names matches a module whose dotted path equals a name or ends with ``"." + name``; a string is a
regular expression that must match the whole path; ``"all-linear"`` is every ``nn.Linear`` / ``Conv1D`` but
the output embedding (LM head). MoLoRA/LoRA go on each matched linear. MoV goes on a matched linear's output
with G groups: ``num_groups`` if given, else ``out_features // head_dim`` when the linear's parent module
declares an integer ``head_dim`` (T5: ``key_value_proj_dim`` / ``d_kv``) dividing it — the heads of an
attention projection, key/value heads under GQA — else 1 (the whole output one vector); or on a matched
MLP activation (``act_fn`` / ``act`` of a known MLP, transformers' T5 ``act``): MoV on its output.
"""

from __future__ import annotations

import re

from torch import nn

from pemoe.placements._common import ModuleKind, Site, head_dim_of, is_linear, join, out_features
from pemoe.placements.t5 import is_hf_t5


def _show(target: str | tuple[str, ...]) -> str:
    """target_modules as the user wrote it (a list shows as a list)."""
    return repr(target) if isinstance(target, str) else repr(list(target))


def _matches(target: str | tuple[str, ...], path: str) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, path) is not None
    return any(path == t or path.endswith("." + t) for t in target)


def _output_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if get is not None:
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return getattr(model, "lm_head", None)


def _activation_site(model: nn.Module, path: str, kinds: tuple[ModuleKind, ...]) -> Site | None:
    """The FFN MoV site of an MLP's activation module at ``path`` (``act_fn`` / ``act`` of a known MLP)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    kind = next((k for k in kinds if k.matches(parent)), None)
    if kind is not None and kind.activation == attr:
        return Site(join(parent_path, "mov"), parent, attr, "mov_ffn", width=kind.ffn_width(parent))
    if attr == "act" and is_hf_t5(model) and hasattr(parent, "wo"):  # transformers' T5 DenseReluDense
        return Site(join(parent_path, "mov"), parent, attr, "mov_ffn", width=parent.wo.in_features)
    return None


def target_sites(
    model: nn.Module,
    lora: bool,
    target: str | tuple[str, ...],
    num_groups: int | None,
    owner: str,
    kinds: tuple[ModuleKind, ...],
) -> list[Site]:
    """The sites of ``target`` (see the package docstring); ``kinds``: the module kinds whose activations
    a MoV target may name."""
    head = _output_embedding(model)
    if target == "all-linear":
        matched = [(p, m) for p, m in model.named_modules() if p and is_linear(m) and m is not head]
    else:
        matched = [(p, m) for p, m in model.named_modules() if p and _matches(target, p)]
    if not matched:
        raise ValueError(f"{owner}.target_modules={_show(target)} matches no module of {type(model).__name__}")
    found: list[Site] = []
    for path, module in matched:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if is_linear(module):
            if lora:
                found.append(Site(path, parent, attr, "molora"))
                continue
            groups = num_groups
            if groups is None:
                head_dim = head_dim_of(parent)
                width = out_features(module)
                groups = width // head_dim if head_dim is not None and width % head_dim == 0 else 1
            found.append(Site(path, parent, attr, "mov_linear", groups=groups))
            continue
        site = None if lora else _activation_site(model, path, kinds)
        if site is None:
            what = "an nn.Linear or Conv1D" if lora else "an nn.Linear or Conv1D, or an MLP's activation (act_fn, act)"
            raise TypeError(
                f"pemoe.inject: target_modules={_show(target)} matches {path} ({type(module).__module__}."
                f"{type(module).__name__}), which is not {what}"
            )
        found.append(site)
    return found
