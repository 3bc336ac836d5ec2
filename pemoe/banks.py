"""Adapter banks: several saved adapters of one method and structure in one model, served in one batch.

    names = pemoe.load_adapters(model, {"support": "support.safetensors", "legal": "legal_folder/"})
    logits = model(input_ids, adapter_names=["support", "legal", None]).logits   # one name per sequence
    out = model.generate(input_ids, adapter_names=["legal", "legal", "support"], max_new_tokens=20)
    with pemoe.adapter_batch(model, ["support", None, "legal"]):                  # the same, for any code
        loss = model(**batch).loss

Each site's adapter parameters are stacked along a leading adapter axis A, in the order the adapters were
added (MoV experts [A, G, E, D], routers [A, D, E]; MoLoRA lora_a [A, E, K, r], lora_b [A, E, r, N], routers
[A, K, E]), and the layers run the ops with ``adapter_ids`` (:mod:`pemoe.ops.banked`): every token uses its
sequence's adapter, so the batch is the same computation as running each adapter's sequences on their own.
The name ``None`` (or :data:`BASE`) means the bare base model for that sequence.

The adapters of a bank must share the config (method, expert count, rank, alpha, sites, routing; only
``implementation`` may differ, a run-time choice) and the model family; a file or folder that does not fit
is refused with an error naming the adapter, and the bank is left as it was. :func:`add_adapter` and
:func:`remove_adapter` change one adapter without touching the others' parameters (the stacked tensors are
rebuilt, so an optimizer holding the old ones must be rebuilt too). ``pemoe.save_adapter(model, path,
adapter=name)`` (and ``save_pretrained``) saves one adapter of the bank as the file or folder a model holding
only that adapter writes.

How the names reach the layers: :func:`adapter_batch` sets one adapter index per sequence on every site for
the duration of a ``with`` block (the layers broadcast it over the sequence's tokens, so a batch of B
sequences must reach every site with batch dimension B, prefill and cached decoding alike). A bank's model
gets ``forward`` and ``generate`` wrappers that take ``adapter_names=`` and run the call inside
:func:`adapter_batch`; every forward call ``generate`` makes (with the KV cache) runs inside it. A banked
model called with no names raises ValueError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import pathlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from pemoe.config import AdapterConfig
from pemoe.injection import _adapter_module, _apply, _require_injected, adapter_config, require_unmerged
from pemoe.layers import BankBatch, MoVLinear
from pemoe.serialization import _config_for_compare, _read_adapter_file, model_family, read_pretrained

__all__ = ["BASE", "load_adapters", "add_adapter", "remove_adapter", "bank_names", "adapter_batch"]

#: The name (besides None) of "no adapter": the sequence runs on the bare base model. Not an adapter name.
BASE = "__base__"


def _is_base(name: object) -> bool:
    return name is None or name == BASE


def _bank(model: nn.Module, what: str) -> dict:
    state = require_unmerged(model, what, bank_ok=True)
    bank = state.get("bank")
    if bank is None:
        raise ValueError(f"{what}: the model holds no adapter bank; load one with pemoe.load_adapters(model, {{...}})")
    return bank


def bank_names(model: nn.Module) -> list[str]:
    """The bank's adapter names, in the order of the stacked axis A (index a is adapter ``bank_names[a]``)."""
    return list(_bank(model, "bank_names")["names"])


def _slots(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Adapter key (``<site>.<param>``, as in saved files) -> (the module holding the parameter, its name)."""
    out = {}
    for key, site in _require_injected(model)["sites"].items():
        module = _adapter_module(model, site)
        owner = module.site if isinstance(module, MoVLinear) else module
        for name in module._adapter_param_names:
            if getattr(owner, name, None) is not None:
                out[f"{key}.{name}"] = (owner, name)
    return out


def _read(name: str, path: str | pathlib.Path, family: str) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config and tensors of adapter ``name``: a :func:`pemoe.save_adapter` file or a
    :func:`pemoe.save_pretrained` folder (whose model family must be ``family``); errors name the adapter."""
    try:
        if pathlib.Path(path).is_dir():
            config, meta, tensors = read_pretrained(path)
            if meta["model_family"] != family:
                raise ValueError(f"{path} was saved from a {meta['model_family']!r} model, this one is {family!r}")
            return config, tensors
        return _read_adapter_file(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"adapter {name!r}: {e}") from e
    except ValueError as e:
        raise ValueError(f"adapter {name!r}: {e}") from e


def _check_name(name: object, taken: Sequence[str]) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"adapter names must be non-empty strings, got {name!r}")
    if name == BASE:
        raise ValueError(f"{BASE!r} is reserved for the bare base model; choose another adapter name")
    if name in taken:
        raise ValueError(f"adapter {name!r} is already in the bank (names: {list(taken)})")


def _fit(name: str, config: AdapterConfig, tensors: dict, want: AdapterConfig, shapes: dict) -> None:
    """ValueError naming adapter ``name`` when its config or tensors differ from the bank's."""
    a, b = _config_for_compare(config), _config_for_compare(want)
    diff = [
        f"{k}: {name!r} has {a.get(k)!r}, the bank {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    if diff:
        raise ValueError(f"adapter {name!r} does not fit the bank (another method or structure): " + "; ".join(diff))
    missing, unexpected = [k for k in shapes if k not in tensors], [k for k in tensors if k not in shapes]
    if missing or unexpected:
        raise ValueError(
            f"adapter {name!r} does not fit the bank's sites: {len(missing)} missing key(s) {missing[:4]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:4]}"
        )
    for k, shape in shapes.items():
        if tuple(tensors[k].shape) != shape:
            raise ValueError(f"adapter {name!r}: {k} has shape {list(tensors[k].shape)}, the bank's is {list(shape)}")


def _set_stacked(slots: dict[str, tuple[nn.Module, str]], stacked: dict[str, torch.Tensor]) -> None:
    """Put the stacked tensors in place of the sites' parameters (nothing here can fail half-way)."""
    for key, (owner, attr) in slots.items():
        old = getattr(owner, attr)
        setattr(owner, attr, nn.Parameter(stacked[key], requires_grad=old.requires_grad))
        owner.banked = True


def load_adapters(model: nn.Module, adapters: Mapping[str, str | pathlib.Path]) -> list[str]:
    """Load saved adapters (``{name: file or folder}``) into ``model`` as a bank; returns the bank's names.

    A bare model is injected from the first adapter's config; a model with a bank gets the adapters added
    after its own (as :func:`add_adapter`). Every adapter must have the bank's config (``implementation``
    aside) and sites: otherwise ValueError naming the adapter and the differing field (FileNotFoundError for
    a missing file), and the model is left unchanged. Loading is all or nothing. A model holding one
    (non-bank) adapter is refused: load the bank on a bare backbone.
    """
    if not isinstance(adapters, Mapping) or not adapters:
        raise TypeError(f"adapters must be a non-empty mapping of name -> file or folder, got {adapters!r}")
    state = getattr(model, "_pemoe_adapter", None)
    bank = None if state is None else state.get("bank")
    if state is not None and bank is None:
        raise ValueError(
            "load_adapters: the model already holds one pemoe adapter (not a bank); load the bank on a bare backbone"
        )
    taken = [] if bank is None else list(bank["names"])
    for name in adapters:
        _check_name(name, taken)
        taken.append(name)
    family = model_family(model)
    read = {name: _read(name, path, family) for name, path in adapters.items()}
    undo = None
    if bank is None:
        first = next(iter(read.values()))[0]
        undo = _apply(model, dataclasses.replace(first))
    try:
        slots = _slots(model)
        if bank is None:
            shapes = {k: tuple(getattr(o, a).shape) for k, (o, a) in slots.items()}
            current = []
        else:
            shapes, current = bank["shapes"], list(bank["names"])
        want = adapter_config(model)
        for name, (config, tensors) in read.items():
            _fit(name, config, tensors, want, shapes)
        stacked = {}
        for key, (owner, attr) in slots.items():
            p = getattr(owner, attr)
            new = [read[n][1][key].to(device=p.device, dtype=p.dtype) for n in read]
            stacked[key] = torch.cat([p.detach(), torch.stack(new)]) if current else torch.stack(new)
    except BaseException:
        if undo is not None:
            undo()
        raise
    # each adapter's own config (the bank's, with the adapter's run-time ``implementation``): what saving it
    # alone writes (pemoe.save_adapter(model, path, adapter=name))
    configs = {n: dataclasses.replace(want, implementation=read[n][0].implementation) for n in read}
    _set_stacked(slots, stacked)
    state = _require_injected(model)
    if bank is None:
        state["bank"] = {"names": list(read), "shapes": shapes, "active": [], "configs": configs}
        _install_entry_points(model)
    else:
        bank["names"].extend(read)
        bank["configs"].update(configs)
        _rebind_running(bank)
    return list(state["bank"]["names"])


def _rebind_running(bank: dict) -> None:
    """Point every running :func:`adapter_batch` at the bank's current indices and size (in place: nested
    batches restore the same objects), after an adapter was added or removed while it runs."""
    known = bank["names"]
    for names, batch in bank.get("running", []):
        batch.rebind([-1 if _is_base(n) else known.index(n) for n in names], len(known))


def add_adapter(model: nn.Module, name: str, path: str | pathlib.Path) -> list[str]:
    """Add one saved adapter to the model's bank (a new last index; the others keep theirs and their values).
    Same checks as :func:`load_adapters`; returns the bank's names."""
    _bank(model, "add_adapter")
    return load_adapters(model, {name: path})


def remove_adapter(model: nn.Module, name: str) -> list[str]:
    """Remove adapter ``name`` from the bank (the adapters after it move down one index); returns the names.

    ValueError naming it when it is not in the bank, when a running batch (:func:`adapter_batch`) names it,
    or when it is the bank's last adapter; the bank is then unchanged."""
    bank = _bank(model, "remove_adapter")
    names = bank["names"]
    if name not in names:
        raise ValueError(f"remove_adapter: unknown adapter {name!r}; the bank holds {names}")
    running = [batch for batch in bank["active"] if name in batch]
    if running:
        raise ValueError(
            f"remove_adapter: adapter {name!r} is named by a running batch {list(running[0])}; remove it after the "
            "batch ends"
        )
    if len(names) == 1:
        raise ValueError(f"remove_adapter: {name!r} is the bank's only adapter; a bank holds at least one")
    i = names.index(name)
    slots = _slots(model)
    stacked = {}
    for key, (owner, attr) in slots.items():
        p = getattr(owner, attr).detach()
        stacked[key] = torch.cat([p[:i], p[i + 1 :]])
    _set_stacked(slots, stacked)
    names.pop(i)
    bank["configs"].pop(name)
    _rebind_running(bank)
    return list(names)


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Run the bank's model on a batch with one adapter per sequence: ``names[b]`` for sequence b (None or
    :data:`BASE`: the bare base model). Every site broadcasts its sequence's adapter over the sequence's
    tokens, in every forward call inside the block (``generate``'s cached decoding steps too).

    ValueError naming an unknown adapter (nothing is set then); batches may nest (the inner one applies
    inside it). While the block runs, :func:`remove_adapter` refuses the adapters it names; adding or removing
    another adapter re-indexes the running batch, so its sequences keep their adapters.
    """
    bank = _bank(model, "adapter_batch")
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or len(names) == 0:
        raise TypeError(f"adapter_names must be a non-empty list with one adapter name per sequence, got {names!r}")
    known = bank["names"]
    unknown = [n for n in names if not _is_base(n) and n not in known]
    if unknown:
        raise ValueError(
            f"unknown adapter {unknown[0]!r} in adapter_names; the bank holds {known} (None or {BASE!r}: the base)"
        )
    slots = _slots(model)
    owners = list({id(o): o for o, _ in slots.values()}.values())
    device = getattr(*next(iter(slots.values()))).device
    ids = BankBatch([-1 if _is_base(n) else known.index(n) for n in names], len(known), device)
    previous = [o._bank_ids for o in owners]
    batch = tuple(n for n in names if not _is_base(n))
    running = (list(names), ids)
    bank["active"].append(batch)
    bank.setdefault("running", []).append(running)
    for o in owners:
        o._bank_ids = ids
    try:
        yield
    finally:
        for o, p in zip(owners, previous, strict=True):
            o._bank_ids = p
        bank["active"].remove(batch)
        bank["running"].remove(running)


def _call_with_names(model: nn.Module, method: str, *args, adapter_names=None, **kwargs):
    """``type(model).<method>(model, ...)``, inside :func:`adapter_batch` when ``adapter_names`` is given."""
    call = getattr(type(model), method)
    if adapter_names is None:
        return call(model, *args, **kwargs)
    with adapter_batch(model, adapter_names):
        return call(model, *args, **kwargs)


def _install_entry_points(model: nn.Module) -> None:
    """Give ``model.forward`` and ``model.generate`` (where it has one) an ``adapter_names=`` keyword that runs
    the call inside :func:`adapter_batch`: instance attributes over the class's methods, partials of
    :func:`_call_with_names` bound to the model (so ``copy.deepcopy`` and pickling carry them to the copy,
    bound to the copy), showing the methods' own signatures (transformers inspects ``forward``'s)."""
    for method in ("forward", "generate"):
        if getattr(type(model), method, None) is None:
            continue
        wrapper = functools.partial(_call_with_names, model, method)
        wrapper.__signature__ = inspect.signature(getattr(model, method))
        wrapper.__doc__ = getattr(type(model), method).__doc__
        setattr(model, method, wrapper)
