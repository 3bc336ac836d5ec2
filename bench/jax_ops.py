"""Benchmark of the JAX ops (``pemoe.jax``) under ``jax.jit``, beside a plain jitted matmul.

Ops ``jax_mov_linear``, ``jax_molora_linear`` and ``jax_mov_ffn`` use the PyTorch benches' shapes, input
values (their ``make_inputs``, converted to JAX arrays: activations and frozen weights in the benchmarked
dtype, adapters float32) and cost formulas (bench/mov_linear.py, bench/molora_linear.py, bench/mov_ffn.py),
so the two frameworks are timed on the same problem. The frozen weights (:data:`FROZEN_WEIGHTS`) are held in
Flax's [in, out] layout, as pemoe's Flax layers hold their base kernels; the pemoe.jax providers get their
transpose (SPEC §1's torch layout) inside the jitted function, exactly as those layers pass it. Run them with
``pemoe bench --ops jax_mov_linear,jax_molora_linear,jax_mov_ffn`` or ``python -m pemoe.bench.jax_ops``; they are
not in the default ``pemoe bench`` run (about 40 XLA compiles would double its duration).

Providers (each a pure function of the inputs dict, compiled with ``jax.jit``):
  ``linear``        the floor: the plain frozen op ``x @ W + b`` in its fastest form (:func:`dense`; mov_ffn:
                    the plain T5 v1.1 gated-GELU FFN ``(gelu_new(x wi_0) * (x wi_1)) wo``); only x is
                    differentiated
  ``pemoe-xla``     ``pemoe.jax.<op>(..., implementation="xla")`` (the CPU default)
  ``reference``     ``implementation="reference"`` (the jnp transcription of SPEC §1, plain autodiff)
  ``pemoe-pallas``, ``pemoe-triton``  where pemoe.jax has them, on the backend they compile for (TPU;
                    GPU): skipped on the CPU, where they would run in an interpreter (a correctness tool)
Routers are None at E = 1 ((IA)3 and LoRA), as in the PyTorch benches.

Modes (one jitted function per provider and mode, compiled and run once before timing; each timed call
ends with ``jax.block_until_ready`` on everything it returns, so wall-clock time covers the whole
computation on any backend):
  ``fwd``      y = f(inputs): an inference forward under jit (no residuals kept)
  ``fwd_bwd``  ``jax.vjp`` w.r.t. the trainable inputs (x and the adapter parameters; the floor: x) with a
               fixed cotangent; returns y and the gradients (y too, so XLA cannot drop the forward)
  ``bwd``      the vjp function of one recorded forward applied to the cotangent (its residuals are inputs
               of the jitted backward)
  ``step`` is not measured here (no optimizer): skipped with a message.
``saved_mb`` is the JAX analogue of the PyTorch benches' column: the bytes of the residuals ``jax.vjp``
keeps for the backward (``jax.ad_checkpoint.print_saved_residuals``, traced, not compiled) that grow with
the token count — the op's inputs and values computed from weights alone (e.g. a transposed frozen weight)
are excluded, told apart by tracing at T and T + 1 tokens. Under ``jax.jit`` with the backward in the same
program XLA may keep less. ``out_mb`` is the output's size.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pemoe.bench import harness, molora_linear, mov_ffn, mov_linear
from pemoe.bench.harness import OpBench, Provider

OPS = ("jax_mov_linear", "jax_molora_linear", "jax_mov_ffn")
MODES = ("fwd", "bwd", "fwd_bwd")
#: torch device type -> JAX platform
PLATFORMS = {"cpu": "cpu", "cuda": "gpu"}
_JNP_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SHORT_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "u32": 4, "i8": 1, "u8": 1, "bool": 1}


# --------------------------------------------------------------------------------------------------
# Devices and inputs
# --------------------------------------------------------------------------------------------------


def jax_device(device: torch.device):
    """The JAX device that stands for the torch ``device`` ("cpu" -> JAX cpu, "cuda" -> JAX gpu).

    Raises ``ValueError`` for other device types, ``RuntimeError`` when JAX has no such backend."""
    import jax

    platform = PLATFORMS.get(device.type)
    if platform is None:
        raise ValueError(f"device must be one of {sorted(PLATFORMS)} for the JAX benches, got {device.type!r}")
    devices = jax.devices(platform)  # RuntimeError: "Unknown backend" when this jaxlib has none
    return devices[device.index or 0]


def _jax_unavailable(device: torch.device) -> str | None:
    try:
        import jax  # noqa: F401
    except ImportError:
        return "jax is not installed (pip install pemoe[jax])"
    try:
        jax_device(device)
    except (ValueError, RuntimeError) as e:
        return f"JAX cannot run on {device.type}: {e}"
    return None


#: Inputs that are frozen weights, [out, in] in the torch benches; here held transposed, [in, out].
FROZEN_WEIGHTS = ("weight", "wi_0", "wi_1", "wo")


def to_jax(inputs: dict[str, torch.Tensor], device: torch.device) -> dict:
    """The torch inputs as JAX arrays on ``device``'s JAX device, same values and dtypes; the
    :data:`FROZEN_WEIGHTS` transposed to Flax's [in, out] layout (stored so, not a view)."""
    import jax
    import jax.numpy as jnp

    dev = jax_device(device)
    out = {}
    for k, v in inputs.items():
        if v.dtype not in _JNP_DTYPES:
            raise TypeError(f"input {k!r}: dtype {v.dtype} has no JAX twin here; expected one of {list(_JNP_DTYPES)}")
        values = v.detach().float().cpu().numpy()
        if k in FROZEN_WEIGHTS:
            values = np.ascontiguousarray(values.T)
        arr = jnp.asarray(values, dtype=_JNP_DTYPES[v.dtype])  # exact: upcast, back
        out[k] = jax.device_put(arr, dev)
    return out


# --------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------


def _gelu_new(t):
    import jax

    return jax.nn.gelu(t, approximate=True)


def dense(x, kernel):
    """The plain frozen matmul x @ kernel (kernel [in, out]) in x's dtype, in its fastest form on XLA CPU.

    Float32 accumulation is requested (``preferred_element_type``) and the product rounded once: for 16-bit x
    this is what makes XLA CPU run its native bf16 GEMM (T5-large, T = 2048, bfloat16, 2 cores: 5.3 ms, against
    10.4 ms for a bare ``x @ kernel``, which XLA runs as a float32 GEMM on upcast copies). pemoe.jax's frozen
    GEMMs are written the same way (pemoe.jax.xla.linear), so the floor is the best plain op, not a slow one.
    """
    import jax.numpy as jnp

    from pemoe.jax.reference import compute_dtype

    return jnp.matmul(x, kernel, preferred_element_type=compute_dtype(x.dtype)).astype(x.dtype)


def _mov_linear_floor(i: dict):
    return dense(i["x"], i["weight"]) + i["bias"]


def _mov_linear_op(impl: str) -> Callable[[dict], object]:
    def forward(i: dict):
        from pemoe import jax as pj

        router = None if i["experts"].shape[1] == 1 else i["router"]
        return pj.mov_linear(i["x"], i["weight"].T, router, i["experts"], bias=i["bias"], implementation=impl)

    return forward


def _molora_floor(i: dict):
    return dense(i["x"], i["weight"]) + i["bias"]


def _molora_op(impl: str) -> Callable[[dict], object]:
    def forward(i: dict):
        from pemoe import jax as pj

        num_experts, _, rank = i["lora_a"].shape
        router = None if num_experts == 1 else i["router"]
        return pj.molora_linear(
            i["x"],
            i["weight"].T,
            i["lora_a"],
            i["lora_b"],
            router,
            scale=16 / rank,
            bias=i["bias"],
            implementation=impl,
        )

    return forward


def _mov_ffn_floor(i: dict):
    x = i["x"]
    return dense(_gelu_new(dense(x, i["wi_0"])) * dense(x, i["wi_1"]), i["wo"])


def _mov_ffn_op(impl: str) -> Callable[[dict], object]:
    def forward(i: dict):
        from pemoe import jax as pj

        router = None if i["experts"].shape[1] == 1 else i["router"]
        return pj.mov_ffn(
            i["x"],
            i["wi_0"].T,
            i["wo"].T,
            router,
            i["experts"],
            wi_1=i["wi_1"].T,
            activation="gelu_new",
            implementation=impl,
        )

    return forward


def _implementation_unavailable(op: str, implementation: str) -> Callable[[torch.device], str | None]:
    """Why pemoe.jax's ``implementation`` of ``op`` is not timed on a device (None when it is)."""

    def reason(device: torch.device) -> str | None:
        why = _jax_unavailable(device)
        if why is not None:
            return why
        from pemoe.jax import ops as jax_ops

        if implementation in ("pallas", "triton") and device.type == "cpu":
            # the Pallas / Triton interpreters run on the CPU, but their timings say nothing about the kernels
            return f"the {implementation} kernels are timed compiled only (TPU / GPU), not in an interpreter"
        try:
            jax_ops.resolve_implementation(op, implementation, PLATFORMS[device.type])
        except (NotImplementedError, ValueError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    return reason


def _providers(
    op: str, floor: Callable[[dict], object], pemoe: Callable[[str], Callable[[dict], object]], trainable: tuple
) -> dict[str, Provider]:
    out = {"linear": Provider("linear", floor, ("x",), unavailable=_jax_unavailable)}
    for name, impl in (("pemoe-xla", "xla"), ("reference", "reference"), ("pemoe-pallas", "pallas")):
        out[name] = Provider(name, pemoe(impl), trainable, unavailable=_implementation_unavailable(op, impl))
    out["pemoe-triton"] = Provider(
        "pemoe-triton", pemoe("triton"), trainable, unavailable=_implementation_unavailable(op, "triton")
    )
    return out


# --------------------------------------------------------------------------------------------------
# Jitted closures, residuals
# --------------------------------------------------------------------------------------------------


def _split(provider: Provider, inputs: dict) -> tuple[dict, dict]:
    train = {k: v for k, v in inputs.items() if k in provider.trainable}
    frozen = {k: v for k, v in inputs.items() if k not in provider.trainable}
    return train, frozen


def jitted(provider: Provider, mode: str) -> Callable:
    """The provider's jitted function for ``mode``: ``fwd(inputs)``; ``fwd_bwd(inputs, g)`` -> (y, grads of
    the trainable inputs); ``bwd`` is :func:`recorded_backward`'s."""
    import jax

    if mode == "fwd":
        return jax.jit(provider.forward)
    if mode != "fwd_bwd":
        raise ValueError(f"mode must be 'fwd' or 'fwd_bwd' here, got {mode!r}")

    def fwd_bwd(inputs: dict, g):
        train, frozen = _split(provider, inputs)
        out, vjp = jax.vjp(lambda t: provider.forward({**frozen, **t}), train)
        return out, vjp(g)[0]

    return jax.jit(fwd_bwd)


def recorded_backward(provider: Provider, inputs: dict) -> tuple[Callable, object]:
    """(jitted ``bwd(vjp_fn, g)`` -> grads, the vjp function of one jitted forward on ``inputs``)."""
    import jax

    train, frozen = _split(provider, inputs)
    record = jax.jit(lambda t, f: jax.vjp(lambda tt: provider.forward({**f, **tt}), t)[1])
    return jax.jit(lambda vjp_fn, g: vjp_fn(g)[0]), record(train, frozen)


def _closure(provider: Provider, inputs: dict, mode: str, grad_out) -> Callable[[], object]:
    """A no-argument timed call for ``mode``, compiled and run once here (compile time is never timed)."""
    import jax

    if mode == "fwd":
        fn = jitted(provider, "fwd")

        def call() -> object:
            return jax.block_until_ready(fn(inputs))

    elif mode == "fwd_bwd":
        fn = jitted(provider, "fwd_bwd")

        def call() -> object:
            return jax.block_until_ready(fn(inputs, grad_out))

    elif mode == "bwd":
        bwd, vjp_fn = recorded_backward(provider, inputs)

        def call() -> object:
            return jax.block_until_ready(bwd(vjp_fn, grad_out))

    else:
        raise ValueError(f"mode must be one of {MODES} for the JAX benches, got {mode!r}")
    call()
    return call


def _residuals(f: Callable, *args) -> list[tuple[str, tuple[int, ...], str]]:
    """[(short dtype, shape, description)] of ``jax.ad_checkpoint.print_saved_residuals(f, *args)``."""
    from jax.ad_checkpoint import print_saved_residuals

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(f, *args)
    out = []
    for line in buf.getvalue().splitlines():
        m = re.match(r"^(\w+)\[([\d,]*)\]\s*(.*)$", line.strip())
        if m is None:
            continue
        shape = tuple(int(s) for s in m.group(2).split(",") if s)
        out.append((m.group(1), shape, m.group(3)))
    return out


def saved_bytes(provider: Provider, inputs: dict, tokens_input: str = "x") -> int:
    """Bytes of the token-dependent residuals ``jax.vjp`` of the provider keeps (see the module docstring)."""
    import jax

    train, frozen = _split(provider, inputs)

    def f(t: dict):
        return provider.forward({**frozen, **t})

    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in train.items()}
    x = spec[tokens_input]
    grown = dict(spec, **{tokens_input: jax.ShapeDtypeStruct((x.shape[0] + 1, *x.shape[1:]), x.dtype)})
    at_t, at_t1 = _residuals(f, spec), _residuals(f, grown)
    if len(at_t) != len(at_t1):  # a different program at T + 1: count every non-argument residual
        at_t1 = [(d, (), s) for d, _, s in at_t]
    total = 0
    for (dt, shape, desc), (_, shape1, _) in zip(at_t, at_t1, strict=True):
        if desc.startswith("from the argument") or shape == shape1:
            continue
        if dt not in _SHORT_BYTES:
            raise ValueError(f"residual dtype {dt!r} ({desc}) is not in the size table {sorted(_SHORT_BYTES)}")
        total += math.prod(shape) * _SHORT_BYTES[dt]
    return total


# --------------------------------------------------------------------------------------------------
# One (op, shape, dtype) group through the shared harness
# --------------------------------------------------------------------------------------------------


def run_group(
    bench: OpBench,
    providers: Sequence[str],
    shape: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
    modes: Sequence[str],
    settings: harness.Settings,
    sink: harness.CsvSink,
    log: Callable[[str], None] = print,
) -> None:
    """:func:`.harness.run_group` for the JAX ops: saved_mb / out_mb, then each mode's times, ratios and rates
    (:func:`.harness.write_mode_rows`), timed round robin by :func:`.harness.time_interleaved` on wall-clock
    time (every call blocks until its results are ready)."""
    import jax
    import jax.numpy as jnp

    inputs = to_jax(bench.make_inputs(shape, dtype, torch.device("cpu")), device)
    grad_out = None
    for p in providers:
        prov = bench.providers[p]
        case = harness.Case(bench.op, p, "fwd", shape, dtype, device)
        saved = saved_bytes(prov, inputs) / 2**20
        out = jax.eval_shape(prov.forward, inputs)
        out_mb = math.prod(out.shape) * out.dtype.itemsize / 2**20
        sink.write(case, "saved_mb", saved, saved, saved)
        sink.write(case, "out_mb", out_mb, out_mb, out_mb)
        if grad_out is None:
            g = np.random.default_rng(1).standard_normal(out.shape, dtype=np.float32)
            grad_out = jax.device_put(jnp.asarray(g, dtype=out.dtype), jax_device(device))
    for mode in modes:
        if mode not in MODES:
            log(f"  {bench.op}: mode {mode!r} is not measured for the JAX ops (they have no optimizer step)")
            continue
        fns = {p: _closure(bench.providers[p], inputs, mode, grad_out) for p in providers}
        stats = harness.time_interleaved(
            fns,
            torch.device("cpu"),  # wall clock: each call blocks on its JAX results, whatever the backend
            warmup=settings.warmup,
            reps=settings.reps,
            min_rounds=settings.min_rounds,
            max_rounds=settings.max_rounds,
            budget_s=settings.budget_s,
        )
        del fns
        harness.write_mode_rows(bench, shape, dtype, device, mode, stats, sink, log)


def describe(device: torch.device) -> str:
    """One header line: the JAX version, backend and devices, and what implementation='auto' picks."""
    why = _jax_unavailable(device)
    if why is not None:
        return f"JAX ops: {why}"
    import jax

    from pemoe.jax import ops as jax_ops

    dev = jax_device(device)
    auto = jax_ops.resolve_implementation("mov_linear", "auto", dev.platform)
    flags = os.environ.get("XLA_FLAGS", "")
    return (
        f"JAX {jax.__version__}, backend {dev.platform} ({dev.device_kind}, {len(jax.devices(dev.platform))} "
        f"device(s)), XLA_FLAGS={flags!r}; pemoe.jax implementation='auto' -> {auto}"
    )


def _bench(op: str, module, floor, pemoe, trainable: tuple[str, ...]) -> OpBench:
    return OpBench(
        op,
        module.shapes,
        module.make_inputs,
        _providers(op.removeprefix("jax_"), floor, pemoe, trainable),
        scale_keys=module.BENCH.scale_keys,
        cost=module.cost,
        run_group=run_group,
        describe=describe,
    )


BENCHES: dict[str, OpBench] = {
    "jax_mov_linear": _bench("jax_mov_linear", mov_linear, _mov_linear_floor, _mov_linear_op, mov_linear.TRAINABLE),
    "jax_molora_linear": _bench("jax_molora_linear", molora_linear, _molora_floor, _molora_op, molora_linear.TRAINABLE),
    "jax_mov_ffn": _bench("jax_mov_ffn", mov_ffn, _mov_ffn_floor, _mov_ffn_op, mov_ffn.TRAINABLE),
}


def main(argv: list[str] | None = None) -> int:
    """``python -m pemoe.bench.jax_ops [pemoe bench options]``: the three JAX ops (``--ops`` narrows them)."""
    from pemoe.bench.runner import main as run_main

    return run_main(argv, ops=OPS, prog="pemoe.bench.jax_ops")


if __name__ == "__main__":
    raise SystemExit(main())
