"""pemoe.models.t5_jax: the functional JAX T5 against pemoe's torch T5 (float32), with and without adapters.

Tolerance: max|logits_jax − logits_torch| ≤ 1e-4 · max(1, max|logits_torch|). Adapter parameters are
randomised (non-identity experts, strong routers, nonzero lora_b), and each adapter case also checks that
the adapters move the logits far beyond that tolerance, so a JAX forward that skipped a site would fail.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pemoe
from pemoe.adapters import adapter_config
from pemoe.models import T5Config
from pemoe.models.t5_jax import params_from_state_dict, params_from_torch, t5_logits
from tests import t5_tiny

KINDS = ("v1.1", "v1.0")


def _randomise_adapters(model: torch.nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("experts"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("router"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("lora_b"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _torch_logits(model, ids, mask, dec) -> np.ndarray:
    with torch.no_grad():
        return model(ids, attention_mask=mask, decoder_input_ids=dec).logits.numpy()


def _jax_logits(params, config, ids, mask, dec, adapter=None, implementation="xla") -> np.ndarray:
    out = t5_logits(
        params, config, jnp.asarray(ids.numpy()), jnp.asarray(dec.numpy()), jnp.asarray(mask.numpy()),
        implementation=implementation, adapter=adapter,
    )  # fmt: skip
    return np.asarray(out)


def _assert_close(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape and got.dtype == np.float32
    tol = 1e-4 * max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol, f"max|jax − torch| = {err:.3g} > {tol:.3g}"
    return tol


ADAPTERS = {
    "none": None,
    "mov": pemoe.MoVConfig(num_experts=3),
    "mov_top2": pemoe.MoVConfig(num_experts=4, top_k=2, renormalize=True),
    "molora": pemoe.MoLoRAConfig(num_experts=3, rank=2, alpha=4.0),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_logits_match_torch(kind: str, adapter: str) -> None:
    model = t5_tiny.pemoe_t5(kind)
    ids, mask, dec, _ = t5_tiny.batch()
    base = _torch_logits(model, ids, mask, dec)
    if ADAPTERS[adapter] is not None:
        pemoe.inject(model, ADAPTERS[adapter])
        _randomise_adapters(model)
    want = _torch_logits(model, ids, mask, dec)
    params = params_from_torch(model)
    if adapter == "molora":  # every default site, both FFN projections included
        ffn_in = "wi_0" if kind == "v1.1" else "wi"
        assert f"decoder.block.1.layer.2.DenseReluDense.{ffn_in}.lora_b" in params
        assert "encoder.block.0.layer.0.SelfAttention.o.lora_a" in params
    if adapter.startswith("mov"):
        assert "decoder.block.0.layer.2.DenseReluDense.mov.experts" in params
        assert "decoder.block.0.layer.1.EncDecAttention.v.router" in params
    got = _jax_logits(params, model.config, ids, mask, dec, adapter=adapter_config(model))
    tol = _assert_close(got, want)
    if ADAPTERS[adapter] is not None:
        assert np.abs(want - base).max() > 100 * tol, "the adapters barely change the logits: the test is too weak"


@pytest.mark.parametrize("kind", KINDS)
def test_reference_implementation_and_hf_state_dict(kind: str) -> None:
    """implementation='reference' at the sites, and params made from transformers' own state dict."""
    hf = t5_tiny.hf_t5(kind)
    ids, mask, dec, _ = t5_tiny.batch(seed=3)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.numpy()
    config = T5Config.from_hf(hf.config)
    _assert_close(_jax_logits(params_from_state_dict(hf.state_dict()), config, ids, mask, dec), want)

    model = t5_tiny.pemoe_t5(kind)
    pemoe.inject(model, ADAPTERS["mov"])
    _randomise_adapters(model, seed=11)
    params = params_from_torch(model)
    want = _torch_logits(model, ids, mask, dec)
    _assert_close(_jax_logits(params, model.config, ids, mask, dec, adapter_config(model), "reference"), want)

    # under jax.jit, config and adapter closed over (static)
    run = jax.jit(functools.partial(t5_logits, config=model.config, adapter=adapter_config(model)))
    got = run(params, input_ids=jnp.asarray(ids.numpy()), decoder_input_ids=jnp.asarray(dec.numpy()),
              attention_mask=jnp.asarray(mask.numpy()))  # fmt: skip
    _assert_close(np.asarray(got), want)


def test_missing_or_wrong_parameter_names_raise() -> None:
    model = t5_tiny.pemoe_t5("v1.1")
    ids, mask, dec, _ = t5_tiny.batch()
    params = params_from_torch(model)
    name = "decoder.block.1.layer.1.EncDecAttention.k.weight"

    missing = dict(params)
    del missing[name]
    with pytest.raises(KeyError, match=name):
        _jax_logits(missing, model.config, ids, mask, dec)

    renamed = dict(missing)
    renamed["decoder.block.1.layer.1.EncDecAttention.key.weight"] = params[name]
    with pytest.raises(KeyError, match=name):
        _jax_logits(renamed, model.config, ids, mask, dec)

    extra = dict(params)
    extra["encoder.block.0.layer.0.SelfAttention.q.lora_z"] = params[name]
    with pytest.raises(ValueError, match=r"q\.lora_z"):
        _jax_logits(extra, model.config, ids, mask, dec)

    pemoe.inject(model, ADAPTERS["molora"])
    with pytest.raises(ValueError, match="adapter="):
        _jax_logits(params_from_torch(model), model.config, ids, mask, dec, adapter=None)


@pytest.mark.parametrize("adapter", ["mov", "molora"])
def test_adapter_bank_matches_the_torch_bank(adapter: str, tmp_path) -> None:
    """A torch T5 holding a bank of two adapters: its params (stacked [A, ...]) and one adapter index per
    sequence give the torch bank's logits (adapter_names), under jax.jit with the ids traced; each sequence's
    adapter moves its logits well beyond the tolerance."""
    paths = {}
    for i, name in enumerate(("support", "legal")):
        single = t5_tiny.pemoe_t5("v1.1")
        pemoe.inject(single, ADAPTERS[adapter])
        _randomise_adapters(single, seed=20 + i)
        paths[name] = tmp_path / f"{name}.safetensors"
        pemoe.save_adapter(single, paths[name])
    model = t5_tiny.pemoe_t5("v1.1")
    pemoe.load_adapters(model, paths)
    ids, mask, dec, _ = t5_tiny.batch()
    names = ["legal", None, "support"]
    with torch.no_grad():
        want = model(ids, attention_mask=mask, decoder_input_ids=dec, adapter_names=names).logits.numpy()
        base = model(ids, attention_mask=mask, decoder_input_ids=dec, adapter_names=[None] * 3).logits.numpy()
    params = params_from_torch(model)
    assert params["encoder.block.0.layer.0.SelfAttention.v.lora_a" if adapter == "molora" else
                  "encoder.block.0.layer.0.SelfAttention.v.experts"].shape[0] == 2  # fmt: skip
    run = jax.jit(functools.partial(t5_logits, config=model.config, adapter=adapter_config(model)))
    got = run(params, input_ids=jnp.asarray(ids.numpy()), decoder_input_ids=jnp.asarray(dec.numpy()),
              attention_mask=jnp.asarray(mask.numpy()), adapter_ids=jnp.asarray([1, -1, 0], jnp.int32))  # fmt: skip
    tol = _assert_close(np.asarray(got), want)
    for b in (0, 2):
        assert np.abs(want[b] - base[b]).max() > 100 * tol, "the adapters barely change the logits"
    with pytest.raises(ValueError, match=r"adapter_ids must have shape \[B\] = \[3\]"):
        t5_logits(params, model.config, jnp.asarray(ids.numpy()), jnp.asarray(dec.numpy()),
                  adapter=adapter_config(model), adapter_ids=jnp.asarray([0, 1], jnp.int32))  # fmt: skip
    with pytest.raises(ValueError, match=r"outside \[-1, 2\)"):
        t5_logits(params, model.config, jnp.asarray(ids.numpy()), jnp.asarray(dec.numpy()),
                  adapter=adapter_config(model), adapter_ids=jnp.asarray([0, 2, 1], jnp.int32))  # fmt: skip
