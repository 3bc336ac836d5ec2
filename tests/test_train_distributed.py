"""``pemoe train`` under torchrun (2 ranks, gloo on the CPU): DDP and FSDP2 give the single-process result.

Each torchrun run is compared with an in-process single-process run of the same global batch. Tolerance rule:
the ranks sum float32 gradients in another order than one process does, so per step the losses agree to
rtol 1e-5, and every trained tensor agrees to ``TOL_UPDATE`` = 1e-2 times the size of the whole training update
of that tensor (max |w_ref − w_init|, plus one float32 ulp of its largest value). Adafactor divides each gradient
by a factored RMS, which amplifies summation-order error on router elements whose gradient nearly cancels: the
worst tensor measured 1.6e-3 of its update (AdamW: 4e-5). The rule is tight enough to fail for a wrong split: a
run that trains on one rank's rows of each batch misses every tensor by ≥ 0.5 of its update
(``test_tolerance_fails_...``), and a rank that saw the whole batch would report twice the loss (summed over
ranks) and the wrong per-rank example counts.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pemoe.train.data import encode_batch
from pemoe.train.distributed import ParallelContext, setup, torchrun_world
from pemoe.train.loop import RUN_TIME_FIELDS, TrainConfig, _prepare, build_model, train
from pemoe.train.tokenizer import ByteTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAPE = dict(d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)
SHAPE |= dict(relative_attention_num_buckets=8, relative_attention_max_distance=16)
TINY = json.dumps(SHAPE)
DATA = "synthetic:train:train=1,eval=1"  # ~85 examples
TOL_UPDATE = 1e-2  # allowed error / size of the training update (float32 summation order across ranks)
LOSS_RTOL = 1e-5
TORCHRUN_TIMEOUT = 180


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _args(**kw) -> dict:
    """One run's settings (TrainConfig field names); a larger lr than the default so updates are well above
    float32 rounding of the weights."""
    base = dict(
        data=DATA,
        init=TINY,
        method="mov",
        num_experts=3,
        optimizer="adafactor",
        lr=1e-2,
        batch_size=5,  # odd: the ranks get 3 and 2 rows
        grad_accum=2,
        max_steps=3,
        max_input_len=48,
        max_target_len=12,
        checkpoint_every=1,
        keep_checkpoints=3,
        progress=False,
        log_every=0,
    )
    base.update(kw)
    return base


def _cli(args: dict) -> list[str]:
    out = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if key == "progress":
            out += [] if value else ["--no-progress"]
        elif key == "resume":
            out += [flag] if value == "latest" else [flag, str(value)]
        else:
            out += [flag, str(value)]
    return out


def _torchrun(args: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"]
    cmd += ["-m", "pemoe.cli", "train", *_cli(args), "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def _single(out: pathlib.Path, args: dict):
    return train(TrainConfig(out=str(out), **args))


def _initial(args: dict) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(out="-", **args)
    bundle = build_model(cfg)
    return {n: p.detach().clone() for n, p in _prepare(bundle, cfg, verbose=False)}


def _train_lines(out: pathlib.Path) -> list[dict]:
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines() if s.strip()]
    return [r for r in lines if r["kind"] == "train"]


def _update_errors(got: dict, want: dict, init: dict) -> dict[str, float]:
    """Per tensor: max |got − want| / (max |want − init| + ulp(max |want|)), the quantity held to TOL_UPDATE."""
    assert got.keys() == want.keys() == init.keys()
    out = {}
    for k in want:
        update = (want[k] - init[k]).abs().max().item()
        ulp = torch.finfo(torch.float32).eps * want[k].abs().max().item()
        out[k] = (got[k] - want[k]).abs().max().item() / (update + ulp)
    return out


def _assert_same_run(got_out: pathlib.Path, ref_out: pathlib.Path, init: dict, steps: list[int]) -> None:
    got, want = load_file(str(got_out / "adapter.safetensors")), load_file(str(ref_out / "adapter.safetensors"))
    assert any((want[k] - init[k]).abs().max() > 1e-3 for k in want)  # the run did train
    errors = _update_errors(got, want, init)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL_UPDATE, f"{worst}: error {errors[worst]:.2e} of the update (tol {TOL_UPDATE})"
    got_loss = {r["step"]: r["loss"] for r in _train_lines(got_out)}
    want_loss = {r["step"]: r["loss"] for r in _train_lines(ref_out)}
    for s in steps:
        assert got_loss[s] == pytest.approx(want_loss[s], rel=LOSS_RTOL), s


def test_ddp_matches_single_process_and_resumes_in_one_process(tmp_path):
    """2 ranks, DDP, MoV + Adafactor, an odd global batch (3 + 2 rows) with accumulation: same losses and
    weights as one process; its step-2 checkpoint resumes in one process to the same step-3 result."""
    args = _args()
    ref = _single(tmp_path / "ref", args)
    init = _initial(args)
    _torchrun({**args, "out": tmp_path / "ddp"})
    _assert_same_run(tmp_path / "ddp", tmp_path / "ref", init, steps=[1, 2, 3])
    lines = _train_lines(tmp_path / "ddp")
    assert [r["rank_examples"] for r in lines] == [[6, 4]] * 3  # 2 micro-batches of 3 and 2 rows per step
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints" / "step-00000003").iterdir()) == [
        "adapter.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    # the 2-rank checkpoint (full tensors, rank 1's RNG state beside rank 0's) resumes in one process
    ckpt = tmp_path / "ddp" / "checkpoints" / "step-00000002"
    assert "rng.torch.rank1" in load_file(str(ckpt / "optimizer.safetensors"))
    (tmp_path / "one" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, tmp_path / "one" / "checkpoints" / ckpt.name)
    shutil.copy(tmp_path / "ddp" / "metrics.jsonl", tmp_path / "one" / "metrics.jsonl")
    resumed = _single(tmp_path / "one", {**args, "resume": "latest"})
    assert (resumed.start_step, resumed.step) == (2, 3)
    _assert_same_run(tmp_path / "one", tmp_path / "ref", init, steps=[3])
    assert ref.step == 3


def test_fsdp_resumes_a_single_process_checkpoint_and_matches(tmp_path):
    """FSDP2 (backbone sharded, adapters replicated), MoLoRA + AdamW: resumed from a one-process step-1
    checkpoint, 2 ranks train steps 2 and 3 to the one-process result."""
    args = _args(method="molora", optimizer="adamw", batch_size=4, grad_accum=2)
    _single(tmp_path / "ref", args)
    init = _initial(args)
    ckpt = tmp_path / "ref" / "checkpoints" / "step-00000001"
    (tmp_path / "fsdp" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, tmp_path / "fsdp" / "checkpoints" / ckpt.name)
    _torchrun({**args, "out": tmp_path / "fsdp", "parallel": "fsdp", "resume": "latest"})
    _assert_same_run(tmp_path / "fsdp", tmp_path / "ref", init, steps=[2, 3])
    assert [r["step"] for r in _train_lines(tmp_path / "fsdp")] == [2, 3]
    assert all(r["rank_examples"] == [4, 4] for r in _train_lines(tmp_path / "fsdp"))  # 2 micro-batches of 2


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_tiny_llama_under_torchrun_matches_single_process(tmp_path, parallel):
    """A causal LM (tiny-llama: grouped-query attention, RoPE, right padding) under 2 ranks: DDP with MoV +
    Adafactor, FSDP2 (each decoder layer a unit, adapters replicated) with MoLoRA + AdamW; the same losses and
    adapters as one process by the tolerance rule."""
    method, optimizer = ("mov", "adafactor") if parallel == "ddp" else ("molora", "adamw")
    args = _args(init="tiny-llama", method=method, optimizer=optimizer, max_steps=2, checkpoint_every=0)
    _single(tmp_path / "ref", args)
    init = _initial(args)
    _torchrun({**args, "out": tmp_path / parallel, "parallel": parallel})
    _assert_same_run(tmp_path / parallel, tmp_path / "ref", init, steps=[1, 2])
    assert all(r["rank_examples"] == [6, 4] for r in _train_lines(tmp_path / parallel))


@pytest.mark.slow
def test_fsdp_full_fine_tuning_shards_every_parameter(tmp_path):
    """--method full under FSDP2 (DTensor parameters, AdamW state), resumed from a one-process step-1 checkpoint
    (full tensors scattered into shards): the gathered model and optimizer state equal one process's."""
    args = _args(method="full", optimizer="adamw", lr=1e-3, batch_size=4, grad_accum=2, max_steps=2)
    _single(tmp_path / "ref", args)
    ckpt = tmp_path / "ref" / "checkpoints" / "step-00000001"
    (tmp_path / "fsdp" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, tmp_path / "fsdp" / "checkpoints" / ckpt.name)
    _torchrun({**args, "out": tmp_path / "fsdp", "parallel": "fsdp", "resume": "latest"})
    want = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    got = load_file(str(tmp_path / "fsdp" / "model" / "model.safetensors"))
    init = load_file(str(ckpt / "model.safetensors"))
    assert got.keys() == want.keys() and set(init) <= set(want)
    errors = _update_errors({k: got[k] for k in init}, {k: want[k] for k in init}, init)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL_UPDATE, f"{worst}: error {errors[worst]:.2e} of the update"
    step2 = "checkpoints/step-00000002/optimizer.safetensors"
    opt, ref_opt = load_file(str(tmp_path / "fsdp" / step2)), load_file(str(tmp_path / "ref" / step2))
    assert {k for k in opt if k.startswith("state.")} == {k for k in ref_opt if k.startswith("state.")}
    for k, v in ref_opt.items():
        if k.startswith("state.") and k.endswith("exp_avg"):  # full, unsharded, and the same moments
            assert opt[k].shape == v.shape
            scale = v.abs().max().item() + torch.finfo(torch.float32).eps
            assert (opt[k] - v).abs().max().item() <= TOL_UPDATE * scale, k


@pytest.mark.slow
def test_ddp_resume_at_the_same_world_size_is_bit_exact_with_dropout(tmp_path):
    """Dropout on: each rank has its own RNG stream, saved per rank, so 2 + 1 steps on 2 ranks equal 3 straight."""
    args = _args(dropout=0.1, checkpoint_every=0)
    _torchrun({**args, "out": tmp_path / "straight"})
    _torchrun({**args, "out": tmp_path / "split", "max_steps": 2})
    _torchrun({**args, "out": tmp_path / "split", "resume": "latest"})
    a = load_file(str(tmp_path / "straight" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {run: [r["loss"] for r in _train_lines(tmp_path / run)] for run in ("straight", "split")}
    assert losses["straight"] == losses["split"]


@pytest.mark.slow
def test_sigint_to_torchrun_checkpoints_every_rank_at_one_step(tmp_path):
    """Ctrl-C on the launcher: torchrun forwards SIGINT, the ranks agree on the step, rank 0 saves it."""
    args = _args(max_steps=100_000, checkpoint_every=0, out=tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    cmd += ["-m", "pemoe.cli", "train", *_cli(args), "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + TORCHRUN_TIMEOUT
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TORCHRUN_TIMEOUT)
    assert "interrupted; step" in err, err[-4000:]
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "state.json").is_file()
    step = json.loads((ckpts[0] / "state.json").read_text())["step"]
    assert [r["step"] for r in _train_lines(tmp_path / "run")] == list(range(1, step + 1))
    assert not (tmp_path / "run" / "adapter.safetensors").exists()  # interrupted: no final adapter


def test_tolerance_fails_a_run_that_trains_on_half_of_each_batch(tmp_path, monkeypatch):
    """The comparison rule is not vacuous: one process training on rank 0's rows only (as if the other
    rank's shard were lost or duplicated) misses the reference by far more than TOL_UPDATE."""
    args = _args()
    _single(tmp_path / "ref", args)
    init = _initial(args)
    rank0_of_2 = ParallelContext(mode="ddp", rank=0, world_size=2)
    shard = ParallelContext.shard_batch
    monkeypatch.setattr(ParallelContext, "shard_batch", lambda self, b: shard(rank0_of_2, b))
    _single(tmp_path / "half", args)
    monkeypatch.undo()
    got, want = (
        load_file(str(tmp_path / "half" / "adapter.safetensors")),
        load_file(str(tmp_path / "ref" / "adapter.safetensors")),
    )
    assert min(_update_errors(got, want, init).values()) > 10 * TOL_UPDATE  # every tensor is caught


# ---------------------------------------------------------------------------------------------
# the batch split and the setup checks (in-process)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rows_partition_the_global_batch(world):
    for batch_size in range(world, 12):
        parts = [ParallelContext(mode="ddp", rank=r, world_size=world).rows(batch_size) for r in range(world)]
        assert [i for s in parts for i in range(batch_size)[s]] == list(range(batch_size))
        sizes = [s.stop - s.start for s in parts]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_shard_batch_keeps_the_global_padding_and_counts():
    tok = ByteTokenizer()
    inputs = ["a", "a much longer input", "mid input", "x", "yy"]
    targets = ["t", "target", "a longer target", "", "z"]
    full = encode_batch(tok, inputs, targets, max_input_len=32, max_target_len=16)
    shards = [ParallelContext(mode="ddp", rank=r, world_size=2).shard_batch(full) for r in range(2)]
    assert [s.input_ids.shape[0] for s in shards] == [3, 2]
    for name in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"):
        assert torch.equal(torch.cat([getattr(s, name) for s in shards]), getattr(full, name)), name
    assert sum(s.num_input_tokens for s in shards) == full.num_input_tokens
    assert sum(s.num_target_tokens for s in shards) == full.num_target_tokens
    assert ParallelContext().shard_batch(full) is full


def test_torchrun_world_reads_and_checks_the_environment():
    assert torchrun_world({}) is None
    assert torchrun_world({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4, 1)
    assert torchrun_world({"RANK": "0", "WORLD_SIZE": "1"}) == (0, 1, 0)
    with pytest.raises(ValueError, match="RANK=4 must be < WORLD_SIZE=4"):
        torchrun_world({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE must be a non-negative integer"):
        torchrun_world({"RANK": "0", "WORLD_SIZE": "two"})


def _torchrun_env(monkeypatch, world: int | None) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    if world is not None:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("LOCAL_RANK", "0")


def test_setup_outside_torchrun(monkeypatch):
    _torchrun_env(monkeypatch, None)
    for mode in ("auto", "none"):
        par = setup(mode, method="mov", optimizer="adafactor", batch_size=1)
        assert (par.mode, par.world_size, par.is_main, par.owns_group) == ("none", 1, True, False)
    for mode in ("ddp", "fsdp"):
        with pytest.raises(ValueError, match=f"--parallel {mode} needs a torchrun launch"):
            setup(mode, method="mov", optimizer="adafactor", batch_size=8)


def test_setup_under_torchrun_with_one_process_needs_no_group(monkeypatch):
    _torchrun_env(monkeypatch, 1)
    par = setup("auto", method="mov", optimizer="adafactor", batch_size=1)
    assert (par.mode, par.world_size, par.owns_group) == ("none", 1, False)
    assert par.device == (torch.device("cuda", 0) if torch.cuda.is_available() else None)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "mode, method, optimizer, batch_size, message",
    [
        ("none", "mov", "adafactor", 8, "every rank would train alone"),
        ("ddp", "mov", "adafactor", 1, "--batch-size 1 is the global micro-batch, split over 2 ranks"),
        ("fsdp", "full", "adafactor", 8, "torch.optim.Adafactor cannot step sharded 2-D DTensor"),
        ("bogus", "mov", "adafactor", 8, "parallel must be one of"),
    ],
)
def test_setup_refuses_bad_combinations_before_starting_a_group(
    monkeypatch, mode, method, optimizer, batch_size, message
):
    _torchrun_env(monkeypatch, 2)
    with pytest.raises(ValueError, match=message):
        setup(mode, method=method, optimizer=optimizer, batch_size=batch_size)
    assert not torch.distributed.is_initialized()


def test_train_config_checks_parallel():
    with pytest.raises(ValueError, match="parallel must be one of"):
        TrainConfig(data=DATA, out="-", init=TINY, parallel="zero3")
    assert "parallel" in RUN_TIME_FIELDS  # a checkpoint resumes under any parallel mode and world size


def test_cli_refuses_parallel_with_the_jax_framework(tmp_path, capsys):
    from pemoe.cli import main

    code = main(
        ["train", "--init", TINY, "--data", DATA, "--out", str(tmp_path), "--framework", "jax"]
        + [
            "--parallel",
            "ddp",
        ]
    )
    assert code == 2
    assert "--parallel (torch.distributed DDP / FSDP) applies to --framework torch only" in capsys.readouterr().err
