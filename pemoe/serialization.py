"""Adapter files: :func:`save_adapter` / :func:`load_adapter` (one safetensors file holding the adapter
tensors and the config as JSON metadata; written atomically, refused whole when they do not fit the model),
:func:`load_adapter_state_dict`, and the authors' (T5X) parameter names (:func:`authors_name`,
:func:`to_authors_state`, :func:`from_authors_state`; the table: :mod:`pemoe.adapters`).

A model holding an adapter bank (:mod:`pemoe.banks`) saves one of its adapters at a time:
``save_adapter(model, path, adapter=name)`` and ``save_pretrained(model, folder, adapter=name)`` write exactly
the file or folder a model holding only that adapter would write (the adapter's slice a of every stacked
parameter, under the same keys; the adapter's own config), so it loads into a single-adapter model or a bank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import uuid
from collections.abc import Callable

import torch
from torch import nn

from pemoe.config import AdapterConfig, MoVConfig, config_from_dict
from pemoe.injection import (
    _adapter_module,
    _apply,
    _require_injected,
    _site_parameters,
    adapter_config,
    adapter_state_dict,
    require_unmerged,
)

FORMAT_VERSION = "1"


def _config_for_compare(config: AdapterConfig) -> dict:
    d = config.to_dict()
    d.pop("implementation")  # a run-time choice, not part of the adapter's identity
    return d


def _saved_adapter(model: nn.Module, what: str, adapter: str | None) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """(config, tensors) that saving writes: the model's one adapter (``adapter`` None), or adapter ``adapter``
    of the model's bank. Tensors as written: detached, on the CPU, contiguous (float32 as trained).

    ValueError (before anything is written) for a bank without ``adapter``, a name the bank does not hold
    (naming it and listing the bank) or ``adapter`` given for a model holding one adapter; TypeError for a
    name that is not a str."""
    state = require_unmerged(model, what, bank_ok=True)
    bank = state.get("bank")
    if bank is None:
        if adapter is not None:
            raise ValueError(
                f"{what}: adapter={adapter!r} names an adapter of a bank, but the model holds one adapter (not a "
                "bank); call it without adapter="
            )
        return state["config"], {k: p.detach().to("cpu").contiguous() for k, p in adapter_state_dict(model).items()}
    names = bank["names"]
    if adapter is None:
        raise ValueError(
            f"{what}: the model holds an adapter bank {names}; name the adapter to save with adapter=<name>"
        )
    if not isinstance(adapter, str):
        raise TypeError(
            f"{what}: adapter must be the name (a str) of one of the bank's adapters {names}, got {adapter!r}"
        )
    if adapter not in names:
        raise ValueError(f"{what}: unknown adapter {adapter!r}; the bank holds {names}")
    i = names.index(adapter)
    tensors = {}
    for key, site in state["sites"].items():
        for name, p in _site_parameters(_adapter_module(model, site)).items():
            tensors[f"{key}.{name}"] = p.detach()[i].to("cpu").contiguous()
    return bank["configs"][adapter], tensors


def save_adapter(model: nn.Module, path: str | pathlib.Path, *, adapter: str | None = None) -> None:
    """Save the adapter parameters alone (safetensors, float32 as trained), config in the metadata.

    The file is written whole or not at all: to a temporary file beside ``path``, then renamed over it, so a
    failed save never leaves a half-written file (nor damages one already at ``path``). ``path`` must name a
    file in an existing folder: a missing folder raises ``FileNotFoundError``, a folder ``IsADirectoryError``.

    ``adapter``: for a model holding an adapter bank, the name of the adapter to save (required there); the
    file is the one a model holding only that adapter writes. An unknown name raises ValueError naming it and
    the bank's adapters, and nothing is written.
    """
    from safetensors.torch import save_file

    config, tensors = _saved_adapter(model, "save_adapter", adapter)
    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"save_adapter: {path} is a directory; give the path of a file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"save_adapter: the folder {path.parent} of {path} does not exist")
    state = _require_injected(model)
    metadata = {
        "format": "pt",
        "pemoe_format": FORMAT_VERSION,
        "pemoe_config": json.dumps(config.to_dict()),
        "pemoe_saved_from": state["model"],
    }
    # a unique name beside the target: the same file system, so the rename is atomic
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_adapter_file(path: str | pathlib.Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a :func:`save_adapter` file; ``ValueError`` naming the file if it is not one."""
    from safetensors import SafetensorError, safe_open

    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not an adapter file (give the path of a .safetensors file)")
    if not path.exists():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "pemoe_config" not in meta:
                raise ValueError(f"{path} is not a pemoe adapter file (no 'pemoe_config' in its safetensors metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged?): {e}") from e
    try:
        config = config_from_dict(json.loads(meta["pemoe_config"]))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: its 'pemoe_config' metadata is not a valid adapter config: {e}") from e
    return config, tensors


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> dict[str, nn.Parameter]:
    params = adapter_state_dict(model)
    missing, unexpected = [k for k in params if k not in tensors], [k for k in tensors if k not in params]
    if missing or unexpected:
        raise ValueError(
            f"{what} does not fit this model: {len(missing)} missing key(s) {missing[:4]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:4]}"
        )
    for k, p in params.items():
        if tuple(tensors[k].shape) != tuple(p.shape):
            raise ValueError(f"{what}: {k} has shape {list(tensors[k].shape)}, the model's is {list(p.shape)}")
    return params


def load_adapter(model: nn.Module, path: str | pathlib.Path) -> AdapterConfig:
    """Load adapters saved by :func:`save_adapter` into ``model`` (bit-exact copy); returns their config.

    A model without adapters is injected with the file's config first. A model with adapters must
    have the file's config (``implementation`` aside): mismatching fields, keys or shapes raise
    ValueError naming them, and the model is left unchanged.
    """
    saved, tensors = _read_adapter_file(path)
    undo = None
    current = adapter_config(model)
    if current is None:
        undo = _apply(model, dataclasses.replace(saved))
        current = adapter_config(model)
    try:
        a, b = _config_for_compare(saved), _config_for_compare(current)
        diff = [
            f"{k}: file {a.get(k)!r} vs model {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
        ]
        if diff:
            raise ValueError(f"adapter file {path} was saved for another adapter config: " + "; ".join(diff))
        params = _check_tensors(model, tensors, f"adapter file {path}")
    except BaseException:
        if undo is not None:
            undo()
        raise
    _copy(params, tensors)
    return current


def _copy(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k].to(device=p.device))


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (pemoe adapter keys, e.g. from :func:`from_authors_state`) into an injected model.

    Every adapter key must be present with the model's shape (ValueError naming the key otherwise;
    nothing is copied then)."""
    _copy(_check_tensors(model, state, "adapter state"), state)


# ---------------------------------------------------------------------------------------------
# the authors' (for-ai/parameter-efficient-moe, T5X/Flaxformer) parameter names

_STACK_RE = re.compile(
    r"^(?P<stack>encoder|decoder)\.block\.(?P<i>\d+)\.layer\.(?P<layer>\d+)\."
    r"(?P<module>SelfAttention|EncDecAttention|DenseReluDense)\.(?P<site>\w+)\.(?P<param>\w+)$"
)
_ATTN_MODULE = {"SelfAttention": "attention", "EncDecAttention": "encoder_decoder_attention"}
_LORA_CONV = {"q": "lora_q_conv", "k": "lora_k_conv", "v": "lora_v_conv", "o": "lora_output_conv"}
_LORA_MLP_CONV = {"wi_0": "lora_intermediate_conv", "wi": "lora_intermediate_conv", "wo": "lora_output_conv"}
_ROUTER = "router/router_weights/v/kernel"


def authors_name(key: str, config: AdapterConfig) -> str:
    """The authors' T5X parameter path of a pemoe adapter key (see the module docstring table)."""
    m = _STACK_RE.match(key)
    if m is None:
        raise ValueError(f"not a pemoe T5 adapter key: {key!r}")
    stack, i, module, site, param = m["stack"], m["i"], m["module"], m["site"], m["param"]
    if module == "DenseReluDense":
        scope = "mlp"
    elif stack == "decoder" and module == "SelfAttention":
        scope = "self_attention"
    else:
        scope = _ATTN_MODULE[module]
    base = f"target/{stack}/layers_{i}/{scope}"
    single = config.num_experts == 1
    if site in ("k", "v") and param in ("experts", "router") and isinstance(config, MoVConfig):
        conv = f"{base}/{site}_conv"
    elif site == "mov":
        conv = f"{base}/intermediate_conv"
    elif module == "DenseReluDense" and site in _LORA_MLP_CONV:
        conv = f"{base}/{_LORA_MLP_CONV[site]}"
    elif site in _LORA_CONV:
        conv = f"{base}/{_LORA_CONV[site]}"
    else:
        raise ValueError(f"no authors' name for {key!r} (site {site!r} is not one of the paper's sites)")
    if param == "router":
        return f"{conv}/{_ROUTER}"
    if param == "experts":
        return f"{conv}/{'ia3_scaling' if single else 'mov_scaling'}"
    return f"{conv}/{'lora_A' if param == 'lora_a' else 'lora_B'}"


def _authors_layout(key: str, t: torch.Tensor, config: AdapterConfig) -> torch.Tensor:
    """pemoe layout -> authors' layout (a view)."""
    single = config.num_experts == 1
    if key.endswith(".mov.experts"):  # [1, E, F] -> [E, F] (IA3: [F])
        return t[0, 0] if single else t[0]
    if key.endswith(".experts") and single:  # [G, 1, D] -> [G, D]
        return t[:, 0]
    if key.endswith((".lora_a", ".lora_b")) and single:  # LoRA has no expert axis
        return t[0]
    return t


def to_authors_state(state: dict[str, torch.Tensor], config: AdapterConfig) -> dict[str, torch.Tensor]:
    """pemoe adapter state (``adapter_state_dict`` / a saved file) -> the authors' names and layouts."""
    return {authors_name(k, config): _authors_layout(k, t, config) for k, t in state.items()}


def from_authors_state(
    authors: dict[str, torch.Tensor], model: nn.Module, *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """The authors' parameters -> pemoe keys and layouts for ``model`` (already injected), as float32.

    Load the result with :func:`load_adapter_state_dict`. With
    ``strict``, every adapter of the model must be found and no authors' key may be left over.
    """
    config = adapter_config(model)
    if config is None:
        raise ValueError("from_authors_state needs an injected model (its config and shapes decide the mapping)")
    out: dict[str, torch.Tensor] = {}
    used = set()
    for key, p in adapter_state_dict(model).items():
        name = authors_name(key, config)
        if name not in authors:
            if strict:
                raise ValueError(f"authors' parameters lack {name!r} (for {key})")
            continue
        used.add(name)
        t = torch.as_tensor(authors[name]).to(torch.float32)
        want_view = _authors_layout(key, p.detach(), config)
        if tuple(t.shape) != tuple(want_view.shape):
            raise ValueError(f"authors' {name} has shape {list(t.shape)}, expected {list(want_view.shape)} for {key}")
        out[key] = t.reshape(p.shape)
    if strict and (left := sorted(set(authors) - used)):
        raise ValueError(f"authors' parameters not used by this model's adapters: {left[:4]} ({len(left)} in all)")
    return out


# ---------------------------------------------------------------------------------------------
# adapter folders (adapter_config.json + adapter_model.safetensors, as PEFT lays them out)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def model_family(model: nn.Module) -> str:
    """The model family an adapter was placed on: ``"t5"`` for transformers' and pemoe's T5 (same site
    names), else the transformers ``config.model_type`` (``"llama"``, ``"qwen3"``, ``"gpt2"``, …), else the
    model's class name."""
    from pemoe.placements.t5 import is_hf_t5, is_pemoe_t5

    if is_pemoe_t5(model) or is_hf_t5(model):
        return "t5"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if isinstance(model_type, str) and model_type else type(model).__name__


def _folder_config(model: nn.Module, config: AdapterConfig) -> dict:
    state = _require_injected(model)
    return {
        "pemoe_format": FORMAT_VERSION,
        "config": config.to_dict(),
        "model_family": model_family(model),
        "saved_from": state["model"],
        "sites": list(state["sites"]),
    }


def _write_folder(target: pathlib.Path, write: Callable[[pathlib.Path], None], what: str) -> None:
    """Build a folder with ``write(tmp)`` in a temporary sibling of ``target``, then swap it in.

    A failure while writing leaves ``target`` as it was (the temporary folder is removed). Other entries
    of an existing ``target`` (not written by ``write``) are copied into the new folder before the swap, so
    they survive. The swap is two renames on one file system (old aside, new in, old removed); were the
    process killed between them, the previous folder is still whole under its ``.old`` name beside it.
    """
    target = pathlib.Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{what}: {target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{uuid.uuid4().hex}"
    tmp = target.with_name(f".{target.name}.{tag}.tmp")
    old = target.with_name(f".{target.name}.{tag}.old")
    try:
        tmp.mkdir()
        write(tmp)
        if target.is_dir():
            for entry in target.iterdir():
                dest = tmp / entry.name
                if dest.exists():
                    continue  # rewritten by this save
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, dest, symlinks=True)
                else:
                    shutil.copy2(entry, dest, follow_symlinks=False)
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(model: nn.Module, folder: str | pathlib.Path, *, adapter: str | None = None) -> None:
    """Save an injected model's adapters as a folder: ``adapter_config.json`` (the pemoe config, the format
    version, the model family and the site names it was saved from) and ``adapter_model.safetensors`` (the
    adapter tensors by pemoe's model-independent names, float32 as trained).

    The folder is written whole or not at all: built in a temporary sibling folder, then swapped in, so a
    failed save never leaves a half folder over a good one (other files in an existing folder are kept).
    Missing parent folders are created. Raises ValueError for a model without adapters or with merged ones.

    ``adapter``: for a model holding an adapter bank, the name of the adapter to save (required there); the
    folder is the one a model holding only that adapter writes. An unknown name raises ValueError naming it
    and the bank's adapters, and nothing is written.
    """
    from safetensors.torch import save_file

    config, tensors = _saved_adapter(model, "save_pretrained", adapter)
    meta = _folder_config(model, config)

    def write(tmp: pathlib.Path) -> None:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "pemoe_format": FORMAT_VERSION})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")

    _write_folder(pathlib.Path(folder), write, "save_pretrained")


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (damaged?): {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d


def read_safetensors(path: pathlib.Path, framework: str = "pt") -> dict:
    """Every tensor of the safetensors file ``path`` (``framework``: "pt" torch, "np" numpy); a missing file
    raises ``FileNotFoundError``, a truncated or damaged one ``ValueError``, both naming it."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework=framework) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged?): {e}") from e


def read_pretrained(folder: str | pathlib.Path) -> tuple[AdapterConfig, dict, dict[str, torch.Tensor]]:
    """(config, the folder's ``adapter_config.json``, tensors) of a :func:`save_pretrained` folder.

    FileNotFoundError names a missing folder or file; ValueError a damaged file, another format version or
    an invalid config."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist (or is not a folder)")
    path = folder / CONFIG_NAME
    meta = _read_json(path)
    if "peft_type" in meta and "pemoe_format" not in meta:
        raise ValueError(f"{path} is a PEFT adapter config (peft_type={meta['peft_type']!r}): use pemoe.import_peft")
    if meta.get("pemoe_format") != FORMAT_VERSION:
        raise ValueError(f"{path}: pemoe_format is {meta.get('pemoe_format')!r}, this pemoe reads {FORMAT_VERSION!r}")
    for field in ("config", "model_family", "sites"):
        if field not in meta:
            raise ValueError(f"{path} lacks the field {field!r}")
    try:
        config = config_from_dict(meta["config"])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: 'config' is not a valid adapter config: {e}") from e
    return config, meta, read_safetensors(folder / WEIGHTS_NAME)


def from_pretrained(model: nn.Module, folder: str | pathlib.Path) -> AdapterConfig:
    """Load a :func:`save_pretrained` folder into ``model`` (bit-exact); returns the config.

    A bare model (no pemoe adapters) is injected from the folder's config first, as PEFT's
    ``PeftModel.from_pretrained(base, folder)`` does; a model that already has adapters must have the
    folder's config (``implementation`` aside), and they are overwritten. All or nothing: a folder written
    for another method, expert count, rank (any other config field), model family or site list raises
    ValueError naming the field (a missing file FileNotFoundError, a damaged one ValueError, each naming
    the file), and the model is left unchanged.
    """
    saved, meta, tensors = read_pretrained(folder)
    path = pathlib.Path(folder) / CONFIG_NAME
    family = model_family(model)
    if meta["model_family"] != family:
        raise ValueError(f"{path}: model_family is {meta['model_family']!r}, the model's is {family!r}")
    undo = None
    current = adapter_config(model)
    if current is None:
        undo = _apply(model, dataclasses.replace(saved))
        current = adapter_config(model)
    else:
        require_unmerged(model, "from_pretrained")
    try:
        a, b = _config_for_compare(saved), _config_for_compare(current)
        diff = [
            f"{k}: folder {a.get(k)!r} vs model {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
        ]
        if diff:
            raise ValueError(f"{path} was saved for another adapter config: " + "; ".join(diff))
        sites = list(_require_injected(model)["sites"])
        if list(meta["sites"]) != sites:
            lacks = [s for s in meta["sites"] if s not in sites]
            extra = [s for s in sites if s not in meta["sites"]]
            raise ValueError(
                f"{path}: sites differ from the model's: the model lacks {len(lacks)} {lacks[:4]}, the folder "
                f"lacks {len(extra)} {extra[:4]}"
            )
        params = _check_tensors(model, tensors, f"adapter folder {folder} ({WEIGHTS_NAME})")
    except BaseException:
        if undo is not None:
            undo()
        raise
    _copy(params, tensors)
    return current
