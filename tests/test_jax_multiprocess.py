"""Multi-process JAX (``jax.distributed``): 2 processes × 4 simulated CPU devices give the single-process result.

Two worker processes (``python -m tests.test_jax_multiprocess PORT PROCESS_ID OUT``, 4 CPU devices each by
``XLA_FLAGS``) join one job on 127.0.0.1:PORT over JAX's CPU collectives (gloo, jax 0.10's default
``jax_cpu_collectives_implementation``), so every mesh spans 8 devices in 2 processes. Each worker:

  1. runs ``pemoe train --framework jax --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I`` (the
     CLI calls ``jax.distributed.initialize``) with ``--mesh data=4,model=2`` for 3 steps with an end-of-run
     evaluation; then the same training through ``jax_loop.train`` where process 1 alone gets SIGINT after
     step 1 (both must stop at step 1, process 0 writes the checkpoint), resumed with ``--resume`` to step 3;
     then the same command with another ``--seed`` on process 1 (must be refused on both processes);
  2. checks the placement helpers on global arrays built from host data (global and process-local batches,
     an interleaved mesh where a process's rows are not contiguous, replicated and model-sharded weights);
  3. trains the tiny T5 of tests/test_jax_parallel.py for two SGD steps with ``parallel.make_train_step``
     over data=8 (MoV) and data=4 × model=2 (MoLoRA), and on its own first device (``mesh=None``) as baseline.

The test runs ``pemoe train`` once more in this process (one device) as the single-process baseline of (1).

Tolerance rule (float32; only the summation order across shards and processes may differ):
  * (3) the rule of tests/test_jax_parallel.py: loss ≤ 2e-6 relative, update max|Δ − Δ_1dev| ≤ 1e-4 · max|Δ_1dev|;
  * (1) the rule of tests/test_train_jax.py's ``--mesh`` test: loss ≤ 1e-5 relative, adapter weights within
    1e-3 · max|θ_3 − θ_0| (AdamW divides by √v, which amplifies reduction-order differences of tiny gradients);
    held-out accuracy equal; the resumed run equals the uninterrupted multi-process run bit for bit.
  * (2) exact (np.array_equal): placement copies values.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

REPO = Path(__file__).resolve().parent.parent
LOCAL_DEVICES = 4
PROCESSES = 2
TINY = json.dumps(
    dict(
        d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
)  # fmt: skip
TRAIN_ARGS = [
    "train", "--framework", "jax", "--init", TINY, "--data", "synthetic:train:train=1,eval=1", "--method", "molora",
    "--num-experts", "2", "--rank", "2", "--optimizer", "adamw", "--lr", "1e-2", "--batch-size", "4",
    "--grad-accum", "2", "--max-steps", "3", "--max-input-len", "32", "--max-target-len", "16", "--no-progress",
    "--log-every", "0", "--eval-data", "synthetic:heldout:train=1,eval=1",
]  # fmt: skip
MESH = "data=4,model=2"
# (3): (case, adapter, data, model); the loop of (1) covers MoLoRA over data=4 × model=2 already
STEP_CASES = (("mov-data8", "mov", 8, 1),)
LOSS_RTOL_STEP, UPDATE_RTOL_STEP = 2e-6, 1e-4  # (3)
LOSS_RTOL_LOOP, WEIGHT_RTOL_LOOP = 1e-5, 1e-3  # (1)


# ---------------------------------------------------------------------------------------------
# the worker (one of the two processes)


def _run_loop(out: Path, pid: int, coordinator: str) -> dict:
    """(1): the CLI run, the SIGINT-on-process-1 run and its resume, and a refused run with another seed."""
    import contextlib
    import io

    from pemoe.cli import main
    from pemoe.train import jax_loop
    from pemoe.train.cli import add_train_parser

    job = ["--coordinator", coordinator, "--num-processes", str(PROCESSES), "--process-id", str(pid)]
    facts: dict = {}
    t0 = time.perf_counter()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        facts["cli_rc"] = main([*TRAIN_ARGS, *job, "--mesh", MESH, "--out", str(out / "mp")])
    facts["cli_stdout"] = stdout.getvalue()
    facts["cli_s"] = time.perf_counter() - t0

    import argparse

    from pemoe.train.loop import TrainConfig

    parser = argparse.ArgumentParser()
    args = add_train_parser(parser.add_subparsers(dest="command")).parse_args(
        [*TRAIN_ARGS[1:], "--out", str(out / "int")]
    )
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**(fields | {"out": str(fields["out"])}))

    def on_step(step: int, loss: float) -> None:
        if pid == 1 and step == 1:  # only process 1 is interrupted
            os.kill(os.getpid(), signal.SIGINT)

    res = jax_loop.train(cfg, mesh=MESH, distributed={}, on_step=on_step)
    facts["sigint_s"] = time.perf_counter() - t0
    facts["interrupted"] = (res.interrupted, res.step, str(res.checkpoint))
    with contextlib.redirect_stdout(io.StringIO()):
        facts["resume_rc"] = main([*TRAIN_ARGS, *job, "--mesh", MESH, "--out", str(out / "int"), "--resume"])
    facts["resume_s"] = time.perf_counter() - t0
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        seed = ["--seed", str(pid)]
        facts["seed_rc"] = main([*TRAIN_ARGS, *job, *seed, "--max-steps", "1", "--out", str(out / f"seed{pid}")])
    facts["seed_stderr"] = stderr.getvalue()
    facts["seed_s"] = time.perf_counter() - t0
    print({k: round(v, 1) for k, v in facts.items() if k.endswith("_s")}, flush=True)
    return facts


def _check_placement(pid: int) -> dict:
    """(2): every addressable shard of each global array equals the host value at its index."""
    import jax
    from jax.sharding import Mesh

    from pemoe.jax import parallel

    def exact(arr, host) -> bool:
        return arr.shape == host.shape and all(
            np.array_equal(np.asarray(s.data), host[s.index]) for s in arr.addressable_shards
        )

    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(16, 3)).astype(np.float32), "y": rng.integers(0, 9, (16, 5)).astype(np.int32)}
    devices = jax.devices()
    interleaved = [devices[i // 2 + (i % 2) * LOCAL_DEVICES] for i in range(len(devices))]  # p0, p1, p0, ...
    meshes = {
        "data8": parallel.make_mesh(data=8),
        "data4_model2": parallel.make_mesh(data=4, model=2),
        "interleaved": Mesh(np.asarray(interleaved, dtype=object).reshape(8, 1), parallel.AXES),
    }
    facts: dict = {"rows": {}, "exact": {}}
    for name, mesh in meshes.items():
        rows = parallel.process_batch_indices(mesh, 16)
        facts["rows"][name] = rows.tolist()
        global_ = parallel.shard_batch(batch, mesh)
        local = parallel.shard_batch({k: v[rows] for k, v in batch.items()}, mesh, process_local=True)
        facts["exact"][f"{name}/global"] = all(exact(global_[k], batch[k]) for k in batch)
        facts["exact"][f"{name}/local"] = all(exact(local[k], batch[k]) for k in batch)
        facts["exact"][f"{name}/fully_addressable"] = global_["x"].is_fully_addressable
    mesh = meshes["data4_model2"]
    weights = {
        "encoder.block.0.layer.0.SelfAttention.q.weight": rng.normal(size=(8, 6)).astype(np.float32),
        "encoder.block.0.layer.1.DenseReluDense.wo.weight": rng.normal(size=(6, 8)).astype(np.float32),
        "encoder.final_layer_norm.weight": rng.normal(size=(6,)).astype(np.float32),
    }
    frozen = parallel.shard_frozen(weights, mesh, min_size=0)
    facts["exact"]["shard_frozen"] = all(exact(frozen[k], weights[k]) for k in weights)
    facts["frozen_specs"] = {k: str(v.sharding.spec) for k, v in frozen.items()}
    replicated = parallel.replicate({"w": weights["encoder.final_layer_norm.weight"], "n": np.int32(3)}, mesh)
    facts["exact"]["replicate"] = exact(replicated["w"], weights["encoder.final_layer_norm.weight"])
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"  # model-sharded, resharded to replicated
    facts["exact"]["replicate/resharded"] = exact(parallel.replicate(frozen, mesh)[q], weights[q])
    facts["gather"] = parallel.gather_from_processes(np.array([pid, 10 + pid], np.int32)).tolist()
    facts["again"] = parallel.initialize_distributed()  # already joined: the same answer
    return facts


def _train_steps() -> dict:
    """(3): two SGD steps of the tiny T5 over global meshes, and on this process's first device."""
    from pemoe.jax import parallel
    from tests import test_jax_parallel as tp

    batch = tp._batch()
    out: dict = {}
    for name, adapter, data, model in STEP_CASES:
        config, adapter_cfg, trainable, frozen = tp._model(adapter)
        loss = functools.partial(tp.token_loss, config=config, adapter=adapter_cfg, implementation="xla")
        base = tp._train(loss, trainable, frozen, batch, None, "jit")[:2]
        mesh = parallel.make_mesh(data=data, model=model)
        losses, delta, facts, _, _ = tp._train(loss, trainable, frozen, batch, mesh, "shard_map")
        out[name] = dict(base=base, losses=losses, delta=delta, facts=facts)
    return out


def worker(port: str, pid: int, out: Path) -> None:
    os.environ.setdefault("PEMOE_PALLAS_INTERPRET", "1")
    t0 = time.perf_counter()
    facts: dict = {"loop": _run_loop(out, pid, f"127.0.0.1:{port}")}
    import jax

    t1 = time.perf_counter()
    facts["job"] = (jax.process_index(), jax.process_count(), jax.device_count(), jax.local_device_count())
    facts["collectives"] = jax.config.jax_cpu_collectives_implementation
    facts["placement"] = _check_placement(pid)
    t2 = time.perf_counter()
    facts["steps"] = _train_steps()
    t3 = time.perf_counter()
    print(f"process {pid}: loop {t1 - t0:.1f} s, placement {t2 - t1:.1f} s, steps {t3 - t2:.1f} s", flush=True)
    with open(out / f"facts{pid}.pkl", "wb") as f:
        pickle.dump(facts, f)


# ---------------------------------------------------------------------------------------------
# the tests


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """Run the two workers and, meanwhile, the single-process baseline of (1) here."""
    from tests import test_jax_parallel as tp

    out = tmp_path_factory.mktemp("jax_multiprocess")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PEMOE_PALLAS_INTERPRET="1")
    # cheaper LLVM codegen, as tests/test_jax_parallel.py (compile-bound); the collectives are HLO, unaffected
    flags = f"--xla_force_host_platform_device_count={LOCAL_DEVICES} {tp.FAST_COMPILE}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    env.setdefault("TRITON_CACHE_DIR", str(REPO / ".cache" / "triton"))
    port = str(_free_port())
    logs = [open(out / f"log{pid}.txt", "w") for pid in range(PROCESSES)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.test_jax_multiprocess", port, str(pid), str(out)],
            cwd=REPO,
            env=env,
            stdout=logs[pid],
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for pid in range(PROCESSES)
    ]
    try:
        from pemoe.cli import main

        with contextlib.redirect_stdout(open(os.devnull, "w")):
            assert main([*TRAIN_ARGS, "--out", str(out / "one")]) == 0
        deadline = time.monotonic() + 300  # a failed worker leaves the other one waiting in a collective: stop both
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for log in logs:
            log.close()
    for pid, proc in enumerate(procs):
        text = (out / f"log{pid}.txt").read_text()
        assert proc.returncode == 0, f"worker {pid} failed (rc {proc.returncode}):\n{text[-6000:]}"
    facts = []
    for pid in range(PROCESSES):
        with open(out / f"facts{pid}.pkl", "rb") as f:
            facts.append(pickle.load(f))
    return {"out": out, "facts": facts}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def _adapter(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run / "adapter.safetensors"))


def test_the_job_spans_both_processes(job):
    for pid, facts in enumerate(job["facts"]):
        assert facts["job"] == (pid, PROCESSES, PROCESSES * LOCAL_DEVICES, LOCAL_DEVICES)
        assert facts["collectives"] == "gloo"
        assert facts["placement"]["gather"] == [[0, 10], [1, 11]]
        assert facts["placement"]["again"] == (pid, PROCESSES)


def test_cli_run_gives_the_single_process_run(job):
    """(1) Loss per step, adapter weights and held-out accuracy of 2 processes × 4 devices (data=4, model=2) vs
    one process on one device; process 0 alone writes the outputs and prints the summary."""
    out = job["out"]
    f0, f1 = (f["loop"] for f in job["facts"])
    assert f0["cli_rc"] == 0 and f1["cli_rc"] == 0
    assert "pemoe train: step 3" in f0["cli_stdout"] and f1["cli_stdout"] == ""
    one, mp = _metrics(out / "one"), _metrics(out / "mp")
    assert [m["kind"] for m in mp] == ["train"] * 3 + ["eval"], "one record per step: only process 0 writes"
    np.testing.assert_allclose(
        [m["loss"] for m in mp if m["kind"] == "train"], [m["loss"] for m in one if m["kind"] == "train"],
        rtol=LOSS_RTOL_LOOP, atol=0,
    )  # fmt: skip
    assert mp[-1]["average"] == one[-1]["average"]
    config = json.loads((out / "mp" / "train_config.json").read_text())
    assert config["mesh"] == MESH and config["processes"] == PROCESSES
    w_one, w_mp = _adapter(out / "one"), _adapter(out / "mp")
    from pemoe.train import jax_loop
    from pemoe.train.loop import TrainConfig, _prepare, build_model

    cfg = TrainConfig(data="synthetic:train:train=1,eval=1", out="-", init=TINY, method="molora", num_experts=2, rank=2)
    bundle = build_model(cfg)
    _prepare(bundle, cfg, verbose=False)
    init = jax_loop.split_params(bundle.model, list(w_one))[0]
    moved = max(float(np.abs(w_one[k] - np.asarray(init[k])).max()) for k in w_one)
    assert moved > 1e-3, "the adapters barely moved: the weight check would be too weak"
    assert sorted(w_mp) == sorted(w_one)
    for k in w_one:
        assert np.abs(w_mp[k] - w_one[k]).max() <= WEIGHT_RTOL_LOOP * moved, k


def test_sigint_on_one_process_stops_both_and_resume_is_exact(job):
    out = job["out"]
    f0, f1 = (f["loop"] for f in job["facts"])
    ckpt = str(out / "int" / "checkpoints" / "step-00000001")
    assert f0["interrupted"] == f1["interrupted"] == (True, 1, ckpt)
    assert f0["resume_rc"] == 0 and f1["resume_rc"] == 0
    assert [m["step"] for m in _metrics(out / "int") if m["kind"] == "train"] == [1, 2, 3]
    resumed, straight = _adapter(out / "int"), _adapter(out / "mp")
    assert sorted(resumed) == sorted(straight)
    for k in straight:
        assert np.array_equal(resumed[k], straight[k]), k


def test_processes_that_disagree_are_refused(job):
    for facts in job["facts"]:
        assert facts["loop"]["seed_rc"] == 2
        assert "do not hold the same" in facts["loop"]["seed_stderr"], facts["loop"]["seed_stderr"][-2000:]
    assert not (job["out"] / "seed0" / "metrics.jsonl").exists() or _metrics(job["out"] / "seed0") == []


def test_placement_helpers_on_global_arrays(job):
    """(2) Rows per process (contiguous and interleaved meshes) and exact values of every addressable shard."""
    want_rows = {
        "data8": [list(range(0, 8)), list(range(8, 16))],
        "data4_model2": [list(range(0, 8)), list(range(8, 16))],
        "interleaved": [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]],
    }
    for pid, facts in enumerate(job["facts"]):
        placement = facts["placement"]
        assert {k: v[pid] for k, v in want_rows.items()} == placement["rows"]
        assert all(placement["exact"][k] for k in placement["exact"] if not k.endswith("fully_addressable"))
        assert not any(placement["exact"][k] for k in placement["exact"] if k.endswith("fully_addressable"))
        assert placement["frozen_specs"] == {
            "encoder.block.0.layer.0.SelfAttention.q.weight": str(P("model", None)),
            "encoder.block.0.layer.1.DenseReluDense.wo.weight": str(P(None, "model")),
            "encoder.final_layer_norm.weight": str(P()),
        }


@pytest.mark.parametrize("case", [c[0] for c in STEP_CASES])
def test_train_step_over_processes_matches_one_device(job, case):
    """(3) parallel.make_train_step (shard_map) over 8 devices of 2 processes vs one device: loss and update."""
    for facts in job["facts"]:
        got = facts["steps"][case]
        want_losses, want_delta = got["base"]
        assert want_losses[1] < want_losses[0], "SGD did not reduce the loss"
        np.testing.assert_allclose(got["losses"], want_losses, rtol=LOSS_RTOL_STEP, atol=0)
        err = max(float(np.abs(got["delta"][k] - want_delta[k]).max()) for k in want_delta)
        scale = max(float(np.abs(want_delta[k]).max()) for k in want_delta)
        assert scale > 1e-3 and err <= UPDATE_RTOL_STEP * scale, (case, err, scale)
    d0, d1 = (f["steps"][case]["delta"] for f in job["facts"])
    assert all(np.array_equal(d0[k], d1[k]) for k in d0), "the replicated adapters differ between processes"


def test_bad_distributed_arguments():
    from pemoe.jax import parallel

    with pytest.raises(ValueError, match="coordinator must be 'HOST:PORT'"):
        parallel.initialize_distributed("localhost", 2, 0)
    with pytest.raises(ValueError, match="process_id must be < num_processes = 2"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="num_processes must be an int >= 1"):
        parallel.initialize_distributed("127.0.0.1:1234", 0, 0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--coordinator", "node0"], "coordinator must be 'HOST:PORT'"),
        (["--num-processes", "2", "--process-id", "2"], "process_id must be < num_processes = 2"),
        (["--framework", "torch", "--num-processes", "2"], "apply to --framework jax only (torch: torchrun)"),
    ],
)
def test_cli_refuses_bad_job_options(tmp_path, capsys, extra, message):
    from pemoe.cli import main

    assert main([*TRAIN_ARGS, "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
