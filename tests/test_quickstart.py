"""The README's "Fine-tune a Llama with MoV in a few lines" block, run as written on a tiny local Llama.

The block is read from README.md (between the ``quickstart`` markers) and executed with one substitution: the
model name becomes a folder holding a random 2-layer Llama and a byte-level tokenizer (no downloads). Checked:
the training loss falls, and the fresh base loaded from the saved folder gives the trained model's logits and
greedy tokens exactly.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAME = '"meta-llama/Llama-3.2-1B"'


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _snippet() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart:begin -->\n```python\n(.*?)```\n<!-- quickstart:end -->", text, re.S)
    assert block is not None, "README.md lost its quickstart block"
    code = block.group(1)
    assert code.count(NAME) == 1
    return code


def byte_level_llama(folder: pathlib.Path) -> pathlib.Path:
    """A random tiny Llama (grouped-query attention) with a byte-level BPE tokenizer without merges (one token
    per byte, plus <s> and </s>; <s> put before every text, as Llama's tokenizer does), saved as a transformers
    folder."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])  # as Llama's
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab),
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def test_readme_quickstart_runs_on_a_tiny_llama(tmp_path, monkeypatch):
    folder = byte_level_llama(tmp_path / "tiny-llama")
    monkeypatch.chdir(tmp_path)  # the block writes under out/
    namespace: dict = {}
    exec(compile(_snippet().replace(NAME, repr(str(folder))), "README.md quickstart", "exec"), namespace)
    losses = [h["loss"] for h in namespace["trainer"].state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert (tmp_path / "out" / "llama-mov" / "adapter" / "adapter_config.json").is_file()
    model, base, ids = namespace["model"].eval(), namespace["base"].eval(), namespace["ids"]
    assert ids.shape[1] > 3 and ids[0, 0].item() == 0  # the prompt's bytes behind <s>
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    assert torch.equal(model.generate(ids, max_new_tokens=4), base.generate(ids, max_new_tokens=4))
    fresh = type(base).from_pretrained(str(folder)).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(ids).logits, base(ids).logits)  # the adapter changed the model
