"""PEFT interop at one expert: :func:`export_peft` writes a pemoe (IA)3 or LoRA adapter as a PEFT folder that
``peft.PeftModel.from_pretrained(base, folder)`` loads with equal outputs; :func:`import_peft` injects and
loads a PEFT IA3 or LoRA folder into a bare model, optionally as the start of a MoV/MoLoRA (upcycling).

Layouts (paths are module paths of the model, the same in pemoe and PEFT; PEFT's keys are
``base_model.model.<path>.<param>``):

| pemoe | PEFT | layout |
|---|---|---|
| ``<linear>.lora_a`` [1, K, r] | ``<linear>.lora_A.weight`` | [r, K] = lora_a[0]ᵀ |
| ``<linear>.lora_b`` [1, r, N] | ``<linear>.lora_B.weight`` | [N, r] = lora_b[0]ᵀ |
| ``alpha``, ``rank`` (scale = alpha / r) | ``lora_alpha``, ``r`` (scaling = lora_alpha / r) | as is |
| ``<linear>.experts`` [G, 1, D] (k, v: the output) | ``<linear>.ia3_l`` | [G·D, 1] |
| ``<mlp>.mov.experts`` [1, 1, F] (act(gate·x)) | ``<mlp>.<down>.ia3_l``, a feed-forward module | [1, F] |
| GPT-2 ``<c_attn>.{k,v}.experts`` [H, 1, D] | ``<c_attn>.ia3_l`` (q | k | v) | [3·H·D, 1], q block 1 |

The FFN site scales act(gate·x) before the product with up·x; (h ⊙ s) ⊙ u = (h ⊙ u) ⊙ s, so it equals
PEFT's IA3 on the down projection's input (``down_proj``, T5's ``wo``, GPT-2's MLP ``c_proj``, listed in
``feedforward_modules``). GPT-2's ``Conv1D`` layers are exported with ``fan_in_fan_out=True``; PEFT's
LoRA and IA3 tensors keep the layouts above for them. ``target_modules`` lists the shortest module-path
suffixes (``"k_proj"``, or ``"mlp.c_proj"`` where ``"c_proj"`` would also name the attention's) that name
exactly the adapted modules.

Import chooses the built-in sites whose modules are exactly PEFT's targets when there are such
(``sites=("q", "v")`` for a LoRA on q_proj and v_proj), else names PEFT's modules with ``target_modules``
(MoV on a linear's output with G = out / head_dim groups, or on an MLP's activation for a feed-forward
module). ``use_rslora`` (scaling lora_alpha / √r) is imported as alpha = lora_alpha·√r. A PEFT type other
than LORA and IA3, DoRA, per-module rank/alpha patterns, trained biases, ``modules_to_save`` and
modules pemoe has no site for are refused.

Upcycling (``import_peft(model, folder, num_experts=E)``): every expert starts as the PEFT adapter and the
router is fresh (normal(0, 0.02), as at injection). All experts are equal and the softmax weights sum to 1,
so Σ_e p_e·adapter = adapter: the MoV/MoLoRA starts as the imported model, whatever the router says.
"""

from __future__ import annotations

import math
import pathlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from pemoe.config import AdapterConfig, IA3Config, LoRAConfig, MoLoRAConfig, MoVConfig
from pemoe.injection import _apply, _require_injected, adapter_config, adapter_state_dict, require_unmerged
from pemoe.placements import MODULE_KINDS, find_sites
from pemoe.placements._common import conv1d_type, out_features
from pemoe.placements.t5 import is_hf_t5, is_pemoe_t5
from pemoe.serialization import CONFIG_NAME, WEIGHTS_NAME, _read_json, _write_folder, read_safetensors

__all__ = ["export_peft", "import_peft"]

PREFIX = "base_model.model."
_DOWN_NAMES = ("down_proj", "wo", "c_proj")


@dataclass
class _IA3Module:
    """One PEFT IA3 vector: its module, whether it scales the input (feed-forward), its width, and the
    pemoe sites filling it: (adapter key prefix or None for ones, start, stop)."""

    path: str
    feedforward: bool
    width: int
    blocks: list[tuple[str | None, int, int]]

    @property
    def shape(self) -> tuple[int, int]:
        return (1, self.width) if self.feedforward else (self.width, 1)


def _down(model: nn.Module, mlp_path: str) -> str:
    mlp = model.get_submodule(mlp_path)
    for name in _DOWN_NAMES:
        if isinstance(getattr(mlp, name, None), nn.Module):
            return f"{mlp_path}.{name}"
    raise ValueError(f"{mlp_path} ({type(mlp).__name__}) has no down projection ({', '.join(_DOWN_NAMES)})")


def _ia3_layout(model: nn.Module, sites: dict) -> dict[str, _IA3Module]:
    """The PEFT IA3 vectors an injected MoV/(IA)3 model's sites map to, by module path."""
    out: dict[str, _IA3Module] = {}

    def add(path: str, ff: bool, width: int, block: tuple[str | None, int, int]) -> None:
        have = out.setdefault(path, _IA3Module(path, ff, width, []))
        if have.feedforward != ff:
            raise ValueError(f"{path} would be scaled on both its input and its output: PEFT's IA3 has one vector")
        have.blocks.append(block)

    for key, site in sites.items():
        layer = getattr(site.parent, site.attr)
        layer = getattr(layer, "base", layer)  # injected or not
        if site.kind == "mov_linear":
            width = out_features(layer)
            add(key, False, width, (key, 0, width))
        elif site.kind == "mov_packed":
            c_attn = key.rsplit(".", 1)[0]
            width = out_features(layer)
            part, i = width // len(site.parts), site.parts.index(site.part)
            add(c_attn, False, width, (key, i * part, (i + 1) * part))
        else:  # mov_ffn / mov_gated_mlp: the activation, i.e. the down projection's input
            mlp_path = key[: -len(".mov")]
            add(_down(model, mlp_path), True, site.width, (key, 0, site.width))
    return out


def _names(modules: list[str], feedforward: list[str], model: nn.Module) -> tuple[list[str], list[str]]:
    """The shortest module-path suffixes (in whole components, one length for all) naming exactly
    ``modules`` and, by PEFT's feed-forward rule (path ends with a name), exactly ``feedforward``."""
    paths = [p for p, _ in model.named_modules() if p]
    want, ff = set(modules), set(feedforward)
    longest = max(len(p.split(".")) for p in modules)
    for n in range(1, longest + 1):
        names = sorted({".".join(p.split(".")[-n:]) for p in want})
        ff_names = sorted({".".join(p.split(".")[-n:]) for p in ff})
        hit = {p for p in paths if any(p == t or p.endswith("." + t) for t in names)}
        ff_hit = {p for p in want if any(p.endswith(t) for t in ff_names)}
        if hit == want and ff_hit == ff:
            return names, ff_names
    return sorted(want), sorted(ff)  # pragma: no cover - full paths always name exactly themselves


def _task_type(model: nn.Module) -> str | None:
    if is_hf_t5(model) or is_pemoe_t5(model):
        return "SEQ_2_SEQ_LM"
    name = type(model).__name__
    return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else None


def _is_conv(model: nn.Module, path: str) -> bool:
    conv = conv1d_type()
    module = model.get_submodule(path)
    base = getattr(module, "base", module)
    base = getattr(base, "conv", base)
    return conv is not None and isinstance(base, conv)


def export_peft(model: nn.Module, folder: str | pathlib.Path) -> None:
    """Write the model's (IA)3 or LoRA adapter as a PEFT folder (``adapter_config.json`` +
    ``adapter_model.safetensors``) for ``peft.PeftModel.from_pretrained(base, folder)`` (layouts: the module
    docstring). Written whole or not at all, like :func:`pemoe.save_pretrained`.

    ValueError for MoV/MoLoRA with more than one expert (a mixture of experts has no PEFT form), a model
    without adapters or with merged ones.
    """
    from safetensors.torch import save_file

    state = require_unmerged(model, "export_peft")
    config = state["config"]
    if config.num_experts > 1:
        raise ValueError(
            f"export_peft: {type(config).__name__} with num_experts={config.num_experts} > 1 has no PEFT form (PEFT "
            "has no mixture of experts): only (IA)3 and LoRA (one expert) export; fold a sentence-routed mixture "
            "with pemoe.merge, or keep pemoe for inference"
        )
    params = {k: p.detach().to("cpu", torch.float32) for k, p in adapter_state_dict(model).items()}
    tensors: dict[str, torch.Tensor] = {}
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    common = {
        "task_type": _task_type(model),
        "base_model_name_or_path": name_or_path,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    if isinstance(config, MoLoRAConfig):
        modules = list(state["sites"])
        for key in modules:
            tensors[f"{PREFIX}{key}.lora_A.weight"] = params[f"{key}.lora_a"][0].t().contiguous()
            tensors[f"{PREFIX}{key}.lora_B.weight"] = params[f"{key}.lora_b"][0].t().contiguous()
        names, _ = _names(modules, [], model)
        peft_config = {
            "peft_type": "LORA",
            "r": config.rank,
            "lora_alpha": config.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "target_modules": names,
            "fan_in_fan_out": any(_is_conv(model, p) for p in modules),
            **common,
        }
    else:
        layout = _ia3_layout(model, state["sites"])
        for path, m in layout.items():
            v = torch.ones(m.width, dtype=torch.float32)
            for key, lo, hi in m.blocks:
                v[lo:hi] = params[f"{key}.experts"].reshape(-1)
            tensors[f"{PREFIX}{path}.ia3_l"] = v.reshape(m.shape).contiguous()
        modules = list(layout)
        ff = [p for p, m in layout.items() if m.feedforward]
        names, ff_names = _names(modules, ff, model)
        peft_config = {
            "peft_type": "IA3",
            "target_modules": names,
            "feedforward_modules": ff_names,
            "fan_in_fan_out": any(_is_conv(model, p) for p in modules),
            "init_ia3_weights": True,
            **common,
        }

    def write(tmp: pathlib.Path) -> None:
        import json

        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")

    _write_folder(pathlib.Path(folder), write, "export_peft")


# ---------------------------------------------------------------------------------------------
# import


def _read_peft(folder: pathlib.Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"PEFT folder {folder} does not exist (or is not a folder)")
    path = folder / CONFIG_NAME
    meta = _read_json(path)
    peft_type = meta.get("peft_type")
    if peft_type not in ("LORA", "IA3"):
        raise ValueError(
            f"{path}: peft_type {peft_type!r} is not supported: pemoe imports PEFT's 'LORA' and 'IA3' adapters"
        )
    refuse = {
        "use_dora": lambda v: bool(v),
        "rank_pattern": lambda v: bool(v),
        "alpha_pattern": lambda v: bool(v),
        "modules_to_save": lambda v: bool(v),
        "bias": lambda v: v not in (None, "none"),
        "layer_replication": lambda v: bool(v),
    }
    for field, bad in refuse.items():
        if field in meta and bad(meta[field]):
            raise ValueError(f"{path}: {field}={meta[field]!r} has no pemoe form (pemoe imports plain LoRA / IA3)")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file() and (folder / "adapter_model.bin").is_file():
        raise FileNotFoundError(f"{weights} does not exist (pemoe reads safetensors, not adapter_model.bin)")
    tensors = read_safetensors(weights)
    return meta, tensors


def _peft_modules(tensors: dict[str, torch.Tensor], params: tuple[str, ...], where: pathlib.Path) -> dict:
    """module path -> {param: tensor} from PEFT's keys; ValueError naming a key of another kind."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{where}: key {key!r} is not a PEFT adapter key (base_model.model.<path>.<param>)")
        rest = key[len(PREFIX) :]
        param = next((p for p in params if rest.endswith("." + p)), None)
        if param is None:
            raise ValueError(f"{where}: key {key!r} is not one of {list(params)}: pemoe cannot import it")
        out.setdefault(rest[: -len(param) - 1], {})[param] = t
    if not out:
        raise ValueError(f"{where} holds no adapter tensors")
    return out


def _check_paths(model: nn.Module, paths, where: pathlib.Path) -> None:
    have = {p for p, _ in model.named_modules()}
    missing = sorted(p for p in paths if p not in have)
    if missing:
        raise ValueError(
            f"{where}: PEFT targeted module(s) this model lacks: {missing[:4]} ({len(missing)} in all); "
            "pemoe has no site there"
        )


def _builtin_sites(model: nn.Module, lora: bool, cls: type, layout) -> tuple[str, ...] | None:
    """The built-in site names whose PEFT modules are exactly ``layout``'s (None: no such choice)."""
    chosen, covered = [], {}
    for name in cls.valid_sites:
        try:
            _, _, found = find_sites(model, lora=lora, sites=(name,))
        except (ValueError, TypeError):
            continue
        mods = layout(found)
        if mods is None or not mods:
            continue
        if all(covered.get(p, f) == f for p, f in mods.items()):
            chosen.append(name)
            covered.update(mods)
    return tuple(chosen) if chosen else None


def import_peft(
    model: nn.Module, folder: str | pathlib.Path, *, num_experts: int = 1, **config_fields: object
) -> AdapterConfig:
    """Inject ``model`` (bare: no pemoe adapters) with the config a PEFT LoRA or IA3 folder calls for and load
    its tensors; returns the config. All or nothing.

    ``num_experts`` > 1 upcycles: a MoLoRA (from a LoRA) or MoV (from an IA3) whose every expert is the PEFT
    adapter and whose routers are fresh, so it starts equal to the PEFT model. ``config_fields``: other
    fields of the config (``implementation``, ``top_k``, ``router_input``, …). Raises FileNotFoundError /
    ValueError naming a missing or damaged file, ValueError naming ``peft_type`` for a PEFT type pemoe does
    not have (AdaLoRA, LoHa, …), the field for a LoRA feature it does not have (DoRA, rank patterns,
    biases), or the modules it has no site for; the model is left unchanged.
    """
    folder = pathlib.Path(folder)
    if adapter_config(model) is not None:
        raise ValueError("import_peft: the model already has pemoe adapters; import into a bare model")
    meta, tensors = _read_peft(folder)
    where = folder / WEIGHTS_NAME
    lora = meta["peft_type"] == "LORA"
    modules = _peft_modules(tensors, ("lora_A.weight", "lora_B.weight") if lora else ("ia3_l",), where)
    _check_paths(model, modules, where)
    if lora:
        config, load = _lora_plan(model, meta, modules, num_experts, config_fields, folder)
    else:
        config, load = _ia3_plan(model, meta, modules, num_experts, config_fields, folder)
    undo = _apply(model, config)
    try:
        values = load(_require_injected(model)["sites"])
        params = adapter_state_dict(model)
        for key, v in values.items():
            if tuple(v.shape) != tuple(params[key].shape):
                raise ValueError(
                    f"{where}: {key} would get shape {list(v.shape)}, the model's is {list(params[key].shape)}"
                )
    except BaseException:
        undo()
        raise
    with torch.no_grad():
        for key, v in values.items():
            params[key].copy_(v.to(device=params[key].device))
    return adapter_config(model)


def _lora_plan(model, meta, modules, num_experts, fields, folder):
    where = folder / CONFIG_NAME
    r, alpha = meta.get("r"), meta.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{where}: r must be an int >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    if meta.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # PEFT's scaling lora_alpha / √r = pemoe's alpha / r
    for path, t in modules.items():
        if set(t) != {"lora_A.weight", "lora_B.weight"}:
            raise ValueError(f"{folder / WEIGHTS_NAME}: {path} lacks lora_A or lora_B")
        if t["lora_A.weight"].shape[0] != r or t["lora_B.weight"].shape[1] != r:
            raise ValueError(f"{folder / WEIGHTS_NAME}: {path}'s lora_A/lora_B are not of rank r={r}")
    paths = set(modules)
    sites = _builtin_sites(model, True, MoLoRAConfig, lambda found: {s.key: True for s in found if s.key in paths}
                           if all(s.key in paths for s in found) else None)  # fmt: skip
    covered = set()
    if sites is not None:
        covered = {s.key for name in sites for s in find_sites(model, lora=True, sites=(name,))[2]}
    placement = {"sites": sites} if covered == paths else {"target_modules": tuple(sorted(paths))}
    cls = LoRAConfig if num_experts == 1 else MoLoRAConfig
    extra = {} if num_experts == 1 else {"num_experts": num_experts}
    config = cls(rank=r, alpha=float(alpha), **placement, **extra, **fields)

    def load(sites_now) -> dict[str, torch.Tensor]:
        out = {}
        for key in sites_now:
            a = modules[key]["lora_A.weight"].to(torch.float32).t()  # [K, r]
            b = modules[key]["lora_B.weight"].to(torch.float32).t()  # [r, N]
            out[f"{key}.lora_a"] = a.unsqueeze(0).expand(num_experts, -1, -1)
            out[f"{key}.lora_b"] = b.unsqueeze(0).expand(num_experts, -1, -1)
        return out

    return config, load


def _feedforward(meta: dict, path: str) -> bool:
    ff = meta.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, path) is not None
    return any(path.endswith(t) for t in ff)


def _activation_target(model: nn.Module, down_path: str, where) -> str:
    """The MLP activation whose output a PEFT feed-forward IA3 on ``down_path``'s input scales."""
    mlp_path, _, attr = down_path.rpartition(".")
    mlp = model.get_submodule(mlp_path) if mlp_path else model
    kind = next((k for k in MODULE_KINDS if k.matches(mlp)), None)
    act = kind.activation if kind is not None else ("act" if is_hf_t5(model) and attr == "wo" else None)
    if act is None or attr not in _DOWN_NAMES:
        raise ValueError(
            f"{where}: PEFT scales the input of {down_path}, which pemoe has no site for (its FFN site scales an "
            "MLP's activation, the input of down_proj / wo / c_proj)"
        )
    return f"{mlp_path}.{act}"


def _ia3_plan(model, meta, modules, num_experts, fields, folder):
    where = folder / WEIGHTS_NAME
    want = {path: _feedforward(meta, path) for path in modules}
    vectors = {path: t["ia3_l"].to(torch.float32) for path, t in modules.items()}

    def layout_of(found) -> dict | None:
        try:
            lay = _ia3_layout(model, {s.key: s for s in found})
        except ValueError:
            return None
        ok = all(p in want and want[p] == m.feedforward for p, m in lay.items())
        return {p: m.feedforward for p, m in lay.items()} if ok else None

    sites = _builtin_sites(model, False, MoVConfig, layout_of)
    placement = None
    if sites is not None:
        found = find_sites(model, lora=False, sites=sites)[2]
        lay = _ia3_layout(model, {s.key: s for s in found})
        if set(lay) == set(want):
            # a packed layer's blocks with no pemoe site (GPT-2's q) must be PEFT's ones
            placement = {"sites": sites}
            for path, m in lay.items():
                v = vectors[path].reshape(-1)
                kept = torch.zeros(v.numel(), dtype=torch.bool)
                for _, lo, hi in m.blocks:
                    kept[lo:hi] = True
                if not torch.all(v[~kept] == 1):
                    placement = None
    if placement is None:
        targets = [_activation_target(model, p, where) if ff else p for p, ff in want.items()]
        placement = {"target_modules": tuple(targets)}
    cls = IA3Config if num_experts == 1 else MoVConfig
    config = cls(**placement, num_experts=num_experts, **fields)

    def load(sites_now) -> dict[str, torch.Tensor]:
        lay = _ia3_layout(model, sites_now)
        out = {}
        for path, m in lay.items():
            v = vectors.get(path)
            if v is None or tuple(v.shape) != m.shape:
                got = None if v is None else list(v.shape)
                raise ValueError(f"{where}: {path}.ia3_l has shape {got}, expected {list(m.shape)}")
            flat = v.reshape(-1)
            for key, lo, hi in m.blocks:
                experts = adapter_state_dict(model)[f"{key}.experts"]
                g, _, d = experts.shape
                out[f"{key}.experts"] = flat[lo:hi].reshape(g, 1, d).expand(g, num_experts, d)
        return out

    return config, load
