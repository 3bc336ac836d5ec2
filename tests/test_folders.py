"""Adapter folders: pemoe.save_pretrained / pemoe.from_pretrained (adapter_config.json + adapter_model.safetensors).

Bit-exact round trips (into a bare model, which is injected from the folder, and into an injected one), the
folder written whole or not at all (a save that fails half-way leaves the previous folder byte for byte), and
every refusal (another method, expert count, rank, model family, missing sites, missing or damaged files)
naming the field or file with the model unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pemoe
from pemoe.adapters import (
    IA3Config,
    LoRAConfig,
    MoLoRAConfig,
    MoVConfig,
    adapter_config,
    adapter_state_dict,
    from_pretrained,
    inject,
    save_pretrained,
)
from tests.decoder_tiny import decoder, ids
from tests.helpers import assert_model_unchanged, snapshot_model
from tests.t5_tiny import batch, hf_t5, pemoe_t5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


CASES = {
    "llama-MoV-3": (lambda: decoder("llama"), MoVConfig(num_experts=3)),
    "gpt2-IA3": (lambda: decoder("gpt2"), IA3Config()),
    "qwen3-MoLoRA-sentence": (lambda: decoder("qwen3"), MoLoRAConfig(num_experts=2, rank=2, router_input="sentence")),
    "t5-LoRA": (lambda: hf_t5("v1.1"), LoRAConfig(rank=2, alpha=8)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("into", ["bare", "injected"])
def test_round_trip_is_bit_exact(tmp_path, case, into):
    make, config = CASES[case]
    model = make()
    inject(model, config)
    _randomize(model)
    save_pretrained(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["config"]["method"] == config.method and meta["config"]["num_experts"] == config.num_experts
    assert meta["model_family"] == case.split("-")[0]
    assert meta["sites"] == list(dict.fromkeys(k.rsplit(".", 1)[0] for k in adapter_state_dict(model)))
    assert meta["pemoe_format"] == pemoe.adapters.FORMAT_VERSION

    other = make()
    if into == "injected":
        inject(other, config)
    got = from_pretrained(other, tmp_path / "adapter")
    assert got == adapter_config(model)
    ours, theirs = adapter_state_dict(model), adapter_state_dict(other)
    assert list(ours) == list(theirs)
    for k in ours:
        assert theirs[k].dtype == ours[k].dtype and torch.equal(theirs[k], ours[k]), k
        assert theirs[k].requires_grad
    assert not any(p.requires_grad for n, p in other.named_parameters() if all(p is not q for q in theirs.values()))


def test_round_trip_between_pemoe_and_transformers_t5(tmp_path):
    """Same family, same site names: a folder from transformers' T5 loads into pemoe's T5 with equal logits."""
    hf = hf_t5("v1.0", seed=3)
    inject(hf, MoVConfig(num_experts=2, implementation="torch"))
    _randomize(hf)
    save_pretrained(hf, tmp_path / "a")
    ours = pemoe_t5("v1.0", seed=3)
    from_pretrained(ours, tmp_path / "a")
    ids_, mask, dec, _ = batch()
    with torch.no_grad():
        a = hf(input_ids=ids_, attention_mask=mask, decoder_input_ids=dec).logits
        b = ours(input_ids=ids_, attention_mask=mask, decoder_input_ids=dec).logits
    assert (a - b).abs().max() < 1e-4


def test_a_failed_save_leaves_the_previous_folder_whole(tmp_path, monkeypatch):
    import safetensors.torch

    model = decoder("llama")
    inject(model, IA3Config())
    _randomize(model, seed=1)
    folder = tmp_path / "adapter"
    save_pretrained(model, folder)
    (folder / "README.md").write_text("kept")  # a file of the user's: survives a later save
    before = _files(folder)

    real = safetensors.torch.save_file

    def half_then_fail(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 17)  # a half-written file
        raise OSError("disk full")

    _randomize(model, seed=2)
    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, folder)
    assert _files(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary sibling left

    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

    monkeypatch.setattr(safetensors.torch, "save_file", real)
    save_pretrained(model, folder)  # a good save replaces the adapter and keeps the user's file
    after = _files(folder)
    assert after["README.md"] == b"kept" and after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    bare = decoder("llama")
    from_pretrained(bare, folder)
    for k, p in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(bare)[k], p)


def _saved(tmp_path, make, config, name="a"):
    model = make()
    inject(model, config)
    _randomize(model)
    save_pretrained(model, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    "saved, loaded, field",
    [
        (MoVConfig(num_experts=3), MoLoRAConfig(num_experts=3), "method"),
        (MoVConfig(num_experts=3), MoVConfig(num_experts=4), "num_experts"),
        (LoRAConfig(rank=2), LoRAConfig(rank=4), "rank"),
        (IA3Config(sites=("k", "v")), IA3Config(), "sites"),
    ],
)
def test_a_folder_for_another_config_is_refused(tmp_path, saved, loaded, field):
    folder = _saved(tmp_path, lambda: decoder("llama"), saved)
    model = decoder("llama")
    inject(model, loaded)
    snap = snapshot_model(model)
    with pytest.raises(ValueError, match=rf"{field}: folder"):
        from_pretrained(model, folder)
    assert_model_unchanged(model, snap)


def test_a_folder_for_another_family_or_missing_sites_is_refused(tmp_path):
    folder = _saved(tmp_path, lambda: decoder("llama"), IA3Config())
    qwen = decoder("qwen2")  # the same site names and shapes: only the family tells them apart
    snap = snapshot_model(qwen)
    with pytest.raises(ValueError, match=r"model_family is 'llama', the model's is 'qwen2'"):
        from_pretrained(qwen, folder)
    assert_model_unchanged(qwen, snap)
    assert adapter_config(qwen) is None

    short = decoder("llama")  # one layer fewer: the folder's second layer has no site here
    short.model.layers = nn.ModuleList(list(short.model.layers)[:1])
    snap = snapshot_model(short)
    with pytest.raises(ValueError, match=r"sites differ .* the model lacks 3 \['model\.layers\.1"):
        from_pretrained(short, folder)
    assert_model_unchanged(short, snap)
    inject(short, IA3Config())
    snap = snapshot_model(short)
    with pytest.raises(ValueError, match=r"sites differ"):
        from_pretrained(short, folder)
    assert_model_unchanged(short, snap)


def test_missing_and_damaged_files_are_named(tmp_path):
    folder = _saved(tmp_path, lambda: decoder("gpt2"), IA3Config())
    model = decoder("gpt2")
    snap = snapshot_model(model)

    with pytest.raises(FileNotFoundError, match="nowhere"):
        from_pretrained(model, tmp_path / "nowhere")
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    data, text = weights.read_bytes(), config.read_text()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is not a readable safetensors"):
        from_pretrained(model, folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        from_pretrained(model, folder)
    weights.write_bytes(data)

    config.write_text(text[:-20])
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        from_pretrained(model, folder)
    meta = json.loads(text)
    config.write_text(json.dumps({**meta, "pemoe_format": "99"}))
    with pytest.raises(ValueError, match=r"pemoe_format is '99'"):
        from_pretrained(model, folder)
    config.write_text(json.dumps({**meta, "config": {**meta["config"], "num_experts": 0}}))
    with pytest.raises(ValueError, match=r"'config' is not a valid adapter config.*num_experts"):
        from_pretrained(model, folder)
    config.write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(ValueError, match=r"PEFT adapter config.*import_peft"):
        from_pretrained(model, folder)
    config.unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        from_pretrained(model, folder)
    assert_model_unchanged(model, snap)
    assert adapter_config(model) is None


def test_saving_needs_unmerged_adapters_and_a_folder_path(tmp_path):
    model = decoder("llama")
    with pytest.raises(ValueError, match="no pemoe adapters"):
        save_pretrained(model, tmp_path / "a")
    inject(model, IA3Config())
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        save_pretrained(model, tmp_path / "file")
    pemoe.merge(model)
    with pytest.raises(ValueError, match="merged.*unmerge"):
        save_pretrained(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    pemoe.unmerge(model)
    save_pretrained(model, tmp_path / "deep" / "er" / "a")  # parents are created, as PEFT does
    assert (tmp_path / "deep" / "er" / "a" / "adapter_config.json").is_file()


def test_loaded_model_computes_what_the_saved_one_did(tmp_path):
    model = decoder("llama")
    inject(model, MoLoRAConfig(num_experts=3, rank=2, implementation="torch"))
    _randomize(model)
    save_pretrained(model, tmp_path / "a")
    other = decoder("llama")
    from_pretrained(other, tmp_path / "a")
    x = ids(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, other(x).logits)
