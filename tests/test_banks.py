"""Adapter banks on a tiny Llama: several saved adapters in one model, one adapter (or the bare base) per
sequence, in forward and in generate (KV cache), add/remove one adapter, bad input.

Ground truth: each sequence run on its own through a model holding only its adapter (loaded from the same
file with pemoe.load_adapter), or through the bare base model for the name None. Tolerance: the rule of
tests/helpers.py (pemoe.testing.check_rule) with ``out`` the bank's float32 logits of the sequence, ``ref``
the single-adapter model's float32 logits and ``truth`` that model's float64 logits. Greedy tokens must be
equal.
"""

from __future__ import annotations

import copy
import functools
import json
import pathlib

import pytest
import torch

import pemoe
from pemoe.adapters import (
    MoLoRAConfig,
    MoVConfig,
    adapter_config,
    adapter_state_dict,
    inject,
    load_adapter,
    save_adapter,
    save_pretrained,
)
from pemoe.banks import BASE, adapter_batch, add_adapter, bank_names, load_adapters, remove_adapter
from tests.decoder_tiny import decoder, ids
from tests.helpers import assert_within_rule

CONFIGS = {
    "mov": MoVConfig(num_experts=3),
    "molora": MoLoRAConfig(num_experts=2, rank=4),
}
NAMES = ("support", "legal", "code")
GEN = dict(max_new_tokens=6, do_sample=False, num_beams=1, pad_token_id=0, eos_token_id=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save(tmp_path, method: str, name: str, seed: int, *, config=None, folder=False, build=None):
    """A saved adapter with random (non-initial) parameters on ``build()`` (the tiny Llama); returns its path."""
    model = (build or (lambda: decoder("llama")))()
    inject(model, config or CONFIGS[method])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.4)
    if folder:
        path = tmp_path / f"{method}-{name}-folder"
        save_pretrained(model, path)
    else:
        path = tmp_path / f"{method}-{name}.safetensors"
        save_adapter(model, path)
    return path


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    """method, {name: path} for three adapters (the second saved as a folder)."""
    tmp = tmp_path_factory.mktemp(request.param)
    paths = {n: _save(tmp, request.param, n, seed=i + 10, folder=i == 1) for i, n in enumerate(NAMES)}
    return request.param, paths


def _single(path, build=None) -> torch.nn.Module:
    """The tiny model (default: Llama) holding one adapter (or none), loaded from ``path``."""
    model = (build or (lambda: decoder("llama")))()
    if path is not None:
        if path.is_dir():
            pemoe.from_pretrained(model, path)
        else:
            load_adapter(model, path)
    return model


def _bank(paths, names=NAMES[:2]) -> torch.nn.Module:
    model = decoder("llama")
    assert load_adapters(model, {n: paths[n] for n in names}) == list(names)
    return model


def _stacked(model) -> dict[str, torch.Tensor]:
    return {f"{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _check_rows(bank_logits, names, x, paths, build=None, **inputs):
    """Each sequence's bank logits against its own adapter's model (float32 ref, float64 truth); ``inputs``:
    further per-sequence model inputs (batch first)."""
    for b, name in enumerate(names):
        single = _single(None if name in (None, BASE) else paths[name], build)
        row = {k: v[b : b + 1] for k, v in inputs.items()}
        with torch.no_grad():
            ref = single(x[b : b + 1], **row).logits
            truth = copy.deepcopy(single).double()(x[b : b + 1], **row).logits
        assert_within_rule(bank_logits[b : b + 1], ref, truth, torch.float32, f"sequence {b} ({name})")


def test_forward_equals_each_adapter_on_its_own_sequences(saved):
    method, paths = saved
    model = _bank(paths, NAMES)
    x = ids(model, batch=5, length=7)
    names = ["legal", None, "support", "legal", "code"]
    with torch.no_grad():
        logits = model(x, adapter_names=names).logits
        alone = model(x[:1], adapter_names=["legal"]).logits
    _check_rows(logits, names, x, paths)
    assert (logits[0] - logits[1]).abs().max() > 1e-3  # the adapter takes part
    torch.testing.assert_close(logits[:1], alone, rtol=1e-5, atol=1e-5)


def test_prefill_over_runs_equals_each_adapter_alone(saved, monkeypatch):
    """Prompts of at least RUN_MIN_MEAN_ROWS tokens (prefill): every site works on the sequences' runs of rows
    (adjacent sequences of one adapter, an adapter in non-adjacent runs, the bare base), not the sorted form."""
    from pemoe.ops import banked

    monkeypatch.setattr(banked, "RUN_MIN_MEAN_ELEMENTS", 0)  # the tiny model's rows are narrow
    method, paths = saved
    model = _bank(paths, NAMES)
    x = ids(model, seed=7, batch=6, length=banked.RUN_MIN_MEAN_ROWS + 3)
    names = ["legal", "legal", None, "code", "legal", None]
    taken = []

    def spy(fn):
        return lambda *a, **k: taken.append(1) or fn(*a, **k)

    for name in ("_runs_mov", "_runs_molora"):
        monkeypatch.setattr(banked, name, spy(getattr(banked, name)))
    for name in ("_segments_mov", "_segments_molora"):
        monkeypatch.setattr(banked, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} called"))
    with torch.no_grad():
        logits = model(x, adapter_names=names).logits
    assert taken
    _check_rows(logits, names, x, paths)


def test_generate_with_kv_cache_equals_each_adapter_alone(saved):
    method, paths = saved
    model = _bank(paths, NAMES)
    x = ids(model, seed=4, batch=4, length=5)
    names = ["code", "support", BASE, "code"]
    with torch.no_grad():
        out = model.generate(x, adapter_names=names, use_cache=True, **GEN)
        plain = model.generate(x, adapter_names=names, use_cache=False, **GEN)
    assert out.shape == (4, 5 + GEN["max_new_tokens"])
    assert out.tolist() == plain.tolist()
    for b, name in enumerate(names):
        single = _single(None if name == BASE else paths[name])
        with torch.no_grad():
            want = single.generate(x[b : b + 1], use_cache=True, **GEN)
        assert out[b].tolist() == want[0].tolist(), (b, name)


def test_sites_share_one_grouping_per_leading_shape(saved, monkeypatch):
    """The batch's per-token grouping (pemoe.ops.AdapterGroups) is built once per input leading shape and shared
    by every site, across generate's steps: no site checks or counts the ids on its own."""
    from pemoe import _checks

    _, paths = saved
    model = _bank(paths, NAMES)
    x = ids(model, seed=4, batch=4, length=5)
    names = ["code", "support", BASE, "code"]
    with torch.no_grad():
        want = model.generate(x, adapter_names=names, use_cache=True, **GEN)
    built = []
    build = pemoe.ops.AdapterGroups.from_sequences
    monkeypatch.setattr(
        pemoe.ops.AdapterGroups, "from_sequences", staticmethod(lambda *a, **k: built.append(a[1]) or build(*a, **k))
    )
    monkeypatch.setattr(_checks, "check_adapter_ids", lambda *a: pytest.fail("ids checked at a site"))
    with torch.no_grad():
        out = model.generate(x, adapter_names=names, use_cache=True, **GEN)
    assert out.tolist() == want.tolist()
    assert built == [(4, 5), (4, 1)]


def test_adapter_batch_context_equals_adapter_names(saved):
    _, paths = saved
    model = _bank(paths)
    x = ids(model, batch=3, length=6)
    names = ["support", "legal", None]
    with torch.no_grad():
        with adapter_batch(model, names):
            inside = model(x).logits
        given = model(x, adapter_names=names).logits
    torch.testing.assert_close(inside, given, rtol=0, atol=0)


def test_backward_reaches_only_the_named_adapters(saved):
    """Multi-task training in one batch: gradients flow to the adapters the batch names, not to the others."""
    _, paths = saved
    model = _bank(paths, NAMES)
    x = ids(model, batch=2, length=5)
    model(x, adapter_names=["code", None]).logits.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert all(torch.count_nonzero(g[:2]) == 0 for g in grads)  # support, legal: not in the batch
    assert any(torch.count_nonzero(g[2]) > 0 for g in grads)


def test_add_and_remove_one_adapter_leave_the_others(saved):
    _, paths = saved
    model = _bank(paths)
    x = ids(model, batch=2, length=6)
    before = _stacked(model)
    with torch.no_grad():
        support = model(x, adapter_names=["support", "support"]).logits
    assert add_adapter(model, "code", paths["code"]) == ["support", "legal", "code"]
    after = _stacked(model)
    for k, t in before.items():
        assert after[k].shape[0] == 3 and torch.equal(after[k][:2], t), k
    with torch.no_grad():
        code = model(x, adapter_names=["code", "code"]).logits
        torch.testing.assert_close(model(x, adapter_names=["support", "support"]).logits, support, rtol=0, atol=0)
    _check_rows(code, ["code", "code"], x, paths)

    assert remove_adapter(model, "legal") == ["support", "code"]
    removed = _stacked(model)
    for k, t in after.items():
        assert torch.equal(removed[k], t[[0, 2]]), k
    with torch.no_grad():
        torch.testing.assert_close(model(x, adapter_names=["code", "code"]).logits, code, rtol=0, atol=0)
        torch.testing.assert_close(model(x, adapter_names=["support", "support"]).logits, support, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# bad input: errors name the adapter; the bank (or the bare model) is unchanged


def _state(model):
    bank = getattr(model, "_pemoe_adapter", None)
    names = None if bank is None else list(bank["bank"]["names"])
    return names, {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(model, state):
    names, params = state
    now_names, now = _state(model)
    assert now_names == names
    assert list(now) == list(params)
    for n, t in params.items():
        assert torch.equal(now[n], t), n


def test_unknown_adapter_name(saved):
    _, paths = saved
    model = _bank(paths)
    x = ids(model, batch=2, length=4)
    with pytest.raises(ValueError, match=r"unknown adapter 'medical'.*\['support', 'legal'\]"):
        model(x, adapter_names=["support", "medical"])
    with pytest.raises(ValueError, match="unknown adapter 'medical'"):
        model.generate(x, adapter_names=["medical", None], **GEN)
    with pytest.raises(ValueError, match="remove_adapter: unknown adapter 'medical'"):
        remove_adapter(model, "medical")
    with pytest.raises(TypeError, match="one adapter name per sequence"):
        model(x, adapter_names="support")


def test_names_must_match_the_batch(saved):
    _, paths = saved
    model = _bank(paths)
    x = ids(model, batch=3, length=4)
    with pytest.raises(ValueError, match=r"adapter batch names 2 sequence\(s\).*shape \[3, 4, 64\]"):
        model(x, adapter_names=["support", "legal"])
    with pytest.raises(ValueError, match="holds an adapter bank: name one adapter per sequence"):
        model(x)


@pytest.mark.parametrize(
    "other,field",
    [
        (MoVConfig(num_experts=2), "num_experts"),
        (MoLoRAConfig(num_experts=2, rank=2), "rank"),
        (MoLoRAConfig(num_experts=3, rank=4), "num_experts"),
        ("method", "method"),
    ],
)
def test_adapters_of_another_structure_are_refused(saved, tmp_path, other, field):
    method, paths = saved
    if other == "method":  # the other method at the bank's expert count
        other = MoLoRAConfig(num_experts=3, rank=4) if method == "mov" else MoVConfig(num_experts=2)
    if _config_same(other, CONFIGS[method]):
        pytest.skip("same structure as the bank")
    bad = _save(tmp_path, method, "odd", seed=99, config=other)
    # into an existing bank: refused, bank unchanged
    model = _bank(paths)
    state = _state(model)
    with pytest.raises(ValueError, match=r"adapter 'odd' does not fit the bank"):
        add_adapter(model, "odd", bad)
    _assert_same(model, state)
    # in one load with fitting ones: all or nothing, the bare model stays bare
    bare = decoder("llama")
    state = _state(bare)
    with pytest.raises(ValueError, match=r"adapter 'odd' does not fit the bank"):
        load_adapters(bare, {"support": paths["support"], "odd": bad})
    _assert_same(bare, state)
    assert adapter_config(bare) is None


def _config_same(a, b):
    return type(a) is type(b) and a.to_dict() == b.to_dict()


def test_removing_an_adapter_a_running_batch_names(saved):
    _, paths = saved
    model = _bank(paths)
    state = _state(model)
    with adapter_batch(model, ["legal", None]):
        with pytest.raises(ValueError, match=r"adapter 'legal' is named by a running batch"):
            remove_adapter(model, "legal")
        _assert_same(model, state)
    assert remove_adapter(model, "legal") == ["support"]
    with pytest.raises(ValueError, match="'support' is the bank's only adapter"):
        remove_adapter(model, "support")


def test_a_running_batch_keeps_its_adapters_when_others_come_and_go(saved):
    """Inside adapter_batch, removing an adapter the batch does not name (an earlier index) or adding one
    re-indexes the batch: its sequences keep their own adapters (bitwise the same logits)."""
    _, paths = saved
    model = _bank(paths, names=NAMES)
    x = ids(model, batch=3, length=5)
    names = ["code", None, "legal"]
    with torch.no_grad(), adapter_batch(model, names):
        want = model(x).logits
        assert remove_adapter(model, "support") == ["legal", "code"]
        torch.testing.assert_close(model(x).logits, want, rtol=0, atol=0)
        assert add_adapter(model, "support", paths["support"]) == ["legal", "code", "support"]
        with adapter_batch(model, ["support", "support", "support"]):
            inner = model(x).logits
        torch.testing.assert_close(model(x).logits, want, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x, adapter_names=names).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(model(x, adapter_names=["support"] * 3).logits, inner, rtol=0, atol=0)


def test_names_and_files_checked_before_anything_changes(saved, tmp_path):
    _, paths = saved
    model = _bank(paths)
    state = _state(model)
    with pytest.raises(ValueError, match="'support' is already in the bank"):
        add_adapter(model, "support", paths["code"])
    with pytest.raises(ValueError, match="reserved for the bare base model"):
        add_adapter(model, BASE, paths["code"])
    with pytest.raises(FileNotFoundError, match="adapter 'gone'"):
        add_adapter(model, "gone", tmp_path / "gone.safetensors")
    _assert_same(model, state)
    assert bank_names(model) == ["support", "legal"]
    with pytest.raises(ValueError, match="holds an adapter bank"):
        save_adapter(model, tmp_path / "bank.safetensors")
    with pytest.raises(ValueError, match="already holds one pemoe adapter"):
        load_adapters(_single(paths["support"]), {"legal": paths["legal"]})


# ---------------------------------------------------------------------------------------------
# other families: GPT-2 (MoV on the packed c_attn, Conv1D linears) and Qwen2 (q/k/v biases)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_other_decoder_families(tmp_path, family, method):
    build = functools.partial(decoder, family)
    paths = {n: _save(tmp_path, method, n, seed=i + 20, build=build) for i, n in enumerate(NAMES[:2])}
    model = build()
    load_adapters(model, paths)
    x = ids(model, batch=3, length=6)
    names = ["legal", "support", None]
    with torch.no_grad():
        logits = model(x, adapter_names=names).logits
    _check_rows(logits, names, x, paths, build)


# ---------------------------------------------------------------------------------------------
# T5 (encoder-decoder): transformers' model and pemoe's own


@pytest.mark.parametrize("impl", ["hf", "pemoe"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_t5_forward_and_generate(tmp_path, impl, method):
    from tests.t5_tiny import batch, hf_t5, pemoe_t5

    build = functools.partial(hf_t5 if impl == "hf" else pemoe_t5, "v1.1")
    paths = {n: _save(tmp_path, method, n, seed=i + 30, build=build) for i, n in enumerate(NAMES[:2])}
    model = build()
    load_adapters(model, paths)
    src, mask, dec, _ = batch(batch_size=3)
    names = ["support", None, "legal"]
    with torch.no_grad():
        logits = model(src, attention_mask=mask, decoder_input_ids=dec, adapter_names=names).logits
    _check_rows(logits, names, src, paths, build, attention_mask=mask, decoder_input_ids=dec)
    kwargs = dict(max_new_tokens=5) if impl == "pemoe" else dict(max_new_tokens=5, do_sample=False, num_beams=1)
    with torch.no_grad():
        out = model.generate(src, attention_mask=mask, adapter_names=names, **kwargs)
    for b, name in enumerate(names):
        single = _single(None if name is None else paths[name], build)
        with torch.no_grad():
            want = single.generate(src[b : b + 1], attention_mask=mask[b : b + 1], **kwargs)
        assert out[b, : want.shape[1]].tolist() == want[0].tolist(), (b, name)


def test_sentence_routed_bank(tmp_path):
    """Sentence routing in a bank: each sequence's router vector goes through its own adapter's routers."""
    config = MoVConfig(num_experts=3, router_input="sentence")
    paths = {n: _save(tmp_path, "mov", n, seed=i + 40, config=config) for i, n in enumerate(NAMES[:2])}
    model = decoder("llama")
    load_adapters(model, paths)
    x = ids(model, batch=3, length=5)
    vectors = torch.randn(3, model.config.hidden_size)
    names = ["legal", "support", "legal"]
    with torch.no_grad(), pemoe.sentence_routing(model, vectors):
        logits = model(x, adapter_names=names).logits
    for b, name in enumerate(names):
        single = _single(paths[name])
        with torch.no_grad():
            with pemoe.sentence_routing(single, vectors[b : b + 1]):
                ref = single(x[b : b + 1]).logits
            double = copy.deepcopy(single).double()
            with pemoe.sentence_routing(double, vectors[b : b + 1].double()):
                truth = double(x[b : b + 1]).logits
        assert_within_rule(logits[b : b + 1], ref, truth, torch.float32, f"sequence {b} ({name})")


def test_a_copy_of_a_bank_runs_itself(saved):
    """copy.deepcopy of a bank's model (e.g. a float64 twin) keeps adapter_names, bound to the copy."""
    _, paths = saved
    model = _bank(paths)
    twin = copy.deepcopy(model).double()
    x = ids(model, batch=2, length=5)
    names = ["legal", "support"]
    with torch.no_grad():
        out = twin(x, adapter_names=names).logits
        assert out.dtype == torch.float64
        torch.testing.assert_close(out.float(), model(x, adapter_names=names).logits, rtol=1e-4, atol=1e-4)
        for p in twin.parameters():
            p.zero_()
        assert torch.count_nonzero(twin(x, adapter_names=names).logits) == 0
        assert torch.count_nonzero(model(x, adapter_names=names).logits) > 0


# ---------------------------------------------------------------------------------------------
# saving one adapter out of a bank


def _content(path) -> dict:
    """What a saved adapter file or folder holds: {file name: its metadata and tensors (safetensors; the header's
    metadata order is not fixed, so the bytes are not compared) or its JSON}."""
    from safetensors import safe_open

    out = {}
    for f in sorted(path.iterdir()) if path.is_dir() else [path]:
        if f.suffix == ".json":
            out[f.name] = json.loads(f.read_text())
        else:
            with safe_open(str(f), framework="pt") as g:
                out[f.name] = (g.metadata(), {k: g.get_tensor(k) for k in g.keys()})
    return out


def _assert_same_content(got, want, what: str) -> None:
    a, b = _content(got), _content(want)
    if got.is_dir():
        assert list(a) == list(b), what
    assert len(a) == len(b) == (2 if got.is_dir() else 1), what
    for x, y in zip(a.values(), b.values(), strict=True):
        if isinstance(x, tuple):
            assert x[0] == y[0], what  # metadata: the config, the format, the model it was saved from
            assert list(x[1]) == list(y[1]), what
            assert all(t.dtype == y[1][k].dtype and torch.equal(t, y[1][k]) for k, t in x[1].items()), what
        else:
            assert x == y, what


def test_saving_one_adapter_of_a_bank_writes_its_own_file(saved, tmp_path):
    """Every adapter of a bank, saved alone (file and folder), holds what the model holding only that adapter
    writes and what the original save holds (metadata and JSON equal, tensors bitwise); loaded into a fresh
    single-adapter model it gives that model's logits bitwise (the same parameters, the same computation),
    and the bank's rows agree with it under the tolerance rule. Indices shift after remove_adapter: saving
    still picks the named adapter."""
    method, paths = saved
    model = _bank(paths, NAMES)
    x = ids(model, batch=3, length=6)
    new_paths = {}
    for name in NAMES:
        single = _single(paths[name])
        file, folder = tmp_path / f"{name}.safetensors", tmp_path / f"{name}-folder"
        save_adapter(model, file, adapter=name)
        save_pretrained(model, folder, adapter=name)
        want_file, want_folder = tmp_path / f"{name}-single.safetensors", tmp_path / f"{name}-single-folder"
        save_adapter(single, want_file)
        save_pretrained(single, want_folder)
        _assert_same_content(file, want_file, name)
        _assert_same_content(folder, want_folder, name)
        _assert_same_content(folder if paths[name].is_dir() else file, paths[name], name)
        with torch.no_grad():
            want = single(x).logits
            for path in (file, folder):
                assert torch.equal(_single(path)(x).logits, want), (name, path.name)
        new_paths[name] = file
    names = ["code", "support", "legal"]
    with torch.no_grad():
        logits = model(x, adapter_names=names).logits
    _check_rows(logits, names, x, new_paths)
    # the saved files make the same bank again, bit for bit
    stacked, again = _stacked(model), _stacked(_bank(new_paths, NAMES))
    assert list(again) == list(stacked) and all(torch.equal(again[k], v) for k, v in stacked.items())
    remove_adapter(model, "support")
    save_adapter(model, tmp_path / "code-after.safetensors", adapter="code")
    _assert_same_content(tmp_path / "code-after.safetensors", paths["code"], "code after remove_adapter")


def test_saving_keeps_each_adapters_implementation(tmp_path):
    """The bank runs with the first adapter's implementation; saving an adapter writes its own config (the
    run-time implementation it was saved with), as the model holding only it would."""
    paths = {
        "support": _save(tmp_path, "mov", "support", seed=1),
        "legal": _save(tmp_path, "mov", "legal", seed=2, config=MoVConfig(num_experts=3, implementation="reference")),
    }
    model = _bank(paths)
    for name in NAMES[:2]:
        out = tmp_path / f"{name}-out.safetensors"
        save_adapter(model, out, adapter=name)
        _assert_same_content(out, paths[name], name)
    assert adapter_config(_single(tmp_path / "legal-out.safetensors")).implementation == "reference"


def test_saving_an_unknown_adapter_writes_nothing(saved, tmp_path):
    _, paths = saved
    model = _bank(paths)
    target = tmp_path / "kept.safetensors"
    target.write_bytes(b"old")
    folder = tmp_path / "folder"
    before = sorted(p.name for p in tmp_path.iterdir())
    for save, path in ((save_adapter, target), (save_pretrained, folder)):
        with pytest.raises(ValueError, match=r"unknown adapter 'medical'; the bank holds \['support', 'legal'\]"):
            save(model, path, adapter="medical")
        with pytest.raises(ValueError, match=r"holds an adapter bank \['support', 'legal'\]; name the adapter"):
            save(model, path)
        with pytest.raises(TypeError, match="adapter must be the name"):
            save(model, path, adapter=0)
        with pytest.raises(ValueError, match="adapter='support' names an adapter of a bank, but the model holds one"):
            save(_single(paths["support"]), path, adapter="support")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no folder, no temporary file left
    assert target.read_bytes() == b"old"


def test_a_failed_write_of_one_adapter_leaves_the_target(saved, tmp_path, monkeypatch):
    import safetensors.torch

    _, paths = saved
    model = _bank(paths)
    target = tmp_path / "kept.safetensors"
    target.write_bytes(b"old")

    def failing_save(tensors, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, target, adapter="legal")
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "folder", adapter="legal")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.safetensors"]
    assert target.read_bytes() == b"old"
