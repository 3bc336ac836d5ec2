"""pemoe's T5 against transformers' T5: logits, loss, greedy generations, weight loading.

Tolerance (float32): v1.0 (ReLU) logits must be bit-identical to transformers' eager attention
(its forward with use_cache=False).
v1.1 uses gelu_new, which pemoe computes as torch's tanh-GELU while transformers spells the same
formula out (different rounding, ~1 ulp per activation): with transformers' activation swapped for
torch's tanh-GELU the logits must again be bit-identical; unswapped they must agree to
max|Δ| ≤ 1e-5·max(1, max|logits|).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pemoe.models import T5, T5Config
from pemoe.models.t5 import relative_position_bucket
from tests.t5_tiny import DIMS, KINDS, batch, hf_t5, pemoe_t5


class TanhGelu(nn.Module):
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


def _hf_logits(hf, ids, mask, dec):
    # use_cache=False: transformers' forward with its (unused) cache objects differs from its own
    # cacheless forward by ~1e-6 (tensor layouts change the GEMM rounding); cacheless is the plain math.
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_transformers(kind):
    hf = hf_t5(kind)
    model = T5.from_hf(hf).eval()
    ids, mask, dec, labels = batch()
    want = _hf_logits(hf, ids, mask, dec)
    with torch.no_grad():
        got = model(ids, mask, dec).logits
    assert got.shape == want.shape == (3, 7, DIMS["vocab_size"])
    if kind == "v1.0":
        assert torch.equal(got, want)
    else:
        scale = max(1.0, want.abs().max().item())
        assert (got - want).abs().max().item() <= 1e-5 * scale
        for m in hf.modules():
            if hasattr(m, "act") and hasattr(m, "wi_0"):
                m.act = TanhGelu()
        assert torch.equal(got, _hf_logits(hf, ids, mask, dec))
    # the loss from labels (decoder inputs = labels shifted right) matches too
    labels[0, -2:] = -100
    with torch.no_grad():
        hf_loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss = model(ids, mask, labels=labels).loss
    torch.testing.assert_close(loss, hf_loss, rtol=1e-6, atol=0)


def test_decoder_depth_and_padding_mask_matter():
    # a deeper decoder than encoder loads and matches; and the padding mask is really used
    hf = hf_t5("v1.0", num_decoder_layers=3)
    model = T5.from_hf(hf).eval()
    assert len(model.decoder.block) == 3 and len(model.encoder.block) == 2
    ids, mask, dec, _ = batch()
    with torch.no_grad():
        got = model(ids, mask, dec).logits
        unmasked = model(ids, None, dec).logits
    assert torch.equal(got, _hf_logits(hf, ids, mask, dec))
    assert not torch.equal(got[1], unmasked[1]) and torch.equal(got[0], unmasked[0])


@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_generation_matches_transformers(kind):
    hf = hf_t5(kind, seed=3)
    model = T5.from_hf(hf).eval()
    ids, mask, _, _ = batch(seed=4)
    want = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=9,
        do_sample=False,
        num_beams=1,
        decoder_start_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    got = model.generate(ids, mask, max_new_tokens=9)
    assert got.tolist() == want.tolist()
    assert model.generate(ids, mask, max_new_tokens=9, use_cache=False).tolist() == want.tolist()


def test_generation_stops_at_eos_and_pads():
    model = pemoe_t5("v1.0", seed=5)
    ids, mask, _, _ = batch(seed=6)
    first = model.generate(ids, mask, max_new_tokens=1)[:, 1]
    model.config.eos_token_id = int(first[0])  # row 0 now ends at its first token
    out = model.generate(ids, mask, max_new_tokens=6)
    assert out[0, 1].item() == model.config.eos_token_id
    assert (out[0, 2:] == model.config.pad_token_id).all()
    assert out.shape[1] <= 7 and (out[:, 0] == model.config.decoder_start_token_id).all()


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention as HFAttention

    rel = torch.arange(-300, 301)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 16), (6, 20)):
            want = HFAttention._relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
            )
            got = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
            assert torch.equal(got, want), (bidirectional, buckets, distance)


def test_config_from_transformers():
    from transformers import T5Config as HFConfig

    v11 = T5Config.from_hf(HFConfig(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_heads=6))
    assert v11.is_gated and v11.activation == "gelu_new" and not v11.tie_word_embeddings and v11.num_heads == 6
    v10 = T5Config.from_hf(HFConfig())
    assert not v10.is_gated and v10.activation == "relu" and v10.tie_word_embeddings
    assert v10.num_decoder_layers == v10.num_layers == 6
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="swish")
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        T5Config(d_model=0)


def test_loads_safetensors_file_and_state_dict(tmp_path):
    from safetensors.torch import save_file

    hf = hf_t5("v1.1", seed=2)
    sd = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    model = T5(T5Config.from_hf(hf.config))
    model.load_hf_state_dict(tmp_path / "model.safetensors")
    ids, mask, dec, _ = batch()
    ref = T5.from_hf(hf).eval()
    with torch.no_grad():
        assert torch.equal(model.eval()(ids, mask, dec).logits, ref(ids, mask, dec).logits)
    # only the embedding under its encoder alias is enough; the untied head is required
    del sd["shared.weight"], sd["decoder.embed_tokens.weight"]
    T5(T5Config.from_hf(hf.config)).load_hf_state_dict(sd)
    with pytest.raises(ValueError, match="no lm_head.weight"):
        T5(T5Config.from_hf(hf.config)).load_hf_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"})


def test_state_dict_mismatches_are_named():
    hf = hf_t5("v1.0")
    sd = dict(hf.state_dict())
    model = T5(T5Config.from_hf(hf.config))
    with pytest.raises(ValueError, match=r"missing \['encoder.block.1.layer.1.DenseReluDense.wo.weight'\]"):
        model.load_hf_state_dict(
            {k: v for k, v in sd.items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"}
        )
    bad = dict(sd, **{"encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"SelfAttention.k.weight has shape \[3, 3\], the config needs \[32, 32\]"):
        model.load_hf_state_dict(bad)
    with pytest.raises(ValueError, match="different from the embedding"):
        model.load_hf_state_dict(dict(sd, **{"lm_head.weight": torch.randn(64, 32)}))
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        model.load_hf_state_dict(dict(sd, **{"extra.weight": torch.zeros(1)}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_forward(dtype):
    model = pemoe_t5("v1.1")
    ids, mask, dec, _ = batch()
    with torch.no_grad():
        ref = model(ids, mask, dec).logits
        low = model.to(dtype)(ids, mask, dec).logits
    assert low.dtype == dtype and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() <= 0.1 * ref.abs().max()
    assert model.generate(ids, mask, max_new_tokens=3).shape[0] == 3
