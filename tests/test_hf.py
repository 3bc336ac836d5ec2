"""pemoe.hf: pemoe-injected models under transformers.Trainer and TRL's SFTTrainer.

Tiny offline models (tests/decoder_tiny.py's Llama, tests/t5_tiny.py's T5 v1.1), a few steps on a tiny
synthetic dataset, on the CPU. Checked: the loss falls; checkpoints hold the adapter file and Trainer's own
optimizer/scheduler/RNG/state files but no backbone weights; resuming from a mid-run checkpoint ends with the
uninterrupted run's adapters bit for bit; gradient accumulation (2 x 2) equals one batch of 4 within float32
rounding (SGD, so the update is the gradient itself); bf16=True runs under autocast and keeps the adapters
float32; router-health values are logged; bad input (an optimizer holding backbone weights, a checkpoint of
another adapter config, a plain Trainer checkpoint, a model without adapters) raises errors naming the cause.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import PrinterCallback, Trainer, TrainingArguments  # noqa: E402

import pemoe  # noqa: E402
from pemoe import hf  # noqa: E402
from pemoe.adapters import adapter_state_dict  # noqa: E402
from tests.decoder_tiny import decoder  # noqa: E402
from tests.t5_tiny import hf_t5  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llama(config=None):
    model = decoder("llama")
    torch.manual_seed(0)  # the adapter init (routers, lora_a) is the same in every run
    pemoe.inject(model, config or pemoe.MoLoRAConfig(num_experts=3, rank=2))
    return model.train()


def _t5(config=None):
    model = hf_t5("v1.1")
    torch.manual_seed(0)
    pemoe.inject(model, config or pemoe.MoVConfig(num_experts=3))
    return model.train()


def _data(kind: str, n: int = 4, length: int = 10, pad: bool = False, seed: int = 0) -> list[dict]:
    """n examples; ``pad`` gives example i (i odd) i trailing padding tokens (mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    vocab = 128 if kind == "llama" else 64
    out = []
    for i in range(n):
        ids = torch.randint(2, vocab, (length,), generator=g)
        mask = torch.ones(length, dtype=torch.long)
        if pad and i % 2:
            mask[length - i :] = 0
        if kind == "llama":
            labels = ids.masked_fill(mask == 0, -100)
        else:  # T5: the target is the input reversed
            labels = ids.flip(0).masked_fill(mask.flip(0) == 0, -100)
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return out


def _args(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(model, args, data, cls=hf.PemoeTrainer, **kw):
    trainer = cls(model=model, args=args, train_dataset=data, **kw)
    trainer.remove_callback(PrinterCallback)
    return trainer


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _adapters(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in adapter_state_dict(model).items()}


BUILD = {"llama": _llama, "t5": _t5}


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_trainer_trains_saves_adapters_only_and_resumes_bit_exactly(tmp_path, kind):
    data = _data(kind, n=8)
    model = BUILD[kind]()
    before = _adapters(model)
    trainer = _trainer(model, _args(tmp_path / "a", save_strategy="steps", save_steps=3), data)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    final = _adapters(model)
    assert any(not torch.equal(before[k], final[k]) for k in final)

    ckpt = tmp_path / "a" / "checkpoint-3"
    files = {p.name for p in ckpt.iterdir()}
    assert hf.ADAPTER_FILE in files and {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, files
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / hf.ADAPTER_FILE))
    assert set(saved) == set(final)  # adapter tensors only: no backbone weight in the checkpoint
    opt = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert len(opt["state"]) == len(final)  # AdamW state for the adapters alone

    resumed_model = BUILD[kind]()
    resumed = _trainer(resumed_model, _args(tmp_path / "b", save_strategy="steps", save_steps=3), data)
    resumed.train(resume_from_checkpoint=str(ckpt))
    got = _adapters(resumed_model)
    for k in final:
        assert torch.equal(got[k], final[k]), k
    assert _losses(resumed) == losses  # steps 1-3 from the checkpoint's state, 4-6 on the same batches


def test_router_health_is_logged_under_trainer(tmp_path):
    model = _t5()
    trainer = _trainer(model, _args(tmp_path, max_steps=2), _data("t5", pad=True))
    trainer.train()
    sites = pemoe.router_health.routed_sites(model)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        for site in sites:
            load = [h[f"router/{site}/load_{e}"] for e in range(3)]
            assert sum(load) == pytest.approx(1.0, abs=1e-5)
            assert h[f"router/{site}/max_prob"] == max(load)
            assert 0.0 < h[f"router/{site}/entropy"] <= torch.log(torch.tensor(3.0)).item() + 1e-6
        assert h["router/max_prob_max"] == max(h[f"router/{s}/max_prob"] for s in sites)
    assert "router/entropy_mean" not in trainer.state.log_history[-1]  # the run summary carries no stats
    # statistics are gathered on the logged steps only (one forward each here): steps 2 and 4 of 4
    sparse = _trainer(_t5(), _args(tmp_path / "sparse", max_steps=4, logging_steps=2), _data("t5"))
    calls = []
    record = sparse.router_monitor._record
    sparse.router_monitor._record = lambda *a: (calls.append(a[0].key), record(*a))
    sparse.train()
    assert len(calls) == 2 * len(sites) and set(calls) == set(sites)
    assert [h["step"] for h in sparse.state.log_history if "router/entropy_mean" in h] == [2, 4]
    summary = _trainer(_t5(), _args(tmp_path / "s", max_steps=1), _data("t5"), router_stats="summary")
    summary.train()
    keys = {k for k in summary.state.log_history[0] if k.startswith("router/")}
    assert keys == {"router/entropy_mean", "router/entropy_min", "router/max_prob_max"}


@pytest.mark.parametrize("kind", ["llama", "t5"])  # T5 under SFTTrainer: the text is input and target
def test_sft_trainer_trains_and_saves_adapters_only(tmp_path, kind):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz .,"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    text = ["the cat sat on the mat.", "a dog ran, a cat sat.", "on the mat sat a dog.", "the mat is flat."]
    model = BUILD[kind]()
    model.config.pad_token_id, model.config.eos_token_id = 0, 1
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=6,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        max_length=32,
        dataset_num_proc=None,
    )
    assert args.gradient_checkpointing and args.bf16  # TRL's defaults: this run covers both with the hooks on
    trainer = hf.PemoeSFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": text}), processing_class=tokenizer
    )
    assert isinstance(trainer, trl.SFTTrainer)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.05, losses
    files = {p.name for p in (tmp_path / "checkpoint-6").iterdir()}
    assert hf.ADAPTER_FILE in files and "model.safetensors" not in files
    assert any(k.startswith("router/") for k in trainer.state.log_history[0])
    assert all(p.dtype == torch.float32 for p in adapter_state_dict(model).values())


def _one_sgd_step(kind, out, batch, accum, data):
    """The adapters' change after one SGD step at learning rate 1 (minus the gradient), no clipping."""
    model = BUILD[kind]()
    args = _args(out, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accum, optim="sgd",
                 learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0)  # fmt: skip
    before = _adapters(model)
    _trainer(model, args, data).train()
    return {k: p - before[k] for k, p in _adapters(model).items()}


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_gradient_accumulation_equals_the_larger_batch(tmp_path, kind):
    data = _data(kind, n=4, pad=True)  # uneven target counts: the token-mean must span the accumulated batch
    big = _one_sgd_step(kind, tmp_path / "big", 4, 1, data)
    accum = _one_sgd_step(kind, tmp_path / "accum", 2, 2, data)
    # float32 rounding: the two sum the same per-token terms in another order
    scale = max(d.abs().max().item() for d in big.values())
    assert scale > 1e-3  # the step moved the adapters
    for k in big:
        torch.testing.assert_close(accum[k], big[k], rtol=1e-4, atol=1e-5 * scale, msg=k)


def test_bf16_mixed_precision_runs_and_keeps_adapters_float32(tmp_path):
    model = _llama()
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = _trainer(model, _args(tmp_path, max_steps=3, bf16=True), _data("llama"))
    trainer.train()
    handle.remove()
    assert torch.bfloat16 in seen  # autocast was on
    assert all(p.dtype == torch.float32 for p in adapter_state_dict(model).values())
    losses = _losses(trainer)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------
# bad input


def test_optimizer_over_frozen_weights_is_refused(tmp_path):
    model = _llama()
    # an optimizer built over every parameter, after other code unfroze an embedding
    model.model.embed_tokens.weight.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = _trainer(model, _args(tmp_path, max_steps=1), _data("llama"), optimizers=(opt, None))
    before = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight \(requires_grad=True\).*frozen backbone"):
        trainer.train()
    assert torch.equal(model.model.embed_tokens.weight, before)
    # Trainer's own optimizer takes every parameter that requires grad: the unfrozen weight is named too
    trainer = _trainer(model, _args(tmp_path, max_steps=1), _data("llama"))
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight"):
        trainer.train()


def test_resume_from_another_adapter_config_is_refused(tmp_path):
    data = _data("llama")
    trainer = _trainer(_llama(), _args(tmp_path / "a", max_steps=1, save_strategy="steps", save_steps=1), data)
    trainer.train()
    other = _llama(pemoe.MoLoRAConfig(num_experts=4, rank=2))
    before = _adapters(other)
    trainer = _trainer(other, _args(tmp_path / "b", max_steps=2), data)
    with pytest.raises(ValueError, match=r"checkpoint-1.*num_experts: file 3 vs model 4"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    assert all(torch.equal(before[k], p) for k, p in _adapters(other).items())


def test_plain_trainer_checkpoint_and_plain_model_are_refused(tmp_path):
    data = _data("llama")
    plain = Trainer(model=_llama(), args=_args(tmp_path / "p", max_steps=1, save_strategy="steps", save_steps=1),
                    train_dataset=data)  # fmt: skip
    plain.train()
    assert (tmp_path / "p" / "checkpoint-1" / "model.safetensors").is_file()  # why pemoe.hf exists
    trainer = _trainer(_llama(), _args(tmp_path / "b", max_steps=2), data)
    with pytest.raises(FileNotFoundError, match=f"holds no {hf.ADAPTER_FILE}"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "p" / "checkpoint-1"))
    with pytest.raises(ValueError, match="no pemoe adapters"):
        hf.PemoeTrainer(model=decoder("llama"), args=_args(tmp_path / "c"), train_dataset=data)
    with pytest.raises(ValueError, match="balance_loss"):
        hf.PemoeTrainer(model=_llama(), args=_args(tmp_path / "c"), train_dataset=data, balance_loss=-1.0)
    with pytest.raises(ValueError, match="no router"):
        hf.PemoeTrainer(model=_llama(pemoe.LoRAConfig(rank=2)), args=_args(tmp_path / "c"), train_dataset=data,
                        balance_loss=0.1)  # fmt: skip
    with pytest.raises(TypeError, match="transformers.Trainer"):
        hf.pemoe_trainer(dict)


def test_pemoe_trainer_of_a_subclass_keeps_its_class():
    class MyTrainer(Trainer):
        pass

    cls = hf.pemoe_trainer(MyTrainer)
    assert issubclass(cls, MyTrainer) and cls.__name__ == "PemoeMyTrainer"
    assert hf.pemoe_trainer(cls) is cls


def test_load_best_model_at_end_loads_the_best_adapters(tmp_path):
    from safetensors.torch import load_file

    data = _data("llama")
    model = _llama()
    args = _args(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                 load_best_model_at_end=True, metric_for_best_model="loss", learning_rate=0.2)  # fmt: skip
    trainer = _trainer(model, args, data, eval_dataset=data)
    trainer.train()
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    best = min(evals, key=evals.get)
    assert best != 3  # lr 0.2 overshoots: an earlier checkpoint is the best, so loading it changes the model
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best}")
    saved = load_file(str(tmp_path / f"checkpoint-{best}" / hf.ADAPTER_FILE))
    assert all(torch.equal(p, saved[k]) for k, p in adapter_state_dict(model).items())
    last = load_file(str(tmp_path / "checkpoint-3" / hf.ADAPTER_FILE))
    assert any(not torch.equal(last[k], saved[k]) for k in saved)
