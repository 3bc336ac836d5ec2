"""pemoe train / eval on causal LMs: encoding, scoring, bit-exact resume, SIGINT, folders, bad input."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from pemoe import adapters
from pemoe.cli import main
from pemoe.train.data import Example
from pemoe.train.evaluate import score_choices
from pemoe.train.loop import TrainConfig, _prepare, build_model, latest_checkpoint, train
from pemoe.train.models import CausalLMFamily, build_causal_lm, encode_causal_batch
from pemoe.train.tokenizer import ByteTokenizer

DATA = "synthetic:train:train=1,eval=1"  # ~85 examples


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: keep the tests quick on a busy machine
    yield
    torch.set_num_threads(n)


def _cfg(out, **kw) -> TrainConfig:
    base = dict(
        data=DATA,
        out=str(out),
        init="tiny-llama",
        method="mov",
        num_experts=3,
        optimizer="adamw",
        lr=1e-2,
        batch_size=4,
        grad_accum=2,
        max_steps=4,
        max_input_len=48,
        max_target_len=12,
        progress=False,
        log_every=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapters.adapter_state_dict(model).items()}


def _bytes(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]


def test_encode_causal_batch_labels_the_target_tokens_only():
    tok = ByteTokenizer()  # pad 0, eos 1 (also the start token: the byte tokenizer has no bos)
    b = encode_causal_batch(tok, ["ab", "xyz12"], ["cd", "e"], max_input_len=5, max_target_len=8)
    first = [1, *_bytes("ab"), *_bytes("cd"), 1]  # start, input, target, eos
    second = [1, *_bytes("xyz1"), *_bytes("e"), 1]  # input cut to max_input_len - 1 = 4 bytes
    assert b.input_ids.tolist() == [first + [0], second]
    assert b.attention_mask.tolist() == [[1] * 6 + [0], [1] * 7]
    # position t predicts token t + 1: only the target bytes and the final eos are labelled
    assert b.labels.tolist() == [
        [-100, -100, *_bytes("cd"), 1, -100, -100],
        [-100] * 4 + [*_bytes("e"), 1, -100],
    ]
    assert (b.num_input_tokens, b.num_target_tokens) == (3 + 5, 3 + 2)
    assert b.decoder_input_ids is None and b.decoder_attention_mask is None
    half = b.select(slice(1, 2))
    assert (half.num_input_tokens, half.num_target_tokens) == (5, 2)


def test_score_choices_equals_a_hand_computed_log_likelihood():
    """Rank-classification scores of a tiny Llama (choices of different lengths, batched with padding) equal
    Σ log p(choice tokens + eos | start + input) from one unpadded forward per pair, summed by hand."""
    tok = ByteTokenizer()
    model, _ = build_causal_lm(init="tiny-llama", model_dir=None, tokenizer=tok, seed=3, max_len=64)
    model.eval()
    examples = [
        Example("t", "2 + 2 =", "4", choices=("4", "five", "22")),
        Example("t", "sky colour?", "blue", choices=("red", "blue")),
    ]
    got = score_choices(model, tok, examples, batch_size=4, family=CausalLMFamily())
    got_mean = score_choices(model, tok, examples, batch_size=2, family=CausalLMFamily(), length_normalize=True)
    for ex, scores, means in zip(examples, got, got_mean, strict=True):
        for choice, score, mean in zip(ex.choices, scores, means, strict=True):
            prompt, answer = [1, *_bytes(ex.input)], [*_bytes(choice), 1]
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            want = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(answer))
            assert score == pytest.approx(want, rel=1e-5, abs=1e-5)
            assert mean == pytest.approx(want / len(answer), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("method", ["mov", "molora"])
def test_tiny_llama_resume_and_sigint_are_bit_exact(tmp_path, method):
    """4 steps straight == SIGINT after step 2 (a checkpoint, no final adapter) + resume to step 4: the same
    adapters and losses bit for bit."""
    straight = train(_cfg(tmp_path / "a", method=method))

    def stop_at_2(step: int, loss: float) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = train(_cfg(tmp_path / "b", method=method), on_step=stop_at_2)
    assert stopped.interrupted and stopped.step == 2
    assert latest_checkpoint(tmp_path / "b").name == "step-00000002"
    assert not (tmp_path / "b" / "adapter.safetensors").exists()
    rest = train(_cfg(tmp_path / "b", method=method, resume="latest"))
    assert (rest.start_step, rest.step) == (2, 4)
    got, want = _adapters(rest.bundle.model), _adapters(straight.bundle.model)
    assert got.keys() == want.keys() and len(want) > 0
    for k in want:
        assert torch.equal(got[k], want[k]), k
    cfg = _cfg(tmp_path / "c", method=method)
    bundle = build_model(cfg)
    initial = {n: p.detach().clone() for n, p in _prepare(bundle, cfg, verbose=False)}
    assert any(not torch.equal(initial[k], want[k]) for k in want)  # training changed the adapters
    assert [loss for _, loss in rest.losses] == [loss for _, loss in straight.losses[2:]]
    assert [loss for _, loss in stopped.losses] == [loss for _, loss in straight.losses[:2]]


def test_loss_ignores_the_input_tokens(tmp_path):
    """The training loss is the token-mean cross-entropy of the target tokens: one step's logged loss equals
    cross-entropy over the labelled positions of the same batch computed here, and differs from the loss over
    every next token (input included)."""
    cfg = _cfg(tmp_path, max_steps=1, grad_accum=1, method="lora")
    result = train(cfg)
    bundle = build_model(cfg)  # the same initial model (seeded) with the same fresh adapters
    _prepare(bundle, cfg, verbose=False)
    from pemoe.train.data import DataStream, load_dataset

    data = load_dataset(cfg.data)
    exs = [data.examples[i] for i in DataStream(len(data.examples), cfg.batch_size, cfg.seed).next_indices()]
    ids = [[1, *_bytes(e.input)[: cfg.max_input_len - 1]] for e in exs]
    tgt = [[*_bytes(e.target)[: cfg.max_target_len - 1], 1] for e in exs]
    total, count, every, every_count = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for p, t in zip(ids, tgt, strict=True):
            seq = torch.tensor([p + t])
            logp = torch.log_softmax(bundle.model(input_ids=seq).logits[0].double(), dim=-1)
            nll = [-logp[i, seq[0, i + 1]].item() for i in range(seq.shape[1] - 1)]
            total, count = total + sum(nll[len(p) - 1 :]), count + len(t)
            every, every_count = every + sum(nll), every_count + len(nll)
    assert result.losses[0][1] == pytest.approx(total / count, rel=1e-5)
    assert abs(every / every_count - total / count) > 1e-3


def _tiny_llama_folder(path, seed: int = 0):
    model, _ = build_causal_lm(init="tiny-llama", model_dir=None, tokenizer=ByteTokenizer(), seed=seed, max_len=64)
    model.save_pretrained(str(path))
    return path


def _learnable(path) -> None:
    """A task a model can learn from its training examples alone: 8 words, each labelled even or odd at random
    (fixed), two choices; chance = 50 %."""
    g = torch.Generator().manual_seed(0)
    labels = ["even" if b else "odd" for b in torch.randint(0, 2, (8,), generator=g).tolist()]
    words = ["apple", "brick", "cloud", "dune", "ember", "fjord", "grape", "haze"]
    with open(path, "w") as f:
        for w, label in zip(words, labels, strict=True):
            f.write(json.dumps({"task": "parity", "input": f"{w}:", "target": label, "choices": ["even", "odd"]}))
            f.write("\n")


def test_cli_train_then_eval_on_a_causal_lm_folder_beats_chance(tmp_path, capsys):
    """pemoe train --model <Llama folder> --method full, 30 steps on a memorisable task, writes a transformers
    folder; pemoe eval --model <that folder> scores >= 7 of 8 by rank classification (chance 4 of 8), more than
    the untrained model. Then pemoe eval --adapter scores a LoRA trained on top of it (same folder)."""
    model_dir = _tiny_llama_folder(tmp_path / "llama")
    data = tmp_path / "parity.jsonl"
    _learnable(data)
    common = ["--max-input-len", "16", "--max-target-len", "8", "--threads", "1"]
    before = tmp_path / "before.json"
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--json", str(before), *common]) == 0
    args = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "full")]
    args += ["--method", "full", "--optimizer", "adamw", "--lr", "1e-2", "--batch-size", "8"]
    args += ["--max-steps", "30", "--no-progress", "--log-every", "0", *common]
    assert main(args) == 0
    trained = tmp_path / "full" / "model"
    assert json.loads((trained / "config.json").read_text())["model_type"] == "llama"
    after = tmp_path / "after.json"
    assert main(["eval", "--model", str(trained), "--data", str(data), "--json", str(after), *common]) == 0
    acc_before = json.loads(before.read_text())["average"]
    acc_after = json.loads(after.read_text())["average"]
    assert acc_after >= 7 / 8 > acc_before, (acc_before, acc_after)
    assert "parity" in capsys.readouterr().out
    # an adapter on the trained folder: pemoe eval --adapter loads it (2 LoRA steps keep the accuracy)
    args = ["train", "--model", str(trained), "--data", str(data), "--out", str(tmp_path / "lora")]
    assert main([*args, "--method", "lora", "--max-steps", "2", "--no-progress", "--log-every", "0", *common]) == 0
    adapter = tmp_path / "lora" / "adapter.safetensors"
    with_adapter = tmp_path / "adapter.json"
    args = ["eval", "--model", str(trained), "--adapter", str(adapter), "--data", str(data)]
    assert main([*args, "--json", str(with_adapter), *common]) == 0
    assert json.loads(with_adapter.read_text())["average"] >= 7 / 8


def test_tiny_llama_eval_during_training_and_gpt2_folder(tmp_path, caplog):
    """--eval-data on tiny-llama reports an accuracy per held-out task; a GPT-2 folder (Conv1D, learned
    positions) without a tokenizer trains with MoV and the byte tokenizer, with a warning saying so."""
    res = train(_cfg(tmp_path / "a", max_steps=1, eval_data="synthetic:heldout:train=1,eval=1", eval_batch_size=32))
    assert res.evals and 0.0 <= res.evals[-1][1].average <= 1.0 and len(res.evals[-1][1].per_task) > 1
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=259, n_positions=64, bos_token_id=1, eos_token_id=1
        )
    )
    gpt2.save_pretrained(str(tmp_path / "gpt2"))
    kw = dict(init=None, model=str(tmp_path / "gpt2"), max_input_len=40, max_target_len=12, max_steps=2)
    res = train(_cfg(tmp_path / "b", **kw))
    assert res.step == 2 and all(loss == loss for _, loss in res.losses)
    assert "no tokenizer.json / tokenizer_config.json" in caplog.text
    assert isinstance(res.bundle.tokenizer, ByteTokenizer)
    assert any(".k." in n or ".v." in n for n in adapters.adapter_state_dict(res.bundle.model))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "bert", "vocab_size": 300}, "neither T5 nor a supported causal LM"),
        (None, "neither pemoe_model.json"),
    ],
)
def test_cli_rejects_a_folder_that_is_no_supported_model(tmp_path, capsys, config, message):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    if config is not None:
        (model_dir / "config.json").write_text(json.dumps(config))
    code = main(["train", "--model", str(model_dir), "--data", DATA, "--out", str(tmp_path / "o"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("pemoe train: error:") and message in err and len(err.splitlines()) == 1


def test_cli_rejects_sequences_longer_than_the_positions(tmp_path, capsys):
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=259, n_positions=64)
    config.bos_token_id = config.eos_token_id = 1
    transformers.GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "gpt2"))
    capsys.readouterr()
    args = ["train", "--model", str(tmp_path / "gpt2"), "--data", DATA, "--out", str(tmp_path / "o")]
    assert main([*args, "--max-input-len", "60", "--max-target-len", "8"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading progress bar
    assert last.startswith("pemoe train: error:") and "exceed the model's 64 positions" in last
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"task": "t", "input": "a", "target": "b", "choices": ["b", "c"]}) + "\n")
    args = ["eval", "--model", str(tmp_path / "gpt2"), "--data", str(data)]
    assert main([*args, "--max-input-len", "60", "--max-target-len", "8"]) == 2  # eval checks its own lengths
    assert "exceed the model's 64 positions" in capsys.readouterr().err
    assert main([*args, "--max-input-len", "40", "--max-target-len", "8"]) == 0  # and no default ones


def test_jax_framework_refuses_a_causal_lm(tmp_path, capsys):
    args = ["train", "--init", "tiny-llama", "--framework", "jax", "--data", DATA, "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "needs --framework torch" in capsys.readouterr().err


def test_fsdp_units_are_the_decoder_layers():
    import transformers

    tok = ByteTokenizer()
    llama, _ = build_causal_lm(init="tiny-llama", model_dir=None, tokenizer=tok, seed=0, max_len=64)
    assert CausalLMFamily().fsdp_units(llama) == list(llama.model.layers) and len(llama.model.layers) == 2
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=259))
    assert CausalLMFamily().fsdp_units(gpt2) == list(gpt2.transformer.h)
    cfg = llama.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, tok.vocab_size)


def test_a_folder_with_its_own_tokenizer_trains_with_it(tmp_path):
    """A causal-LM folder holding a transformers tokenizer is trained with that tokenizer (its <s> starts each
    sequence, its </s> ends the target), not the byte tokenizer."""
    from pemoe.train.tokenizer import TransformersTokenizer
    from tests.test_quickstart import byte_level_llama

    folder = byte_level_llama(tmp_path / "llama")
    res = train(_cfg(tmp_path / "run", init=None, model=str(folder), method="ia3", max_steps=2))
    tok = res.bundle.tokenizer
    assert isinstance(tok, TransformersTokenizer) and (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 258)
    b = CausalLMFamily().encode(tok, ["ab"], ["c"], max_input_len=8, max_target_len=8)
    assert b.input_ids[0].tolist() == [0, *tok.encode("ab"), *tok.encode("c"), 1] and len(tok.encode("ab")) == 2
    assert b.labels[0].tolist() == [-100, -100, *tok.encode("c"), 1, -100]
    state = json.loads((res.checkpoint / "state.json").read_text())
    assert state["identity"]["tokenizer"] == {"kind": "transformers", "path": str(folder)}


def test_bfloat16_training_and_the_routing_plot_on_a_causal_lm(tmp_path, capsys):
    """A bfloat16 backbone keeps float32 adapters; pemoe eval --routing-plot draws one panel per routed site of
    the Llama, each task's mean routing distribution over 3 experts (sums to 1)."""
    from safetensors.torch import load_file

    folder = _tiny_llama_folder(tmp_path / "llama")
    common = ["--max-input-len", "40", "--max-target-len", "12", "--threads", "1"]
    args = ["train", "--model", str(folder), "--data", DATA, "--out", str(tmp_path / "run"), "--method", "mov"]
    args += ["--num-experts", "3", "--dtype", "bfloat16", "--max-steps", "2", "--no-progress", "--log-every", "0"]
    assert main([*args, *common]) == 0
    adapter = tmp_path / "run" / "adapter.safetensors"
    assert {t.dtype for t in load_file(str(adapter)).values()} == {torch.float32}
    plot = tmp_path / "routing.png"
    args = ["eval", "--model", str(folder), "--adapter", str(adapter), "--data", "synthetic:heldout:train=1,eval=1"]
    assert main([*args, "--routing-plot", str(plot), "--batch-size", "32", *common]) == 0
    stats = json.loads(plot.with_suffix(".json").read_text())
    assert plot.is_file() and len(stats) == 2 * 3  # k, v and FFN of 2 layers
    assert all(k.startswith("model.layers.") for k in stats)
    for per_task in stats.values():
        assert len(per_task) > 1
        for load in per_task.values():
            assert len(load) == 3 and sum(load) == pytest.approx(1.0, abs=1e-5)
