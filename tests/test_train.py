"""pemoe train / eval: bit-exact resume, SIGINT, checkpoint mismatches, accumulation, backbones, evaluation."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from pemoe import adapters
from pemoe.cli import main
from pemoe.models.t5 import T5, T5Config
from pemoe.train.data import Example, load_dataset
from pemoe.train.evaluate import EvalResult, rank_classification, routing_statistics, score_choices
from pemoe.train.loop import CheckpointMismatch, TrainConfig, _prepare, build_model, latest_checkpoint, train
from pemoe.train.tokenizer import ByteTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPE = dict(d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)
SHAPE |= dict(relative_attention_num_buckets=8, relative_attention_max_distance=16)
TINY = json.dumps(SHAPE)
DATA = "synthetic:train:train=1,eval=1"  # ~85 examples
EVAL = "synthetic:heldout:train=1,eval=1"


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
        init=TINY,
        method="mov",
        num_experts=3,
        batch_size=4,
        grad_accum=2,
        max_steps=4,
        max_input_len=48,
        max_target_len=12,
        dropout=0.1,  # dropout on: resuming must restore the RNG too
        progress=False,
        log_every=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _weights(model: nn.Module, method: str) -> dict[str, torch.Tensor]:
    if method == "full":
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in adapters.adapter_state_dict(model).items()}


def _fresh_weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    bundle = build_model(cfg)
    _prepare(bundle, cfg)
    return _weights(bundle.model, cfg.method)


def _optimizer_tensors(ckpt: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "optimizer.safetensors"))


def _train_lines(out: pathlib.Path) -> list[dict]:
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines() if s.strip()]
    return [r for r in lines if r["kind"] == "train"]


@pytest.mark.parametrize(
    "method, optimizer, dtype",
    [
        ("mov", "adafactor", "float32"),
        ("molora", "adamw", "float32"),
        ("full", "adafactor", "float32"),
        ("lora", "adafactor", "bfloat16"),
    ],
)
def test_resume_is_bit_exact(tmp_path, method, optimizer, dtype):
    """N steps straight == k steps, stop, resume, N - k steps (weights, optimizer state and losses)."""
    kw = dict(method=method, optimizer=optimizer, dtype=dtype)
    straight = train(_cfg(tmp_path / "a", max_steps=4, **kw))
    first = train(_cfg(tmp_path / "b", max_steps=2, **kw))
    assert first.step == 2 and not first.interrupted
    rest = train(_cfg(tmp_path / "b", max_steps=4, resume="latest", **kw))
    assert (rest.start_step, rest.step) == (2, 4)
    got, want = _weights(rest.bundle.model, method), _weights(straight.bundle.model, method)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    initial = _fresh_weights(_cfg(tmp_path / "c", **kw))
    assert any(not torch.equal(initial[k], want[k]) for k in want)  # training changed the weights
    assert [loss for _, loss in rest.losses] == [loss for _, loss in straight.losses[2:]]
    a, b = _optimizer_tensors(straight.checkpoint), _optimizer_tensors(rest.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _train_lines(tmp_path / "b")] == [1, 2, 3, 4]


def test_checkpoint_holds_only_adapters_optimizer_and_data_state(tmp_path):
    result = train(_cfg(tmp_path, max_steps=2))
    ckpt = result.checkpoint
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter.safetensors", "optimizer.safetensors", "state.json"]
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "adapter.safetensors"))
    assert saved.keys() == adapters.adapter_state_dict(result.bundle.model).keys()
    assert sum(t.numel() for t in saved.values()) == result.trainable < result.total / 5
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and state["data_stream"]["position"] == 16  # 2 steps x 2 micro-batches x 4
    final = adapters.load_adapter(T5(T5Config(**result.bundle.t5_config)), tmp_path / "adapter.safetensors")
    assert final.num_experts == 3


def _send_sigint_at(step_to_stop: int):
    def hook(step: int, loss: float) -> None:
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def test_sigint_writes_resumable_checkpoint(tmp_path):
    straight = train(_cfg(tmp_path / "a", max_steps=5))
    stopped = train(_cfg(tmp_path / "b", max_steps=5), on_step=_send_sigint_at(3))
    assert stopped.interrupted and stopped.step == 3
    assert latest_checkpoint(tmp_path / "b") == stopped.checkpoint and stopped.checkpoint.name == "step-00000003"
    assert not (tmp_path / "b" / "adapter.safetensors").exists()  # no final adapter for an unfinished run
    rest = train(_cfg(tmp_path / "b", max_steps=5, resume="latest"))
    want = _weights(straight.bundle.model, "mov")
    got = _weights(rest.bundle.model, "mov")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_sigint_subprocess_exits_130_and_keeps_every_step(tmp_path):
    out = tmp_path / "run"
    args = ["-m", "pemoe.cli", "train", "--init", TINY, "--data", DATA, "--out", str(out), "--method", "ia3"]
    args += ["--max-steps", "100000", "--batch-size", "2", "--max-input-len", "32", "--no-progress", "--log-every", "0"]
    args += ["--threads", "1"]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and len(_train_lines(out)) >= 2):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr.decode()
    steps = [r["step"] for r in _train_lines(out)]
    ckpt = latest_checkpoint(out)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == steps[-1] == len(steps) >= 2  # every logged (completed) step is in the checkpoint
    assert "resume with --resume" in stderr.decode()


@pytest.fixture(scope="module")
def mov_checkpoint(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("mov")
    train(_cfg(out, max_steps=1, grad_accum=1))
    return out


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(method="lora"), "adapter_config.method: checkpoint 'mov' vs this run 'lora'"),
        (dict(num_experts=2), "adapter_config.num_experts: checkpoint 3 vs this run 2"),
        (dict(init=json.dumps(SHAPE | {"d_ff": 40})), "model.config.d_ff: checkpoint 48 vs this run 40"),
        (dict(seed=1), "model.fingerprint"),  # same shape, other weights
        (dict(data="synthetic:train:seed=1,train=1,eval=1"), "data.fingerprint"),
        (dict(optimizer="adamw"), "train_config.optimizer: checkpoint 'adafactor' vs this run 'adamw'"),
    ],
)
def test_checkpoint_mismatch_is_refused(mov_checkpoint, tmp_path, change, message):
    ckpt = latest_checkpoint(mov_checkpoint)
    with pytest.raises(CheckpointMismatch, match="another run configuration.*" + message.replace("(", r"\(")):
        train(_cfg(tmp_path, max_steps=2, grad_accum=1, resume=str(ckpt), **change))


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """batch 8 x 1 and batch 4 x 2 see the same examples: same loss, same gradients (left in .grad)."""
    kw = dict(dropout=0.0, max_steps=1)
    big = train(_cfg(tmp_path / "a", batch_size=8, grad_accum=1, **kw))
    acc = train(_cfg(tmp_path / "b", batch_size=4, grad_accum=2, **kw))
    assert big.losses[0][1] == pytest.approx(acc.losses[0][1], rel=1e-6)
    a = adapters.adapter_state_dict(big.bundle.model)
    b = adapters.adapter_state_dict(acc.bundle.model)
    # (routers start with ones-experts, so their gradient is rounding noise: compare the whole gradient)
    ga, gb = (torch.cat([d[k].grad.flatten() for k in a]) for d in (a, b))
    assert ga.abs().max() > 0
    torch.testing.assert_close(gb, ga, rtol=0, atol=1e-5 * ga.abs().max().item())
    one = train(_cfg(tmp_path / "c", batch_size=4, grad_accum=1, **kw))
    assert one.losses[0][1] != pytest.approx(acc.losses[0][1], rel=1e-3)  # the second micro-batch counted


def test_bfloat16_backbone_keeps_float32_adapters(tmp_path, capsys):
    result = train(_cfg(tmp_path, dtype="bfloat16", max_steps=2, method="molora", progress=True))
    bar = capsys.readouterr().err  # the tqdm progress bar, with loss and tokens/s
    assert "2/2" in bar and "loss=" in bar and "tok_s=" in bar
    model = result.bundle.model
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    assert {p.dtype for p in adapters.adapter_state_dict(model).values()} == {torch.float32}
    assert model.shared.weight.dtype == torch.bfloat16


def test_transformers_backbone_matches_pemoe(tmp_path):
    from tests.t5_tiny import hf_t5

    hf_t5("v1.0", vocab_size=260).save_pretrained(tmp_path / "hf")
    kw = dict(init=None, model=str(tmp_path / "hf"), method="lora", dropout=0.0, max_steps=2)
    a = train(_cfg(tmp_path / "a", backbone="transformers", **kw))
    b = train(_cfg(tmp_path / "b", backbone="pemoe", **kw))
    assert type(a.bundle.model).__name__ == "T5ForConditionalGeneration" and isinstance(b.bundle.model, T5)
    for (_, la), (_, lb) in zip(a.losses, b.losses, strict=True):
        assert la == pytest.approx(lb, rel=1e-4)


def test_cli_bad_line_fails_naming_file_and_line(tmp_path, capsys):
    good = json.dumps({"task": "t", "input": "a", "target": "b"})
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n{{oops\n{good}\n")
    args = ["train", "--init", TINY, "--data", str(path), "--max-steps", "1", "--batch-size", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert f"{path}:2: not valid JSON" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "o"), "--skip-bad-lines"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 bad line(s)" in captured.err and "1 bad line(s) skipped" in captured.out
    assert (tmp_path / "o" / "skipped_lines.txt").read_text().startswith(f"{path}:2: not valid JSON")


def test_cli_pretrain_then_adapt_then_eval(tmp_path, capsys):
    common = ["--data", DATA, "--batch-size", "4", "--max-input-len", "48", "--no-progress", "--log-every", "1"]
    assert main(["train", "--init", TINY, "--method", "full", "--lr", "1e-2", "--max-steps", "2", *common,
                 "--out", str(tmp_path / "pre")]) == 0  # fmt: skip
    model_dir = tmp_path / "pre" / "model"
    assert (model_dir / "pemoe_model.json").is_file()
    assert main(["train", "--model", str(model_dir), "--method", "mov", "--num-experts", "2", "--max-steps", "2",
                 "--eval-data", EVAL, "--eval-every", "1", *common, "--out", str(tmp_path / "mov")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "step 2/2  loss" in err and "tokens/s" in err and "held-out rank-classification accuracy" in err
    evals = [json.loads(s) for s in (tmp_path / "mov" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [1, 2]
    adapter = tmp_path / "mov" / "adapter.safetensors"
    assert main(["eval", "--model", str(model_dir), "--adapter", str(adapter), "--data", EVAL,
                 "--json", str(tmp_path / "e.json")]) == 0  # fmt: skip
    table = capsys.readouterr().out
    result = json.loads((tmp_path / "e.json").read_text())
    assert f"**{100 * result['average']:.1f}**" in table and "| is_odd |" in table
    assert result["average"] == pytest.approx(evals[-1]["average"])  # same model, same numbers


# ---------------------------------------------------------------------------------------------
# evaluation


class _Spells(nn.Module):
    """A fake seq2seq model that, whatever the input, predicts the bytes of ``word`` then eos."""

    def __init__(self, word: str) -> None:
        super().__init__()
        self.ids = ByteTokenizer().encode(word) + [1]
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, use_cache=None):
        b, t = decoder_input_ids.shape
        logits = torch.zeros(b, t, 259)
        for pos in range(t):
            logits[:, pos, self.ids[min(pos, len(self.ids) - 1)]] = 30.0
        return type("Out", (), {"logits": logits})()


def _ex(task, template, target, choices=("yes", "no")):
    return Example(task, f"q {task} {template}", target, tuple(choices), template)


def test_rank_classification_median_over_templates():
    # the model always answers "yes": accuracy = share of "yes" targets
    examples = [_ex("a", "t0", "yes")] * 4 + [_ex("a", "t1", "no")] * 2 + [_ex("a", "t2", "yes"), _ex("a", "t2", "no")]
    examples += [_ex("b", "t0", "no"), _ex("b", "t1", "yes"), _ex("b", "t1", "yes"), _ex("b", "t1", "no")]
    examples += [_ex("c", "u", "maybe", ("no", "maybe", "yes")), _ex("c", "u", "yes", ("no", "maybe", "yes"))]
    result = rank_classification(_Spells("yes"), ByteTokenizer(), examples, batch_size=3)
    assert result.per_template == {
        "a": {"t0": 1.0, "t1": 0.0, "t2": 0.5},
        "b": {"t0": 0.0, "t1": 2 / 3},
        "c": {"u": 0.5},
    }
    assert result.per_task == {"a": 0.5, "b": 1 / 3, "c": 0.5}
    assert result.average == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)
    assert result.counts == {"a": 8, "b": 4, "c": 2}


def test_eval_result_median_is_over_templates():
    r = EvalResult({"x": {"a": 0.2, "b": 0.9, "c": 0.4}, "y": {"a": 1.0, "b": 0.0}}, {"x": 3, "y": 2})
    assert r.per_task == {"x": 0.4, "y": 0.5} and r.average == pytest.approx(0.45)


def test_score_choices_equals_unbatched_likelihood():
    torch.manual_seed(0)
    model = T5(T5Config(vocab_size=259, **SHAPE)).eval()
    tok = ByteTokenizer()
    examples = [
        Example("t", "short", "ab", ("ab", "a longer choice")),
        Example("t", "a longer input", "x", ("x", "yz")),
    ]
    got = score_choices(model, tok, examples, batch_size=3)
    for ex, scores in zip(examples, got, strict=True):
        for choice, s in zip(ex.choices, scores, strict=True):
            ids = torch.tensor([tok.encode(ex.input) + [1]])
            labels = torch.tensor([tok.encode(choice) + [1]])
            with torch.no_grad():
                logits = model(ids, labels=labels).logits[0]
            want = torch.log_softmax(logits.double(), -1)[torch.arange(labels.shape[1]), labels[0]].sum()
            assert s == pytest.approx(float(want), abs=1e-4)


def test_routing_statistics_match_a_direct_computation():
    torch.manual_seed(0)
    model = T5(T5Config(vocab_size=259, **SHAPE)).eval()
    adapters.inject(model, adapters.MoVConfig(num_experts=3))
    tok = ByteTokenizer()
    examples = [Example("p", "hello there", "yes", ("yes", "no")), Example("q", "hi", "no", ("yes", "no"))]
    site = "encoder.block.0.layer.0.SelfAttention.k"
    key, stats = routing_statistics(model, tok, examples, site)
    assert key == site and set(stats) == {"p", "q"}
    layer = model.encoder.block[0].layer[0]
    for ex in examples:
        ids = torch.tensor([tok.encode(ex.input) + [1]])
        with torch.no_grad():
            x = layer.layer_norm(model.shared(ids))[0]  # the k projection's input (no position effect here)
            h = (x @ layer.SelfAttention.k.weight.T).view(-1, 4, 8)
            p = torch.softmax(h @ layer.SelfAttention.k.router, -1).mean(1).mean(0)
        torch.testing.assert_close(torch.tensor(stats[ex.task]), p)
        assert sum(stats[ex.task]) == pytest.approx(1.0)
    _, ffn = routing_statistics(model, tok, examples)  # default site: the last encoder FFN
    assert all(sum(v) == pytest.approx(1.0) for v in ffn.values())


def test_eval_data_without_choices_is_refused(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"task": "t", "input": "a", "target": "b"}) + "\n")
    with pytest.raises(ValueError, match=f"without 'choices', first at {path}:1"):
        train(_cfg(tmp_path / "o", eval_data=str(path), max_steps=1))
    assert load_dataset(str(path)).examples[0].choices is None


def test_finetune_report_micro(tmp_path):
    """bench/finetune_report.py end to end on its micro size (two runs): files and routing sums."""
    from pemoe.bench.finetune_report import main as report

    assert report(["--size", "micro", "--out", str(tmp_path), "--only", "ia3,mov", "--no-paper-optimizer-run"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    for row in ("| backbone (no adapter) |", "| (IA)3 |", "| MoV-3 |", "| **average** |"):
        assert row in summary
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    assert (tmp_path / "routing_mov_3.png").stat().st_size > 1000
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(results) == {"backbone (no adapter)", "(IA)3", "MoV-3"}
    routing = results["MoV-3"]["routing"]
    assert routing["site"].endswith("DenseReluDense.mov") and len(routing["per_task"]) == 41
    assert all(sum(p) == pytest.approx(1.0, abs=1e-5) and len(p) == 3 for p in routing["per_task"].values())
    assert results["MoV-3"]["trainable"] > results["(IA)3"]["trainable"] > 0


def test_fresh_run_refuses_an_out_dir_with_checkpoints(mov_checkpoint):
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        train(_cfg(mov_checkpoint, max_steps=1, grad_accum=1))


def _tree(root: pathlib.Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cli_resume_from_a_damaged_checkpoint_fails_in_one_line(tmp_path, capsys, framework):
    """A truncated adapter.safetensors, optimizer.safetensors or state.json: one line naming the file, exit 2,
    the run directory untouched."""
    args = ["train", "--init", TINY, "--data", DATA, "--method", "mov", "--num-experts", "2", "--batch-size", "2",
            "--max-input-len", "48", "--no-progress", "--log-every", "0", "--framework", framework]  # fmt: skip
    run = tmp_path / "run"
    assert main([*args, "--max-steps", "1", "--out", str(run)]) == 0
    ckpt = latest_checkpoint(run)
    capsys.readouterr()
    for name in ("adapter.safetensors", "optimizer.safetensors", "state.json"):
        file = ckpt / name
        good = file.read_bytes()
        file.write_bytes(good[: len(good) // 2])
        before = _tree(run)
        assert main([*args, "--max-steps", "2", "--out", str(run), "--resume"]) == 2, name
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("pemoe train: error: ")]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert str(file) in errors[0] and "truncated or damaged" in errors[0], err
        assert _tree(run) == before, name
        file.write_bytes(good)
    assert main([*args, "--max-steps", "2", "--out", str(run), "--resume"]) == 0  # the repaired run resumes
