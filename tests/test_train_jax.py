"""pemoe train --framework jax (pemoe.train.jax_loop): parity with the torch trainer, bit-exact resume, SIGINT,
checkpoint refusals, adapters readable by the torch ``pemoe eval``, and the options JAX refuses.

Tolerances (float32 unless stated): loss_sum |jax − torch| ≤ 1e-6·|torch|; every adapter gradient
max|jax − torch| ≤ 2e-5·max|torch| per tensor (measured: equal losses, 2e-6 on gradients; reduction order
differs, the padded JAX batch included); bfloat16 backbone (LoRA): 1e-3 and 5e-2 (measured 5e-5 and 2.7e-2:
bfloat16 rounding happens at different points in the two forwards).
The optimizers against torch's on the same gradients: max|Δθ_jax − Δθ_torch| ≤ 1e-5·max|Δθ_torch| + 2 float32
ulps of max|θ| (θ itself is rounded) after each of 4 steps. Resume and SIGINT: bit-exact (np.array_equal).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pemoe import adapters
from pemoe.cli import main
from pemoe.models.t5 import T5Config
from pemoe.train import jax_loop
from pemoe.train import loop as torch_loop
from pemoe.train.data import encode_batch, load_dataset
from pemoe.train.evaluate import model_logits, score_choices
from pemoe.train.loop import CheckpointMismatch, TrainConfig, latest_checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent

SHAPE = dict(d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)
SHAPE |= dict(relative_attention_num_buckets=8, relative_attention_max_distance=16)
TINY = json.dumps(SHAPE)
DATA = "synthetic:train:train=1,eval=1"  # 86 examples
EVAL = "synthetic:heldout:train=1,eval=1"  # 33 examples, 97 choices
EPS32 = float(np.finfo(np.float32).eps)
LENS = dict(max_input_len=32, max_target_len=16)  # one padded shape [*, 32] / [*, 16] for every batch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(out, **kw) -> TrainConfig:
    base = dict(data=DATA, out=str(out), init=TINY, method="mov", num_experts=3, batch_size=4, grad_accum=2)
    base |= dict(max_steps=4, progress=False, log_every=0, **LENS)
    return TrainConfig(**(base | kw))


def _np(tree: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in tree.items()}


def _optimizer_tensors(ckpt: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(ckpt / "optimizer.safetensors"))


# ---------------------------------------------------------------------------------------------
# the optimizers against torch's


def _optimizer_parity(make_jax, make_torch) -> None:
    rng = np.random.default_rng(0)
    shapes = {"experts": (2, 3, 5), "router": (6, 3), "lora_b": (3, 2, 4), "vector": (7,)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    params["lora_b"][:] = 0.0  # starts at zero like lora_b: the step is lr · 1e-3 (Adafactor)
    tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    t_opt = make_torch(list(tp.values()))
    j_opt = make_jax()
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    state = j_opt.init(jp)
    update = jax.jit(j_opt.update)
    for _ in range(4):
        grads = {k: rng.normal(size=s).astype(np.float32) * 10 ** rng.uniform(-3, 1) for k, s in shapes.items()}
        for k, p in tp.items():
            p.grad = torch.from_numpy(grads[k])
        t_opt.step()
        updates, state = update({k: jnp.asarray(g) for k, g in grads.items()}, state, jp)
        jp = {k: jp[k] + updates[k] for k in jp}
        for k in params:
            want = tp[k].detach().numpy() - params[k]
            got = np.asarray(jp[k]) - params[k]
            assert np.abs(want).max() > 0, k
            tol = 1e-5 * np.abs(want).max() + 2 * EPS32 * np.abs(tp[k].detach().numpy()).max()  # θ's own rounding
            assert np.abs(got - want).max() <= tol, k


def test_adafactor_is_torch_adafactor():
    _optimizer_parity(
        lambda: jax_loop.adafactor(1e-2),
        lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=0.0, foreach=False),
    )


def test_adamw_is_torch_adamw():
    cfg = _cfg("-", optimizer="adamw", lr=1e-2)
    _optimizer_parity(
        lambda: jax_loop.make_optimizer(cfg),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0, foreach=False),
    )


# ---------------------------------------------------------------------------------------------
# loss and gradients against the torch trainer's


def _randomise_adapters(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in adapters.adapter_state_dict(model).items():
            if name.endswith("experts"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("router"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("lora_b"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method, dtype", [("mov", "float32"), ("molora", "float32"), ("lora", "bfloat16")])
def test_loss_and_gradients_equal_torch(method, dtype):
    cfg = _cfg("-", method=method, dtype=dtype, num_experts=2, rank=2)
    bundle = torch_loop.build_model(cfg)
    named = torch_loop._prepare(bundle, cfg, verbose=False)
    _randomise_adapters(bundle.model)
    exs = load_dataset(DATA).examples[:5]
    batch = encode_batch(bundle.tokenizer, [e.input for e in exs], [e.target for e in exs], **LENS)
    logits = model_logits(bundle.model, batch)
    want = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=-100, reduction="sum")
    want.backward()

    trainable, frozen = jax_loop.split_params(bundle.model, [n for n, _ in named])
    assert {str(v.dtype) for v in trainable.values()} == {"float32"}
    assert frozen["shared.weight"].dtype == (jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    loss_fn = jax_loop.make_loss_fn(T5Config(**bundle.t5_config), adapters.adapter_config(bundle.model))
    stacked = jax_loop.stack_batches([batch], **LENS)  # padded beyond the batch: padding must not count
    one = {k: v[0] for k, v in stacked.items()}
    assert one["input_ids"].shape[1] > batch.input_ids.shape[1] or one["labels"].shape[1] > batch.labels.shape[1]
    (loss_sum, n_tokens), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trainable, frozen, one)
    loss_tol, grad_tol = (1e-6, 2e-5) if dtype == "float32" else (1e-3, 5e-2)
    assert int(n_tokens) == batch.num_target_tokens
    assert abs(float(loss_sum) - want.item()) <= loss_tol * abs(want.item())
    for name, p in named:
        g_t, g_j = p.grad.numpy(), np.asarray(grads[name])
        assert np.abs(g_t).max() > 0, name
        assert np.abs(g_j - g_t).max() <= grad_tol * np.abs(g_t).max(), name


# ---------------------------------------------------------------------------------------------
# resume, SIGINT, checkpoints


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> jax_loop.JaxTrainResult:
    """4 steps of MoV (Adafactor, float32, 2 micro-batches per step) in one go."""
    return jax_loop.train(_cfg(tmp_path_factory.mktemp("straight")))


def _send_sigint_at(step_to_stop: int):
    def hook(step: int, loss: float) -> None:
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


@pytest.mark.parametrize("stop", ["max_steps", "sigint"])
def test_resume_is_bit_exact(straight, tmp_path, stop):
    """4 steps straight == 2 steps, stop (end of run, or Ctrl-C), resume, 2 steps: weights, optimizer, losses."""
    if stop == "sigint":
        first = jax_loop.train(_cfg(tmp_path, max_steps=4), on_step=_send_sigint_at(2))
        assert first.interrupted and first.step == 2
        assert not (tmp_path / "adapter.safetensors").exists()  # no final adapter for an unfinished run
    else:
        first = jax_loop.train(_cfg(tmp_path, max_steps=2))
        assert not first.interrupted and first.step == 2
    assert latest_checkpoint(tmp_path) == first.checkpoint and first.checkpoint.name == "step-00000002"
    rest = jax_loop.train(_cfg(tmp_path, resume="latest"))
    assert (rest.start_step, rest.step) == (2, 4)
    got, want = _np(rest.params), _np(straight.params)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    init = jax_loop.split_params(_fresh_model(), list(want))[0]
    assert all(not np.array_equal(np.asarray(init[k]), want[k]) for k in want if k.endswith("experts"))
    a, b = _optimizer_tensors(straight.checkpoint), _optimizer_tensors(rest.checkpoint)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert [loss for _, loss in rest.losses] == [loss for _, loss in straight.losses[2:]]
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4]


def _fresh_model() -> torch.nn.Module:
    return _fresh_model_for()


def _fresh_model_for(**kw) -> torch.nn.Module:
    """The injected torch model a run of ``_cfg(**kw)`` starts from."""
    cfg = _cfg("-", **kw)
    bundle = torch_loop.build_model(cfg)
    torch_loop._prepare(bundle, cfg, verbose=False)
    return bundle.model


def test_resume_bit_exact_lora_adamw_bfloat16(tmp_path):
    # the step program of test_cli_jsonl_training_lowers_the_loss (batch 8, no accumulation): compiled once
    kw = dict(method="lora", optimizer="adamw", lr=3e-2, dtype="bfloat16", batch_size=8, grad_accum=1)
    straight = jax_loop.train(_cfg(tmp_path / "a", **kw))
    jax_loop.train(_cfg(tmp_path / "b", max_steps=2, **kw))
    rest = jax_loop.train(_cfg(tmp_path / "b", resume="latest", **kw))
    got, want = _np(rest.params), _np(straight.params)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert any(np.abs(want[k]).max() > 0 for k in want if k.endswith("lora_b"))  # lora_b left zero: trained
    assert rest.bundle.model.shared.weight.dtype == torch.bfloat16
    assert {p.dtype for p in adapters.adapter_state_dict(rest.bundle.model).values()} == {torch.float32}


def test_checkpoint_layout_matches_the_torch_trainer(straight):
    ckpt = straight.checkpoint
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter.safetensors", "optimizer.safetensors", "state.json"]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["framework"] == "jax" and state["step"] == 4
    assert state["data_stream"]["position"] == 32  # 4 steps x 2 micro-batches x 4 examples
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "adapter.safetensors"))
    assert saved.keys() == adapters.adapter_state_dict(_fresh_model()).keys()
    for k, v in saved.items():
        assert np.array_equal(v.numpy(), np.asarray(straight.params[k])), k
    assert sum(v.numel() for v in saved.values()) == straight.trainable < straight.total / 5


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(method="lora"), "adapter_config.method: checkpoint 'mov' vs this run 'lora'"),
        (dict(num_experts=2), "adapter_config.num_experts: checkpoint 3 vs this run 2"),
        (dict(init=json.dumps(SHAPE | {"d_ff": 40})), r"model.config.d_ff: checkpoint 48 vs this run 40"),
        (dict(optimizer="adamw"), "train_config.optimizer: checkpoint 'adafactor' vs this run 'adamw'"),
    ],
)
def test_checkpoint_from_another_run_is_refused(straight, tmp_path, change, message):
    with pytest.raises(CheckpointMismatch, match="another run configuration.*" + message):
        jax_loop.train(_cfg(tmp_path, resume=str(straight.checkpoint), **change))


def test_checkpoint_from_the_other_framework_is_refused(straight, tmp_path):
    with pytest.raises(
        CheckpointMismatch, match="written by pemoe train --framework jax, this run is --framework torch"
    ):
        torch_loop.train(_cfg(tmp_path / "t", resume=str(straight.checkpoint)))
    torch_run = torch_loop.train(_cfg(tmp_path / "u", max_steps=1, grad_accum=1))
    with pytest.raises(
        CheckpointMismatch, match="written by pemoe train --framework torch, this run is --framework jax"
    ):
        jax_loop.train(_cfg(tmp_path / "v", resume=str(torch_run.checkpoint)))


# ---------------------------------------------------------------------------------------------
# the command line: training, evaluation by the torch `pemoe eval`, refused options


def test_cli_jsonl_training_lowers_the_loss(tmp_path, capsys):
    """8 examples, batch 8: every step sees the same examples, so the loss must fall step after step."""
    data = tmp_path / "d.jsonl"
    words = "cat dog sun tree book lamp fish bird".split()
    rows = [{"task": "t", "input": f"please repeat the word {w}", "target": w} for w in words]  # [8, 32] / [8, 16]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--framework", "jax", "--init", TINY, "--data", str(data), "--method", "lora", "--dtype"]
    args += [
        "bfloat16",
        "--optimizer",
        "adamw",
        "--lr",
        "3e-2",
        "--batch-size",
        "8",
        "--max-steps",
        "6",
        "--max-input-len",
        "32",
    ]
    args += ["--max-target-len", "16", "--no-progress", "--log-every", "1", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "step 6/6  loss" in err and "tokens/s" in err
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "o" / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 6 and all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert json.loads((tmp_path / "o" / "train_config.json").read_text())["framework"] == "jax"


def test_torch_eval_reads_the_jax_adapter(tmp_path, capsys):
    """JAX-trained MoLoRA on a transformers T5 directory: its adapter file, scored by the torch `pemoe eval`,
    gives the accuracy the JAX trainer measured; per-choice scores agree (|Δ| ≤ 1e-4·max(1, |score|)).
    The transformers backbone trains to the same losses as pemoe's (rel 1e-5)."""
    from tests.t5_tiny import hf_t5

    model_dir = tmp_path / "hf"
    hf_t5("v1.0", vocab_size=260).save_pretrained(model_dir)
    kw = dict(init=None, model=str(model_dir), method="molora", num_experts=2, rank=2, optimizer="adamw", lr=1e-2)
    kw |= dict(max_steps=2, eval_data=EVAL, eval_every=1, eval_batch_size=128)
    result = jax_loop.train(_cfg(tmp_path / "o", **kw))
    evals = [json.loads(s) for s in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval"] == [1, 2] and (tmp_path / "o" / "eval.md").is_file()
    hf = jax_loop.train(_cfg(tmp_path / "o_hf", backbone="transformers", **(kw | dict(eval_data=None))))
    for (_, a), (_, b) in zip(result.losses, hf.losses, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    jax_acc = result.evals[-1][1].average
    adapter = tmp_path / "o" / "adapter.safetensors"
    args = ["eval", "--model", str(model_dir), "--adapter", str(adapter), "--data", EVAL, "--max-input-len", "32"]
    assert main([*args, "--max-target-len", "16", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["average"] == pytest.approx(jax_acc)

    bundle = torch_loop.load_trained_model(str(model_dir), adapter=str(adapter))
    weights = adapters.adapter_state_dict(bundle.model)
    assert any(weights[k].abs().max() > 0 for k in weights if k.endswith("lora_b"))  # trained, not the init
    examples = load_dataset(EVAL).examples
    want = score_choices(bundle.model, bundle.tokenizer, examples, **LENS)
    got = score_choices(result.bundle.model, bundle.tokenizer, examples, **LENS)  # torch model, JAX weights
    trainable, frozen = jax_loop.split_params(bundle.model, list(weights))
    config, adapter_config = T5Config(**bundle.t5_config), adapters.adapter_config(bundle.model)
    jax_model = jax_loop.eval_model(config, adapter_config, "auto", frozen)
    jax_model.trainable = trainable
    via_jax = score_choices(jax_model, bundle.tokenizer, examples, batch_size=128, **LENS)  # as in training
    for w, g, j in zip(want, got, via_jax, strict=True):
        assert w == g  # the same torch model and weights
        assert np.allclose(j, w, rtol=0, atol=1e-4 * max(1.0, max(map(abs, w))))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "full"], "--framework jax trains adapters only"),
        (["--dropout", "0.1"], "--framework jax has no dropout"),
        (["--threads", "2"], "--threads sets PyTorch's CPU threads"),
        (["--implementation", "torch"], "'torch' is not a pemoe.jax implementation"),
        (["--implementation", "cuda"], "'cuda' is not a pemoe.jax implementation"),
        (["--mesh", "data=two"], "--mesh must be data=N"),
        (["--mesh", "data=3"], "--mesh data=3 must divide the examples per step"),
        (["--framework", "torch", "--mesh", "data=2"], "--mesh applies to --framework jax only"),
    ],
)
def test_cli_refuses_what_jax_does_not_do(tmp_path, capsys, extra, message):
    args = ["train", "--framework", "jax", "--init", TINY, "--data", DATA, "--max-steps", "1", "--batch-size", "4"]
    assert main([*args, "--no-progress", "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_jsonl_line_names_file_and_line(tmp_path, capsys):
    good = json.dumps({"task": "t", "input": "a", "target": "b"})
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n{{oops\n")
    args = ["train", "--framework", "jax", "--init", TINY, "--data", str(path), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert f"{path}:2: not valid JSON" in capsys.readouterr().err


def test_torch_parallel_modes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--parallel ddp is torch.distributed"):
        jax_loop.train(_cfg(tmp_path, parallel="ddp"))


def test_dropout_of_the_model_is_refused(tmp_path):
    from tests.t5_tiny import hf_t5

    model = hf_t5("v1.0", vocab_size=260)
    model.config.dropout_rate = 0.1
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="dropout_rate is 0.1: pass --dropout 0"):
        jax_loop.train(_cfg(tmp_path / "o", init=None, model=str(tmp_path / "hf")))


# ---------------------------------------------------------------------------------------------
# --mesh: the step of pemoe.jax.parallel over 8 simulated CPU devices

_MESH_SCRIPT = """
import sys
from pemoe.cli import main
args = sys.argv[1:]
assert main([*args, "--out", "OUT/one"]) == 0
assert main([*args, "--out", "OUT/mesh", "--mesh", "data=4,model=2"]) == 0
"""


def test_mesh_gives_the_single_device_run(tmp_path):
    """--mesh data=4,model=2 (batch split over 4, backbone over 2) vs one device, MoLoRA + AdamW, 3 steps of 2
    micro-batches: losses within rel 1e-5, adapter weights within 1e-3·max|Δθ| (float32 reduction order)."""
    import subprocess
    import sys

    from safetensors.numpy import load_file

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    args = ["--framework", "jax", "--init", TINY, "--data", DATA, "--method", "molora", "--num-experts", "2"]
    args += ["--rank", "2", "--optimizer", "adamw", "--lr", "1e-2", "--batch-size", "4", "--grad-accum", "2"]
    args += ["--max-steps", "3", "--max-input-len", "32", "--max-target-len", "16", "--no-progress", "--log-every", "0"]
    script = _MESH_SCRIPT.replace("OUT", str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", script, "train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {}
    for name in ("one", "mesh"):
        metrics = [json.loads(s) for s in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = ([r["loss"] for r in metrics], load_file(str(tmp_path / name / "adapter.safetensors")))
        assert json.loads((tmp_path / name / "train_config.json").read_text())["mesh"] == (
            None if name == "one" else "data=4,model=2"
        )
    (loss_one, w_one), (loss_mesh, w_mesh) = runs["one"], runs["mesh"]
    assert loss_mesh == pytest.approx(loss_one, rel=1e-5)
    init = jax_loop.split_params(_fresh_model_for(method="molora", num_experts=2, rank=2), list(w_one))[0]
    moved = max(float(np.abs(w_one[k] - np.asarray(init[k])).max()) for k in w_one)
    assert moved > 1e-3
    for k in w_one:
        assert np.abs(w_mesh[k] - w_one[k]).max() <= 1e-3 * moved, k
