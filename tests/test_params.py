"""``pemoe params``: trainable-parameter counts on T5 v1.1 and decoder-only LLMs against SPEC §2's formulas
(computed here independently from the public dimensions), the paper's percentages and the public model sizes."""

from __future__ import annotations

import pytest

from pemoe.cli import main
from pemoe.params import DECODERS, METHODS, MODELS, T5_V1_1, format_table, parameter_table

# google/t5-v1_1-{size}: d_model, d_kv, d_ff, heads, layers per stack (vocab 32128, 32 buckets)
DIMS = {
    "small": (512, 64, 1024, 6, 8),
    "base": (768, 64, 2048, 12, 12),
    "large": (1024, 64, 2816, 16, 24),
    "xl": (2048, 64, 5120, 32, 24),
    "xxl": (4096, 64, 10240, 64, 24),
}
VOCAB = 32128


def expected(size: str, method: str) -> int:
    d, dkv, f, heads, layers = DIMS[size]
    m = heads * dkv  # attention width M (512 vs 384 for small)
    if method == "(IA)3":
        return layers * (6 * m + 2 * f)
    if method.startswith("MoV-"):
        e = int(method[4:])
        return layers * e * (6 * m + 6 * dkv + 4 * f)
    r = 4
    # per layer index: 3 attentions (q, k, v: d -> M; o: M -> d) and 2 FFNs (wi_0: d -> F; wo: F -> d)
    lora = 3 * 4 * r * (d + m) + 2 * 2 * r * (d + f)
    if method == "LoRA r=4":
        return layers * lora
    e = int(method.split("-")[1])
    routers = 3 * (3 * d + m) * e + 2 * (d + f) * e  # each router reads its site's input
    return layers * (e * lora + routers)


# published config.json: hidden, layers, heads, kv heads, head_dim, intermediate, vocab (untied heads)
DECODER_DIMS = {
    "llama-3-8b": (4096, 32, 32, 8, 128, 14336, 128256),  # meta-llama/Meta-Llama-3-8B
    "qwen3-8b": (4096, 36, 32, 8, 128, 12288, 151936),  # Qwen/Qwen3-8B
    "mistral-7b": (4096, 32, 32, 8, 128, 14336, 32000),  # mistralai/Mistral-7B-v0.1
}
# their parameter counts as published (transformers' num_parameters())
DECODER_TOTALS = {"llama-3-8b": 8_030_261_248, "qwen3-8b": 8_190_735_360, "mistral-7b": 7_241_732_096}


def expected_decoder(model: str, method: str) -> int:
    """SPEC §2, decoder-only table: MoV on k, v (G = kv heads of head_dim) and act(gate_proj x) [F];
    LoRA / MoLoRA on q, k, v, o, gate, up, down, each adding r·(in + out), each router [in, E]."""
    h, layers, heads, kv_heads, hd, f, _ = DECODER_DIMS[model]
    q, kv = heads * hd, kv_heads * hd
    if method == "(IA)3":
        return layers * (2 * kv + f)
    if method.startswith("MoV-"):
        e = int(method[4:])
        return layers * e * (2 * kv + 2 * hd + 2 * f)  # experts + routers [hd, E] (k, v) and [F, E] (FFN)
    r = 4
    ins_outs = [(h, q), (h, kv), (h, kv), (q, h), (h, f), (h, f), (f, h)]
    lora = sum(r * (i + o) for i, o in ins_outs)
    if method == "LoRA r=4":
        return layers * lora
    e = int(method.split("-")[1])
    return layers * e * (lora + sum(i for i, _ in ins_outs))


def base_total(size: str) -> int:
    d, dkv, f, heads, layers = DIMS[size]
    m = heads * dkv
    encoder_layer = 4 * d * m + 3 * d * f + 2 * d
    decoder_layer = 8 * d * m + 3 * d * f + 3 * d
    return 2 * VOCAB * d + layers * (encoder_layer + decoder_layer) + 2 * 32 * heads + 2 * d


@pytest.fixture(scope="module")
def table():
    return {(r.size, r.method): r for r in parameter_table()}


def test_table_covers_every_size_and_method(table):
    assert set(table) == {(s, m) for s in MODELS for m in METHODS}
    assert MODELS == [*T5_V1_1, *DECODERS] and set(DECODERS) == set(DECODER_DIMS)
    assert list(METHODS) == ["(IA)3", "MoV-10", "MoV-30", "MoV-60", "LoRA r=4", "MoLoRA-2", "MoLoRA-10", "MoLoRA-15"]


def test_counts_match_the_formulas(table):
    for (size, method), row in table.items():
        if size in DECODERS:
            assert row.trainable == expected_decoder(size, method), (size, method)
            assert row.base_total == DECODER_TOTALS[size], size
        else:
            assert row.trainable == expected(size, method), (size, method)
            assert row.base_total == base_total(size), size


def test_decoder_figures(table):
    # (IA)3 on Llama-3-8B: 32 layers x (2 x 1024 + 14336) = 524,288 vectors' entries, 0.0065% of 8.03B
    assert table["llama-3-8b", "(IA)3"].trainable == 524_288
    assert table["llama-3-8b", "(IA)3"].percent == pytest.approx(0.00653, abs=1e-5)
    # GQA: k and v have 8 heads of 128, so MoV-E grows by E x 32 x (2 x 1024 + 2 x 128 + 2 x 14336)
    assert table["mistral-7b", "MoV-10"].trainable == 10 * 32 * (2048 + 256 + 28672)


def test_base_sizes_are_the_public_ones(table):
    # transformers' num_parameters() of google/t5-v1_1-*: shared embedding once, untied lm_head
    assert table["small", "(IA)3"].base_total == 76_961_152
    assert table["xl", "(IA)3"].base_total == 2_849_757_184
    assert 11.1e9 < table["xxl", "(IA)3"].base_total < 11.2e9


def test_paper_figures(table):
    # SPEC §2: (IA)3 on XL ≈ 0.018–0.019% (paper: 0.018%); MoV-60 on XXL ≈ 0.86% (paper: 0.86%)
    assert 0.018 <= table["xl", "(IA)3"].percent <= 0.0195
    assert table["xxl", "MoV-60"].percent == pytest.approx(0.86, abs=0.015)


def test_cli_prints_the_table(capsys):
    assert main(["params", "--sizes", "small,xl", "--methods", "(IA)3,MoV-60"]) == 0
    out = capsys.readouterr().out
    assert "| method | T5 v1.1 small (77.0M) | T5 v1.1 xl (2.85B) |" in out
    assert f"| (IA)3 | {expected('small', '(IA)3'):,} (" in out
    assert f"{expected('xl', 'MoV-60'):,} (1.6752%)" in out
    assert main(["params", "--sizes", "small,llama-3-8b,qwen3-8b", "--methods", "LoRA r=4"]) == 0
    out = capsys.readouterr().out
    assert "| method | T5 v1.1 small (77.0M) | Llama-3-8B (8.03B) | Qwen3-8B (8.19B) |" in out
    assert f"| {expected_decoder('llama-3-8b', 'LoRA r=4'):,} (" in out
    rows = parameter_table(["small"], ["LoRA r=4"])
    assert format_table(rows).splitlines()[2].startswith(f"| LoRA r=4 | {expected('small', 'LoRA r=4'):,} (")


def test_cli_rejects_unknown_sizes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["params", "--sizes", "huge"])
    assert e.value.code == 2
    assert "valid sizes: small, base, large, xl, xxl" in capsys.readouterr().err
