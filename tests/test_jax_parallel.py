"""pemoe.jax.parallel: the train step over a device mesh gives the single-device loss and adapter update.

Multi-device cases run in one subprocess with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax is imported; this process's
jax already has one device). The worker (``python -m tests.test_jax_parallel OUT``) trains a tiny T5 with
MoV / MoLoRA adapters for two SGD steps per case, on one device (``mesh=None``) and on the mesh, and
writes losses, adapter updates and placement facts; the tests here compare them. Cases: data parallel over 8
devices; data=4 × model=2 with the backbone split over "model" (both step modes); and the shard_map step with
``implementation="pallas"`` at every adapter site (Pallas interpreter), where the jaxpr must show each kernel
launched inside the shard_map on the local rows. The 1-device baseline always runs the "xla" ops.

The loss is the test's own token-sum cross-entropy (labels < 0 ignored) returning ``(loss_sum, n_tokens)``;
per-row target lengths differ a lot, so the data shards hold very different token counts.

Tolerance rule (float32; the only difference allowed is summation order across shards and the
partitioner's reassociation of the sharded matmuls):
  * loss:    |loss_mesh − loss_1dev| ≤ 2e-6 · |loss_1dev|, per step;
  * update:  max|Δ_mesh − Δ_1dev| ≤ 1e-4 · max|Δ_1dev| over all adapter arrays, Δ = params after two steps −
    params before. SGD (not Adam) so Δ is proportional to the gradient: a gradient off by any factor fails.
A wrong split must fail this rule: the worker also runs a per-shard *mean* (mean of shard means with unequal
token counts) through the same step, and the test asserts it lands far outside the tolerance.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pemoe.jax import parallel

REPO = Path(__file__).resolve().parent.parent
DEVICES = 8
LOSS_RTOL = 2e-6
UPDATE_RTOL = 1e-4
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
ADAPTER_SUFFIXES = (".experts", ".router", ".lora_a", ".lora_b")

# case -> (adapter, data, model, mode, implementation); the 1-device baseline always uses "xla"
CASES = {
    "mov-data8-shard_map": ("mov", 8, 1, "shard_map", "xla"),
    "molora-data4-model2-shard_map": ("molora", 4, 2, "shard_map", "xla"),
    "molora-data4-model2-jit": ("molora", 4, 2, "jit", "xla"),
    "mov-data8-shard_map-pallas": ("mov", 8, 1, "shard_map", "pallas"),
    "molora-data8-shard_map-pallas": ("molora", 8, 1, "shard_map", "pallas"),
}
# Pallas kernel launches per layer (SPEC §3): MoV — one per mov_linear site (encoder self k, v; decoder self and
# cross k, v) and two per mov_ffn site (encoder, decoder); MoLoRA — two per site, the forward and the backward
# (dgrad) kernel (q, k, v, o × 3 attentions; wi_0, wo × 2 FFNs).
PALLAS_CALLS_PER_LAYER = {"mov": 6 + 2 * 2, "molora": 2 * (4 * 3 + 2 * 2)}
LAYERS = 1  # one encoder and one decoder block: every site kind, half the compile time of t5_tiny's two


# ---------------------------------------------------------------------------------------------
# the worker (runs in the 8-device subprocess; also importable)


def token_loss(trainable, frozen, batch, *, config, adapter, implementation):
    """Token-sum cross-entropy of t5_logits: (Σ over label tokens ≥ 0 of −log p(label), that token count)."""
    from pemoe.models.t5_jax import t5_logits

    logits = t5_logits(
        {**frozen, **trainable}, config, batch["input_ids"], batch["decoder_input_ids"], batch["attention_mask"],
        implementation, adapter=adapter,
    )  # fmt: skip
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    labels = batch["labels"]
    keep = labels >= 0
    nll = -jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(keep, nll, 0.0)), jnp.sum(keep)


def mean_of_shard_means(trainable, frozen, batch, **kw):
    """A wrong split on purpose: each shard's own token mean, counted as one 'token' (→ mean of means)."""
    loss_sum, n_tokens = token_loss(trainable, frozen, batch, **kw)
    return loss_sum / n_tokens, jnp.float32(1.0)


@functools.cache
def _model(adapter: str):
    import torch

    import pemoe
    from pemoe.adapters import adapter_config
    from pemoe.models.t5_jax import params_from_torch
    from tests import t5_tiny

    configs = {
        "mov": pemoe.MoVConfig(num_experts=3),
        "molora": pemoe.MoLoRAConfig(num_experts=3, rank=2, alpha=4.0),
    }
    model = t5_tiny.pemoe_t5("v1.1", num_layers=LAYERS)
    pemoe.inject(model, configs[adapter])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-trivial adapters: every gradient nonzero and routing far from uniform
        for name, p in model.named_parameters():
            if name.endswith("experts"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("router"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("lora_b"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    params = {k: np.asarray(v) for k, v in params_from_torch(model).items()}
    trainable = {k: v for k, v in params.items() if k.endswith(ADAPTER_SUFFIXES)}
    frozen = {k: v for k, v in params.items() if k not in trainable}
    return model.config, adapter_config(model), trainable, frozen


def _batch(batch_size: int = 16, src: int = 9, tgt: int = 6, seed: int = 3) -> dict[str, np.ndarray]:
    """Rows 2i, 2i+1 form data shard i of 8; target lengths (non-ignored labels) differ strongly by row."""
    from tests.t5_tiny import DIMS

    rng = np.random.default_rng(seed)
    ids = rng.integers(2, DIMS["vocab_size"], (batch_size, src))
    mask = np.ones((batch_size, src), np.int32)
    mask[1::3, src - 3 :] = 0
    labels = rng.integers(2, DIMS["vocab_size"], (batch_size, tgt))
    lengths = np.array([6, 6, 1, 1, 6, 5, 2, 1, 6, 6, 6, 6, 1, 2, 3, 6])[:batch_size]
    labels[np.arange(tgt)[None, :] >= lengths[:, None]] = -100
    dec = np.concatenate([np.zeros((batch_size, 1), np.int64), np.maximum(labels[:, :-1], 0)], axis=1)
    return dict(
        input_ids=ids.astype(np.int32), attention_mask=mask, decoder_input_ids=dec.astype(np.int32),
        labels=labels.astype(np.int32),
    )  # fmt: skip


def _train(loss, trainable, frozen, batch, mesh, mode, steps: int = 2, lr: float = 0.5):
    import optax

    optimizer = optax.sgd(lr)
    step = parallel.make_train_step(loss, optimizer, mesh, mode=mode)
    params = {k: jnp.asarray(v) for k, v in trainable.items()}
    opt_state = optimizer.init(params)
    if mesh is None:
        frozen = {k: jnp.asarray(v) for k, v in frozen.items()}
    else:
        params, opt_state = parallel.replicate((params, opt_state), mesh)
        frozen = parallel.shard_frozen(frozen, mesh, min_size=0)
        batch = parallel.shard_batch(batch, mesh)
    losses = []
    for _ in range(steps):
        params, opt_state, value = step(params, opt_state, frozen, batch)
        losses.append(float(value))
    facts = {
        "trainable_specs": sorted({str(v.sharding.spec) for v in params.values()}) if mesh else [],
        "frozen_specs": {k: str(v.sharding.spec) for k, v in frozen.items()} if mesh else {},
        "frozen_shard_shapes": {k: v.addressable_shards[0].data.shape for k, v in frozen.items()} if mesh else {},
    }
    delta = {k: np.asarray(params[k]) - trainable[k] for k in trainable}
    return np.array(losses), delta, facts, step, (params, opt_state, frozen, batch)


def _pallas_calls(jaxpr, inside_shard_map: bool = False, found=None) -> list[tuple[bool, tuple]]:
    """(inside a shard_map?, x operand shape) of every pallas_call in a jaxpr, nested jaxprs included."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "pallas_call":
            found.append((inside_shard_map, tuple(eqn.invars[0].aval.shape)))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _pallas_calls(inner, inside_shard_map or name == "shard_map", found)
    return found


def worker(out: str) -> None:
    os.environ["PEMOE_PALLAS_INTERPRET"] = "1"
    assert len(jax.devices()) == DEVICES, f"expected {DEVICES} devices, got {jax.devices()}"
    results: dict = {"cases": {}, "baselines": {}, "timings": {}}
    batch = _batch()
    baselines = {}
    for name, (adapter, data, model, mode, impl) in CASES.items():
        t0 = time.perf_counter()
        config, adapter_cfg, trainable, frozen = _model(adapter)
        loss = functools.partial(token_loss, config=config, adapter=adapter_cfg, implementation=impl)
        if adapter not in baselines:
            base = functools.partial(token_loss, config=config, adapter=adapter_cfg, implementation="xla")
            baselines[adapter] = _train(base, trainable, frozen, batch, None, "jit")[:2]
            results["baselines"][adapter] = baselines[adapter]
        mesh = parallel.make_mesh(data=data, model=model)
        losses, delta, facts, step, args = _train(loss, trainable, frozen, batch, mesh, mode)
        if impl == "pallas":
            facts["pallas_calls"] = _pallas_calls(jax.make_jaxpr(step)(*args).jaxpr)
        results["cases"][name] = dict(losses=losses, delta=delta, facts=facts)
        results["timings"][name] = time.perf_counter() - t0
        print(f"{name}: {results['timings'][name]:.1f} s", flush=True)

    # a wrong split through the same step (shard_map, 8 shards of unequal token counts)
    config, adapter_cfg, trainable, frozen = _model("mov")
    wrong = functools.partial(mean_of_shard_means, config=config, adapter=adapter_cfg, implementation="xla")
    losses, delta, _, _, _ = _train(wrong, trainable, frozen, batch, parallel.make_mesh(data=8), "shard_map")
    results["wrong_split"] = dict(losses=losses, delta=delta)

    # errors: a batch that does not split over "data"; a mesh that does not use every device
    import optax

    def message(fn) -> str:
        try:
            fn()
        except ValueError as e:
            return str(e)
        return "no ValueError raised"

    step = parallel.make_train_step(
        lambda t, f, b: (jnp.sum(b["x"] * t["w"]), 1.0), optax.sgd(0.1), parallel.make_mesh()
    )
    w = {"w": jnp.ones(())}
    errors = {
        "step_batch": message(lambda: step(w, optax.sgd(0.1).init(w), {}, {"x": np.ones((12, 3), np.float32)})),
        "shard_batch": message(lambda: parallel.shard_batch({"x": np.ones((4, 3))}, parallel.make_mesh(data=8))),
        "mesh": message(lambda: parallel.make_mesh(data=3, model=2)),
    }
    results["errors"] = errors
    with open(out, "wb") as f:
        pickle.dump(results, f)


# ---------------------------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("jax_parallel") / "results.pkl"
    env = dict(os.environ)
    # cheaper LLVM codegen (the test is compile-bound: ~27 s instead of ~38 s of CPU); the SPMD partitioning and
    # collectives under test are HLO passes, unaffected, and baseline and mesh runs share the flags
    flags = f"--xla_force_host_platform_device_count={DEVICES} {FAST_COMPILE}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PEMOE_PALLAS_INTERPRET"] = "1"
    env.setdefault("TRITON_CACHE_DIR", str(REPO / ".cache" / "triton"))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_jax_parallel", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    with open(out, "rb") as f:
        return pickle.load(f)


def _update_error(delta: dict, want: dict) -> tuple[float, float]:
    assert sorted(delta) == sorted(want)
    err = max(float(np.abs(delta[k] - want[k]).max()) for k in want)
    scale = max(float(np.abs(want[k]).max()) for k in want)
    return err, scale


@pytest.mark.parametrize("case", list(CASES))
def test_mesh_step_matches_single_device(mesh_results, case):
    adapter = CASES[case][0]
    got = mesh_results["cases"][case]
    want_losses, want_delta = mesh_results["baselines"][adapter]
    assert np.all(np.isfinite(want_losses)) and want_losses[1] < want_losses[0], "SGD did not reduce the loss"
    np.testing.assert_allclose(got["losses"], want_losses, rtol=LOSS_RTOL, atol=0)
    err, scale = _update_error(got["delta"], want_delta)
    assert scale > 1e-3, "the adapters barely moved: the update check would be too weak"
    assert err <= UPDATE_RTOL * scale, f"{case}: max|Δ_mesh − Δ_1dev| = {err:.3g} > {UPDATE_RTOL} · {scale:.3g}"
    assert got["facts"]["trainable_specs"] == [str(P())], "adapters must stay replicated"


def test_wrong_split_fails_the_tolerance(mesh_results):
    """Mean of per-shard means (unequal token counts) through the same step lands far outside the rule."""
    want_losses, want_delta = mesh_results["baselines"]["mov"]
    bad = mesh_results["wrong_split"]
    assert abs(bad["losses"][0] - want_losses[0]) > 100 * LOSS_RTOL * abs(want_losses[0])
    err, scale = _update_error(bad["delta"], want_delta)
    assert err > 100 * UPDATE_RTOL * scale


def test_backbone_sharded_over_model(mesh_results):
    facts = mesh_results["cases"]["molora-data4-model2-shard_map"]["facts"]
    specs, shapes = facts["frozen_specs"], facts["frozen_shard_shapes"]
    col = "encoder.block.0.layer.0.SelfAttention.q.weight"  # [H·D, M] = [32, 32]: output dim split
    row = "decoder.block.0.layer.2.DenseReluDense.wo.weight"  # [M, F] = [32, 40]: input dim split
    assert specs[col] == str(P("model", None)) and shapes[col] == (16, 32)
    assert specs[row] == str(P(None, "model")) and shapes[row] == (32, 20)
    assert specs["shared.weight"] == str(P("model", None)) and shapes["shared.weight"] == (32, 32)
    assert specs["encoder.final_layer_norm.weight"] == str(P())
    assert specs["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == str(P())


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][4] == "pallas"])
def test_pallas_kernels_run_per_shard(mesh_results, case):
    """Every adapter site runs its Pallas kernel(s), inside the shard_map, on the local rows only."""
    calls = mesh_results["cases"][case]["facts"]["pallas_calls"]
    assert len(calls) == PALLAS_CALLS_PER_LAYER[CASES[case][0]] * LAYERS, calls
    assert all(inside for inside, _ in calls), calls
    batch = _batch()
    local_rows = batch["input_ids"].shape[0] // CASES[case][1]
    src, tgt = batch["input_ids"].shape[1], batch["decoder_input_ids"].shape[1]
    assert {shape[0] for _, shape in calls} == {local_rows * src, local_rows * tgt}


def test_errors(mesh_results):
    errors = mesh_results["errors"]
    assert "batch['x']" in errors["step_batch"] and "divisible" in errors["step_batch"] and "8" in errors["step_batch"]
    assert "batch['x']" in errors["shard_batch"] and "[4, 3]" in errors["shard_batch"]
    assert "data * model = 3 * 2 = 6" in errors["mesh"] and "8" in errors["mesh"]


# ---------------------------------------------------------------------------------------------
# in this process (one device)


def test_make_mesh_one_device_and_errors():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": len(jax.devices()), "model": 1}
    with pytest.raises(ValueError, match=r"data \* model = 2 \* 1 = 2 must equal"):
        parallel.make_mesh(data=2)
    with pytest.raises(ValueError, match="model must be a positive int"):
        parallel.make_mesh(model=0)
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        parallel.make_train_step(token_loss, __import__("optax").sgd(0.1), mesh="data")
    with pytest.raises(ValueError, match="mode must be one of"):
        parallel.make_train_step(token_loss, __import__("optax").sgd(0.1), None, mode="pmap")


def test_partition_specs_t5_xxl(caplog):
    """Placement rules at T5 v1.1 XXL widths (shapes only): Megatron column/row split, vocab split, replicated
    small arrays, and a logged refusal for a dim that does not divide."""
    d_model, d_ff, inner, vocab = 4096, 10240, 64 * 64, 32128
    shapes = {
        "shared.weight": (vocab, d_model),
        "lm_head.weight": (vocab, d_model),
        "encoder.block.0.layer.0.SelfAttention.q.weight": (inner, d_model),
        "encoder.block.0.layer.0.SelfAttention.o.weight": (d_model, inner),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
        "encoder.block.0.layer.0.layer_norm.weight": (d_model,),
        "decoder.block.3.layer.2.DenseReluDense.wi_1.weight": (d_ff, d_model),
        "decoder.block.3.layer.2.DenseReluDense.wo.weight": (d_model, d_ff),
        "decoder.block.3.layer.1.EncDecAttention.k.experts": (64, 10, 64),
        "decoder.block.3.layer.1.EncDecAttention.q.lora_a": (10, d_model, 4),
        "mystery.weight": (d_model, d_model),
    }
    frozen = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    with caplog.at_level(logging.INFO, logger="pemoe"):
        specs = parallel.frozen_partition_specs(frozen, 8)
    col, row = P("model", None), P(None, "model")
    assert specs["shared.weight"] == col and specs["lm_head.weight"] == col
    assert specs["encoder.block.0.layer.0.SelfAttention.q.weight"] == col
    assert specs["encoder.block.0.layer.0.SelfAttention.o.weight"] == row
    assert specs["decoder.block.3.layer.2.DenseReluDense.wi_1.weight"] == col
    assert specs["decoder.block.3.layer.2.DenseReluDense.wo.weight"] == row
    for name in shapes:
        if "relative" in name or "layer_norm" in name or "experts" in name or "lora" in name or "mystery" in name:
            assert specs[name] == P(), name
    assert "mystery.weight [4096, 4096] (no split rule" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pemoe"):
        specs = parallel.frozen_partition_specs(frozen, 3)  # 32128 and 4096 do not divide by 3; 10240 neither
    assert all(spec == P() for spec in specs.values())
    assert "shared.weight [32128, 4096] (vocabulary-parallel: dim 0 does not divide by model=3)" in caplog.text

    specs = parallel.frozen_partition_specs(frozen, 8, keep_replicated=[r"\.(q|wo)\.weight$"])
    assert specs["encoder.block.0.layer.0.SelfAttention.q.weight"] == P()
    assert specs["decoder.block.3.layer.2.DenseReluDense.wo.weight"] == P()
    assert specs["encoder.block.0.layer.0.SelfAttention.o.weight"] == row
    with pytest.raises(TypeError, match="keep_replicated"):
        parallel.frozen_partition_specs(frozen, 8, keep_replicated=r"\.q\.weight$")

    small = parallel.frozen_partition_specs({"encoder.block.0.layer.0.SelfAttention.q.weight": np.empty((512, 512))}, 2)
    assert small == {"encoder.block.0.layer.0.SelfAttention.q.weight": P()}  # below DEFAULT_MIN_SIZE


def test_single_device_step_is_the_plain_mean():
    """mesh=None: one SGD step on a linear least-squares toy equals the hand-derived update."""
    import optax

    x = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    y = np.array([1.0, -1.0, 0.5, 2.0], np.float32)

    def loss(trainable, frozen, batch):
        r = batch["x"] @ trainable["w"] * frozen["s"] - batch["y"]
        return jnp.sum(r**2), batch["y"].shape[0]

    w = np.array([0.3, -0.2, 0.1], np.float32)
    step = parallel.make_train_step(loss, optax.sgd(0.5), None, donate=False)
    params = {"w": jnp.asarray(w)}
    params, _, value = step(params, optax.sgd(0.5).init(params), {"s": jnp.float32(2.0)}, {"x": x, "y": y})
    r = 2.0 * x @ w - y
    np.testing.assert_allclose(float(value), np.mean(r**2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(params["w"]), w - 0.5 * (2 * 2.0 * x.T @ r / 4), rtol=1e-6)


def test_one_process_helpers():
    """One process: the process-local batch is the whole batch, gather stacks one row, sync is a no-op;
    fingerprint tells equal trees from a one-ulp, a dtype or a key change. (Several processes:
    tests/test_jax_multiprocess.py.)"""
    mesh = parallel.make_mesh()
    assert parallel.process_batch_indices(mesh, 5).tolist() == [0, 1, 2, 3, 4]
    batch = {"x": np.arange(10, dtype=np.float32).reshape(5, 2)}
    placed = parallel.shard_batch(batch, mesh, process_local=True)
    assert placed["x"].shape == (5, 2) and np.array_equal(np.asarray(placed["x"]), batch["x"])
    assert placed["x"].sharding.spec == P("data")
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="batch_size must be a positive multiple"):
            parallel.process_batch_indices(mesh, bad)
    np.testing.assert_array_equal(parallel.gather_from_processes(np.array([3, 4])), [[3, 4]])
    parallel.sync_processes("test")

    tree = {"a": np.ones((2, 3), np.float32), "b": [np.int32(1), np.zeros(2)]}
    fp = parallel.fingerprint(tree)
    assert fp.dtype == np.uint32 and fp.shape == (8,)
    assert np.array_equal(fp, parallel.fingerprint({"a": jnp.ones((2, 3)), "b": [np.int32(1), np.zeros(2)]}))
    nudged = {**tree, "a": np.nextafter(tree["a"], np.float32(2))}
    for other in (nudged, {**tree, "a": tree["a"].astype(np.float64)}, {"c": tree["a"], "b": tree["b"]}):
        assert not np.array_equal(fp, parallel.fingerprint(other))


if __name__ == "__main__":
    worker(sys.argv[1])
