"""Shared benchmark harness for the pemoe ops.

What is measured, per case (op, provider, mode, shape, dtype, device):

* ``time_ms`` — wall-clock time of one call of the mode's closure:
  ``fwd`` is a *training* forward (x and the adapter parameters require grad, so autograd records the
  graph exactly as in a training step; the output is then dropped), ``fwd_bwd`` is that forward plus
  ``torch.autograd.backward(out, grad_out)`` with a fixed, precomputed ``grad_out`` (the grads are set to
  ``None`` before every call), ``bwd`` is the backward alone, run again and again over one recorded
  graph (``retain_graph=True``); ``step`` is ``fwd_bwd`` followed by the provider's optimizer step
  (a whole training step; providers without an optimizer do nothing more). On CPU:
  ``time.perf_counter`` around each call, gc disabled while timing, ``torch.get_num_threads()`` left as
  it is. On CUDA: ``triton.testing.do_bench`` when importable, else
  ``torch.cuda.Event`` pairs with a synchronize.
  Repetitions are interleaved across providers (round robin, the order rotated each round) so that
  machine noise hits every provider alike; p20/p50/p80 are taken over all the samples.
* ``ratio_vs_floor`` — the provider's p50 (p20, p80) divided by the floor provider's p50 (p20, p80)
  (``linear``, the frozen base layer, for the ops; the frozen model for the T5 and Llama steps) for the same op,
  shape, dtype and mode, measured in the same run. ``ratio_vs_<baseline>`` likewise against the
  provider's named baseline where it has one (e.g. pemoe's MoV-30 step against PEFT's IA3 step).
* ``saved_mb`` — bytes of the tensors the autograd graph of one training forward saves for backward
  (seen through ``torch.autograd.graph.saved_tensors_hooks``), deduplicated by storage, *excluding* the
  storages of the op's own inputs (x, frozen weights, adapter parameters): the extra activation memory
  the op keeps alive until backward. Tensors a custom ``autograd.Function`` stashes on ``ctx`` as plain
  attributes (not through ``save_for_backward``) are invisible to the hooks. ``out_mb`` is the output's
  storage. On CUDA ``peak_mb`` is added: the ``torch.cuda.max_memory_allocated`` delta of that forward.
* ``tflops`` and ``gbps`` — the op's FLOPs and its minimum HBM/DRAM bytes for the mode (the op's
  ``cost`` formula, stated in each bench file: the same numbers for every provider) divided by the
  provider's p50 time; where the device's peaks are known (:data:`DEVICE_PEAKS`), ``roofline_pct``:
  the roofline time max(FLOPs / peak FLOP/s, bytes / peak B/s) as a percentage of the measured time.

Benches that are not torch autograd set ``OpBench.run_group`` (bench/jax_ops.py: the JAX ops under
``jax.jit``, timed on the wall clock by :func:`time_interleaved`, each call blocking until its results are
ready) and write the same rows through :func:`write_mode_rows`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import math
import os
import pathlib
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

MODES = ("fwd", "bwd", "fwd_bwd", "step")
DEFAULT_MODES = ("fwd", "fwd_bwd")
FLOOR = "linear"
CSV_COLUMNS = (
    "op",
    "provider",
    "mode",
    "shape",
    "dtype",
    "device",
    "metric",
    "p50",
    "p20",
    "p80",
    "commit",
    "time",
    "clock",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Published dense peaks per CUDA device-name fragment: (bytes/s, {dtype: FLOP/s}). float32 is the
#: non-tensor-core rate (torch does not use TF32 for float32 matmuls unless asked to).
DEVICE_PEAKS: dict[str, tuple[float, dict[torch.dtype, float]]] = {
    "H100": (3.35e12, {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}),
    "H200": (4.8e12, {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}),
    "A100": (2.0e12, {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12}),
}


# --------------------------------------------------------------------------------------------------
# Case and provider descriptions
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One measurement: ``op`` run by ``provider`` in ``mode`` ("fwd" | "fwd_bwd") on ``shape``."""

    op: str
    provider: str
    mode: str
    shape: dict[str, int]
    dtype: torch.dtype
    device: torch.device

    @property
    def shape_str(self) -> str:
        return shape_str(self.shape)


@dataclass
class Provider:
    """How one provider computes an op.

    ``forward(inputs)`` returns the op's output from the dict of input tensors; ``trainable`` names the
    inputs that require grad (the floor: only ``x``); ``implementation`` is the pemoe implementation it
    asks for (``None`` for code written in the bench file), used to tell whether it runs on a device;
    ``supports(shape)`` says why the provider does not apply to a shape (None when it does), e.g. PEFT's
    IA3 and LoRA are the E = 1 cases only.
    """

    name: str
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    trainable: tuple[str, ...]
    implementation: str | None = None
    supports: Callable[[dict[str, int]], str | None] | None = None
    #: run after backward in the ``step`` mode (e.g. ``optimizer.step()``)
    optimizer_step: Callable[[], None] | None = None
    #: tensors the provider owns (model weights) that saved_mb must not count as activations
    owned: Callable[[], Iterable[torch.Tensor]] | None = None
    #: another provider of the same op to report ``ratio_vs_<baseline>`` against
    baseline: str | None = None
    #: why the provider cannot run on a device (None when it can), for providers that are not pemoe.ops
    #: implementations (e.g. the JAX ones in bench/jax_ops.py); checked before ``implementation``
    unavailable: Callable[[torch.device], str | None] | None = None


def standard_providers(
    floor: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    pemoe: Callable[[str], Callable[[dict[str, torch.Tensor]], torch.Tensor]],
    authors: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    trainable: tuple[str, ...],
) -> dict[str, Provider]:
    """Every op's provider set: the floor (only x trainable), pemoe per implementation, the authors' code."""
    return {
        "linear": Provider("linear", floor, ("x",)),
        "pemoe-torch": Provider("pemoe-torch", pemoe("torch"), trainable, "torch"),
        "pemoe-triton": Provider("pemoe-triton", pemoe("triton"), trainable, "triton"),
        "reference": Provider("reference", pemoe("reference"), trainable, "reference"),
        "authors-einsum": Provider("authors-einsum", authors, trainable),
    }


def peft_module_forward(
    build: Callable[[dict[str, torch.Tensor]], torch.nn.Module],
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """A provider forward running a PEFT-wrapped module: ``build(inputs)`` makes it once per inputs dict
    (sharing the bench's frozen weights); its adapter gradients are reset to None at each call, as the
    harness does for the inputs, so nothing accumulates across timed calls."""
    built: dict[int, torch.nn.Module] = {}

    def forward(i: dict[str, torch.Tensor]) -> torch.Tensor:
        module = built.get(id(i))
        if module is None:
            built.clear()
            module = built[id(i)] = build(i)
        for param in module.parameters():
            param.grad = None
        return module(i["x"])

    return forward


def op_main(op: str, argv: list[str] | None) -> int:
    """``python -m pemoe.bench.<op> [pemoe bench options]``: ``pemoe bench`` for this op only."""
    from pemoe.bench.runner import main

    return main(argv, ops=(op,), prog=f"pemoe.bench.{op}")


@dataclass
class OpBench:
    """An op's benchmark definition: its shapes, input factory and providers (see bench/mov_linear.py)."""

    op: str
    shapes: Callable[[bool], list[dict[str, int]]]  # full -> shapes
    make_inputs: Callable[[dict[str, int], torch.dtype, torch.device], dict[str, torch.Tensor]]
    providers: dict[str, Provider]
    tokens_key: str = "T"
    scale_keys: tuple[str, ...] = field(default_factory=tuple)  # widths shrunk by --shape-scale
    #: (shape, dtype, mode) -> (FLOPs, minimum bytes moved) of one call, for tflops / gbps / roofline_pct
    cost: Callable[[dict[str, int], torch.dtype, str], tuple[float, float]] | None = None
    floor: str = FLOOR
    default_modes: tuple[str, ...] = DEFAULT_MODES
    #: replaces :func:`run_group` for benches that are not torch autograd (bench/jax_ops.py); same signature
    run_group: Callable[..., None] | None = None
    #: (device) -> a line for the report header (e.g. the JAX version and backend)
    describe: Callable[[torch.device], str] | None = None
    #: the dtypes (names of :data:`DTYPES`) run when ``--dtypes`` is not given; None: the runner's default
    dtypes: tuple[str, ...] | None = None


def shape_str(shape: dict[str, int]) -> str:
    """Compact shape string, e.g. ``T=2048,K=1024,N=1024,G=16,E=10``."""
    return ",".join(f"{k}={v}" for k, v in shape.items())


def device_peaks(device: torch.device) -> tuple[float, dict[torch.dtype, float]] | None:
    """(peak bytes/s, {dtype: peak FLOP/s}) of a known CUDA device, else None (CPUs: unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks for key, peaks in DEVICE_PEAKS.items() if key in name), None)


def shape_skip_reason(provider: Provider, shape: dict[str, int]) -> str | None:
    """Why ``provider`` does not apply to ``shape`` (None when it does)."""
    return provider.supports(shape) if provider.supports is not None else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def unavailable_reason(op: str, provider: Provider, device: torch.device) -> str | None:
    """Why ``provider`` cannot run ``op`` on ``device`` (None when it can)."""
    if provider.unavailable is not None:
        reason = provider.unavailable(device)
        if reason is not None:
            return reason
    if provider.implementation is None:
        return None
    if provider.implementation == "triton" and device.type != "cuda":
        # Under TRITON_INTERPRET=1 the kernels run on the CPU, but the interpreter is a correctness
        # tool: its timings say nothing about the kernels.
        return "the Triton kernels are timed on CUDA devices only"
    from pemoe.ops import resolve_implementation

    try:
        resolve_implementation(op, provider.implementation, device)
    except (NotImplementedError, ValueError, RuntimeError, KeyError) as e:
        return f"{type(e).__name__}: {e}"
    return None


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def _quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) with linear interpolation; a single sample gives it three times."""
    s = sorted(samples)
    if len(s) == 1:
        return s[0], s[0], s[0]

    def q(p: float) -> float:
        pos = p * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return q(0.2), statistics.median(s), q(0.8)


#: The clocks CPU timings can read (``--clock``): ``"wall"``, the elapsed time (the default); ``"process"``,
#: the CPU time of this process (all its threads), which the runner pairs with one torch thread so that it is
#: the time of the one core the work ran on. On a host shared with other jobs the wall clock also counts the
#: time the others hold the cores; the process clock does not (it still sees their cache and memory-bandwidth
#: contention), so its medians are steadier there, but it counts no waiting and no other process's work.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}


def _sample_cpu(fn: Callable[[], object], reps: int, clock: str = "wall") -> list[float]:
    """``reps`` samples (ms) of ``fn()`` on ``clock`` (:data:`CLOCKS`), gc disabled while timing (collected
    first when it was on)."""
    now = CLOCKS[clock]
    out = []
    if gc.isenabled():
        gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            t0 = now()
            fn()
            out.append((now() - t0) * 1e3)
    finally:
        if was_enabled:
            gc.enable()
    return out


def _sample_cuda(fn: Callable[[], object], reps: int) -> list[float]:
    """Samples (ms) of ``fn()`` on CUDA: triton's do_bench (L2 flushed per call) or CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        res = do_bench(fn, warmup=0, rep=max(1, int(est_ms * reps)), return_mode="all")
        return list(res) if isinstance(res, list | tuple) else [float(res)]
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _sample(fn: Callable[[], object], reps: int, device: torch.device, clock: str = "wall") -> list[float]:
    if device.type == "cuda":
        if clock != "wall":
            raise ValueError(f"clock={clock!r} times CPU work; CUDA timings read the device's own clock ('wall')")
        return _sample_cuda(fn, reps)
    return _sample_cpu(fn, reps, clock)


def time_cpu(fn: Callable[[], object], *, warmup: int, reps: int, min_time_s: float) -> tuple[float, float, float]:
    """Time ``fn()`` on CPU: ``warmup`` untimed calls, then at least ``reps`` timed calls and at least
    ``min_time_s`` seconds of them. Returns (p20, p50, p80) in ms."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    t_end = time.perf_counter() + min_time_s
    while len(samples) < reps or time.perf_counter() < t_end:
        samples += _sample_cpu(fn, reps)
    return _quantiles(samples)


def time_cuda(fn: Callable[[], object], *, warmup: int, reps: int) -> tuple[float, float, float]:
    """Time ``fn()`` on CUDA (do_bench if triton is importable, else CUDA events). (p20, p50, p80) ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return _quantiles(_sample_cuda(fn, reps))


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int,
    reps: int,
    min_rounds: int,
    max_rounds: int,
    budget_s: float,
    clock: str = "wall",
) -> dict[str, tuple[float, float, float]]:
    """Round robin over ``fns``: each round times every fn for a batch of ``reps`` calls, the order
    rotated each round. Stops after ``max_rounds``, or after ``min_rounds`` once ``budget_s`` seconds
    (wall clock) were spent. Samples read ``clock`` (:data:`CLOCKS`; CPU only). Returns name -> (p20, p50,
    p80) in ms over all the samples."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    if device.type == "cuda":
        torch.cuda.synchronize()
    samples: dict[str, list[float]] = {n: [] for n in names}
    # One garbage collection before the rounds, none between them: a collection between batches made the
    # next JAX call on the CPU up to 1.8x slower (bf16 T5-large linear: 9.7 ms instead of 5.3 ms), an
    # artefact that hit small and large programs unequally.
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for r in range(max_rounds):
            if r >= min_rounds and time.perf_counter() - t0 > budget_s:
                break
            k = r % len(names)
            for name in names[k:] + names[:k]:
                samples[name] += _sample(fns[name], reps, device, clock)
    finally:
        if was_enabled:
            gc.enable()
    return {n: _quantiles(s) for n, s in samples.items()}


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def storage_ptrs(tensors: Iterable[torch.Tensor | None]) -> set[int]:
    """data_ptrs of the storages of ``tensors`` (to exclude from saved_mb)."""
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None}


def saved_for_backward(forward: Callable[[], torch.Tensor], exclude: set[int]) -> tuple[int, torch.Tensor]:
    """Run ``forward()`` once and return (bytes saved for backward, output).

    Counts each storage the autograd graph saves once (by ``untyped_storage().data_ptr()``), skipping
    the storages in ``exclude`` (the op's own inputs)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in exclude and ptr not in seen:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(seen.values()), out


# --------------------------------------------------------------------------------------------------
# Running cases
# --------------------------------------------------------------------------------------------------


def git_commit() -> str:
    """``git rev-parse --short HEAD`` of the checkout this file is in, or "unknown"."""
    try:
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=pathlib.Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return (r.stdout.strip() or "unknown") if r.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_description(device: torch.device) -> str:
    """The device measured: CPU model and thread count, or the CUDA device name."""
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    model = "unknown CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, torch.get_num_threads()={torch.get_num_threads()} (torch {torch.__version__})"


def auto_choices(ops: Iterable[str], device: torch.device) -> dict[str, str]:
    """What implementation="auto" resolves to for each op on ``device``."""
    from pemoe.ops import resolve_implementation
    from pemoe.ops._dispatch import AVAILABLE

    kernel_ops = [op for op in ops if op in AVAILABLE]
    if any(op.endswith("_step") for op in ops):  # the training steps (t5_step, llama_step) run them in a model
        kernel_ops += [op for op in ("mov_linear", "mov_ffn", "molora_linear") if op not in kernel_ops]
    return {op: resolve_implementation(op, "auto", device) for op in kernel_ops}


class CsvSink:
    """Long-format CSV writer; every row is flushed at once so an interrupted run keeps its rows. Each row
    names the ``clock`` its times were read on (:data:`CLOCKS`)."""

    def __init__(self, path: pathlib.Path, clock: str = "wall") -> None:
        self.path, self.clock = path, clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "w", newline="")  # noqa: SIM115
        self._w = csv.DictWriter(self._f, fieldnames=CSV_COLUMNS)
        self._w.writeheader()
        self._f.flush()
        self.commit = git_commit()
        self.rows: list[dict[str, str]] = []

    def write(self, case: Case, metric: str, p50: float, p20: float, p80: float) -> None:
        row = {
            "op": case.op,
            "provider": case.provider,
            "mode": case.mode,
            "shape": case.shape_str,
            "dtype": dtype_name(case.dtype),
            "device": case.device.type,
            "metric": metric,
            "p50": f"{p50:.6g}",
            "p20": f"{p20:.6g}",
            "p80": f"{p80:.6g}",
            "commit": self.commit,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "clock": self.clock,
        }
        self._w.writerow(row)
        self._f.flush()
        os.fsync(self._f.fileno())
        self.rows.append(row)

    def close(self) -> None:
        self._f.close()


@dataclass
class Settings:
    """Repetition settings: see :func:`time_interleaved`."""

    warmup: int = 1
    reps: int = 1
    min_rounds: int = 3
    max_rounds: int = 7
    budget_s: float = 1.5
    clock: str = "wall"


def _prepare(bench: OpBench, provider: Provider, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The provider's own leaf views of the shared inputs (same storages), grads where it trains."""
    return {k: v.detach().requires_grad_(k in provider.trainable) for k, v in base.items()}


def _closure(
    provider: Provider, inputs: dict[str, torch.Tensor], mode: str, grad_out: torch.Tensor
) -> Callable[[], object]:
    trainable = [inputs[k] for k in provider.trainable]
    if mode == "fwd":

        def fwd() -> None:
            provider.forward(inputs)

        return fwd
    if mode == "bwd":
        graph_out = provider.forward(inputs)  # recorded once; each call replays the backward alone

        def bwd() -> None:
            for t in trainable:
                t.grad = None
            torch.autograd.backward(graph_out, grad_out, retain_graph=True)

        return bwd

    step = provider.optimizer_step if mode == "step" else None

    def fwd_bwd() -> None:
        for t in trainable:
            t.grad = None
        out = provider.forward(inputs)
        torch.autograd.backward(out, grad_out)
        if step is not None:
            step()

    return fwd_bwd


def run_group(
    bench: OpBench,
    providers: Sequence[str],
    shape: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
    modes: Sequence[str],
    settings: Settings,
    sink: CsvSink,
    log: Callable[[str], None] = print,
) -> None:
    """Measure every provider on one (op, shape, dtype): saved_mb/out_mb, then each mode's times and
    ratios. Rows are written to ``sink`` as each case finishes."""
    base = bench.make_inputs(shape, dtype, device)
    exclude = storage_ptrs(base.values())
    prepared = {p: _prepare(bench, bench.providers[p], base) for p in providers}
    grad_out = None
    for p in providers:
        prov = bench.providers[p]
        case = Case(bench.op, p, "fwd", shape, dtype, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        owned = storage_ptrs(prov.owned()) if prov.owned is not None else set()
        saved, out = saved_for_backward(lambda prov=prov, p=p: prov.forward(prepared[p]), exclude | owned)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - before
            sink.write(case, "peak_mb", peak / 2**20, peak / 2**20, peak / 2**20)
        out_mb = out.untyped_storage().nbytes() / 2**20
        sink.write(case, "saved_mb", saved / 2**20, saved / 2**20, saved / 2**20)
        sink.write(case, "out_mb", out_mb, out_mb, out_mb)
        if grad_out is None:
            g = torch.Generator(device=device).manual_seed(1)
            grad_out = torch.randn(out.shape, generator=g, device=device, dtype=torch.float32).to(out.dtype)
        del out
    for mode in modes:
        fns = {p: _closure(bench.providers[p], prepared[p], mode, grad_out) for p in providers}
        stats = time_interleaved(
            fns,
            device,
            warmup=settings.warmup,
            reps=settings.reps,
            min_rounds=settings.min_rounds,
            max_rounds=settings.max_rounds,
            budget_s=settings.budget_s,
            clock=settings.clock,
        )
        del fns  # drops the graphs the bwd closures hold
        write_mode_rows(bench, shape, dtype, device, mode, stats, sink, log)


def write_mode_rows(
    bench: OpBench,
    shape: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
    mode: str,
    stats: dict[str, tuple[float, float, float]],
    sink: CsvSink,
    log: Callable[[str], None] = print,
) -> None:
    """Write one mode's rows for every provider in ``stats`` (name -> (p20, p50, p80) ms): time_ms,
    ratio_vs_floor, ratio_vs_<baseline>, and tflops / gbps / roofline_pct from the op's cost formula."""
    providers = list(stats)
    floor = stats.get(bench.floor)
    cost = bench.cost(shape, dtype, mode) if bench.cost is not None else None
    peaks = device_peaks(device)
    for p in providers:
        case = Case(bench.op, p, mode, shape, dtype, device)
        p20, p50, p80 = stats[p]
        sink.write(case, "time_ms", p50, p20, p80)
        if floor is not None:
            sink.write(case, "ratio_vs_floor", p50 / floor[1], p20 / floor[0], p80 / floor[2])
        base_stats = stats.get(bench.providers[p].baseline or "")
        if base_stats is not None:
            metric = f"ratio_vs_{bench.providers[p].baseline}"
            sink.write(case, metric, p50 / base_stats[1], p20 / base_stats[0], p80 / base_stats[2])
        if cost is not None and p != bench.floor:
            flops, nbytes = cost
            # rates from the p50 time; p20/p80 columns follow the p80/p20 times (faster = higher)
            sink.write(case, "tflops", flops / p50 / 1e9, flops / p80 / 1e9, flops / p20 / 1e9)
            sink.write(case, "gbps", nbytes / p50 / 1e6, nbytes / p80 / 1e6, nbytes / p20 / 1e6)
            if peaks is not None and dtype in peaks[1]:
                roof_ms = max(flops / peaks[1][dtype], nbytes / peaks[0]) * 1e3
                sink.write(case, "roofline_pct", 100 * roof_ms / p50, 100 * roof_ms / p80, 100 * roof_ms / p20)
    log(
        f"  {bench.op} {shape_str(shape)} {dtype_name(dtype)} {mode}: "
        + ", ".join(f"{p} {stats[p][1]:.2f} ms" for p in providers)
    )


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


TABLE_COLUMNS = {
    ("fwd", "time_ms"): "fwd ms",
    ("fwd", "ratio_vs_floor"): "fwd ratio",
    ("bwd", "time_ms"): "bwd ms",
    ("bwd", "ratio_vs_floor"): "bwd ratio",
    ("fwd_bwd", "time_ms"): "fwd+bwd ms",
    ("fwd_bwd", "ratio_vs_floor"): "fwd+bwd ratio",
    ("step", "time_ms"): "step ms",
    ("step", "ratio_vs_floor"): "step ratio",
    ("step", "ratio_vs_baseline"): "step vs baseline",
    ("fwd", "saved_mb"): "saved MB",
    ("fwd", "tflops"): "fwd TFLOP/s",
    ("fwd", "gbps"): "fwd GB/s",
    ("fwd", "roofline_pct"): "fwd % roofline",
    # serving (bench/mixed_batch.py): throughput, and throughput ratios (higher is better)
    ("prefill", "tokens_per_s"): "prefill tok/s",
    ("prefill", "throughput_vs_one"): "prefill vs one",
    ("prefill", "throughput_vs_loop"): "prefill vs loop",
    ("prefill", "throughput_vs_peft"): "prefill vs PEFT",
    ("decode", "tokens_per_s"): "decode tok/s",
    ("decode", "throughput_vs_one"): "decode vs one",
    ("decode", "throughput_vs_loop"): "decode vs loop",
    ("decode", "throughput_vs_peft"): "decode vs PEFT",
}


def markdown_table(rows: list[dict[str, str]]) -> str:
    """One row per op/shape/dtype/provider; the columns of :data:`TABLE_COLUMNS` that were measured."""
    vals: dict[tuple[str, str, str, str], dict[str, str]] = {}
    for r in rows:
        key = (r["op"], r["shape"], r["dtype"], r["provider"])
        metric = (
            "ratio_vs_baseline"
            if r["metric"].startswith("ratio_vs_") and r["metric"] != "ratio_vs_floor"
            else r["metric"]
        )
        col = TABLE_COLUMNS.get((r["mode"], metric))
        if col is not None:
            v = float(r["p50"])
            ratio = "ratio" in col or metric.startswith("throughput_vs_")
            vals.setdefault(key, {})[col] = f"{v:.2f}x" if ratio else (f"{v:.0f}" if "tok/s" in col else f"{v:.2f}")
    measured = {c for v in vals.values() for c in v}
    cols = [c for c in TABLE_COLUMNS.values() if c in measured]
    lines = [
        "| op | shape | dtype | provider | " + " | ".join(cols) + " |",
        "|" + "---|" * (4 + len(cols)),
    ]
    for (op, shp, dt, prov), v in vals.items():
        lines.append(f"| {op} | {shp} | {dt} | {prov} | " + " | ".join(v.get(c, "–") for c in cols) + " |")
    return "\n".join(lines)


def plot_ratios(csv_path: pathlib.Path, png_path: pathlib.Path) -> pathlib.Path:
    """Bar plot of ratio_vs_floor (p50, p20–p80 as error bars) from the CSV, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_csv(csv_path) if r["metric"] == "ratio_vs_floor"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)] or ["fwd"]
    groups = list(dict.fromkeys(f"{r['op']}\n{r['shape']}\n{r['dtype']}" for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(
        len(modes), 1, figsize=(max(6, 1.6 * len(groups) * max(1, len(providers)) / 3), 4 * len(modes)), squeeze=False
    )
    width = 0.8 / max(1, len(providers))
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        for i, prov in enumerate(providers):
            xs, ys, lo, hi = [], [], [], []
            for j, g in enumerate(groups):
                for r in rows:
                    if r["mode"] == mode and r["provider"] == prov and f"{r['op']}\n{r['shape']}\n{r['dtype']}" == g:
                        p50, p20, p80 = float(r["p50"]), float(r["p20"]), float(r["p80"])
                        xs.append(j + (i - (len(providers) - 1) / 2) * width)
                        ys.append(p50)
                        lo.append(max(0.0, p50 - min(p20, p50)))
                        hi.append(max(0.0, max(p80, p50) - p50))
            ax.bar(xs, ys, width, yerr=[lo, hi], label=prov, capsize=2)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=7)
        ax.set_ylabel("time / floor (p50)")
        ax.set_title(f"{mode}: time relative to the frozen floor (linear layer, or frozen model)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
