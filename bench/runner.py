"""``pemoe bench``: the options, the run and its output files (CSV, markdown table, PNG plot).

For each op (mov_linear, molora_linear, mov_ffn), shape, dtype and mode (``fwd``: a training forward;
``fwd_bwd``: forward + backward), every provider (``linear`` floor, ``pemoe-torch``, ``pemoe-triton``,
``reference``, ``authors-einsum``) is timed and its time relative to the floor and the activation memory it
saves for backward are recorded (:mod:`pemoe.bench.harness` says exactly what is measured). The CSV is
long-format, rows appended as each case finishes. ``--ops jax_mov_linear,jax_molora_linear,jax_mov_ffn``
times the JAX ops under ``jax.jit`` the same way (:mod:`pemoe.bench.jax_ops`). ``--ops t5_step,llama_step``
times a whole training step of a T5 and of a Llama per adapter method against PEFT's
(:mod:`pemoe.bench.t5_step`, :mod:`pemoe.bench.llama_step`). ``--ops mixed_batch`` times serving one batch
over a bank of 8 and 32 adapters (prefill and greedy decode, modes ``prefill`` and ``decode``) against one
adapter for all, a loop over the adapters and PEFT's mixed-batch LoRA (:mod:`pemoe.bench.mixed_batch`).

The command line (:mod:`pemoe.cli`) adds these options to its ``bench`` subcommand and calls :func:`run`;
``python -m pemoe.bench`` and ``python -m pemoe.bench.<op>`` call :func:`main`. The benchmarks never import
the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pathlib
import sys
from collections.abc import Sequence

import torch

from pemoe._argtypes import csv_list, positive_int

DEFAULT_OPS = ("mov_linear", "molora_linear", "mov_ffn")
#: the JAX ops under jax.jit (jax_ops.py), on request: their compiles would double the default run
JAX_OPS = ("jax_mov_linear", "jax_molora_linear", "jax_mov_ffn")
#: whole training steps per adapter method (T5, Llama), on request: a step takes about a second
STEP_OPS = ("t5_step", "llama_step")
#: serving a batch over an adapter bank (prefill and greedy decode), on request: it takes minutes
SERVING_OPS = ("mixed_batch",)
ALL_OPS = (*DEFAULT_OPS, *STEP_OPS, *SERVING_OPS, *JAX_OPS)
DEFAULT_DTYPES = ("float32", "bfloat16")
#: harness.py's ("bwd", the backward alone, on request), then mixed_batch's serving modes
MODES = ("fwd", "bwd", "fwd_bwd", "step", "prefill", "decode")
DESCRIPTION = (
    "Time each op / provider / shape / dtype / mode, relative to the frozen linear floor, and measure the "
    "activation memory saved for backward. Writes results.csv, results.md and ratios.png."
)


def load_benches() -> dict:
    """Every op's :class:`~pemoe.bench.harness.OpBench` by name (the JAX ones import jax only when run)."""
    benches = {op: importlib.import_module(f"pemoe.bench.{op}").BENCH for op in ALL_OPS if op not in JAX_OPS}
    return benches | importlib.import_module("pemoe.bench.jax_ops").BENCHES


def add_arguments(parser: argparse.ArgumentParser, benches: dict, default_ops: Sequence[str] = DEFAULT_OPS) -> None:
    """Add the ``pemoe bench`` options to ``parser``."""
    from pemoe.bench.harness import DTYPES

    providers = list(dict.fromkeys(p for b in benches.values() for p in b.providers))
    parser.add_argument("--ops", type=csv_list(list(benches), "op"), default=list(default_ops), help="comma list")
    parser.add_argument(
        "--providers",
        type=csv_list(providers, "provider"),
        default=None,
        help=f"comma list of {', '.join(providers)} (default: each op's own; the 'linear' floor is always measured)",
    )
    parser.add_argument(
        "--dtypes",
        type=csv_list(list(DTYPES), "dtype"),
        default=None,
        help=f"comma list (default: each op's own; {','.join(DEFAULT_DTYPES)}, mixed_batch: float32)",
    )
    parser.add_argument(
        "--modes",
        type=csv_list(list(MODES), "mode"),
        default=None,
        help="comma list (default: each op's own: fwd,fwd_bwd; t5_step, llama_step: fwd_bwd,step; "
        "mixed_batch: prefill,decode)",
    )
    parser.add_argument(
        "--tokens",
        type=csv_list([], "token count", positive_int),
        default=None,
        help="comma list of token counts T replacing the default ones",
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results"), help="output folder")
    parser.add_argument("--device", default=None, help="device to measure (default: cuda if available, else cpu)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="full", action="store_false", help="issue's shapes, few reps (default)")
    g.add_argument(
        "--full",
        dest="full",
        action="store_true",
        help="more reps; adds T5 base and XL widths and tokens 16 and 512",
    )
    parser.set_defaults(full=False)
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=None,
        help="time every case over exactly this many interleaved rounds (default: the --quick / --full time "
        "budget); more rounds give steadier medians on a noisy machine",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="what CPU timings read: wall (elapsed time, default) or process (this process's CPU time, "
        "time.process_time, with one torch thread: steadier on a host shared with other jobs)",
    )
    # Testing aid: divide the model widths by this factor (tiny shapes for fast tests).
    parser.add_argument("--shape-scale", type=positive_int, default=1, help=argparse.SUPPRESS)


def _shapes(bench, full: bool, tokens: list[int] | None, scale: int) -> list[dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in bench.shapes(full):
        s = dict(s)
        for k in bench.scale_keys:
            s[k] = max(1, s[k] // scale)
        for t in tokens or [s[bench.tokens_key]]:
            shape = dict(s, **{bench.tokens_key: t})
            out[",".join(f"{k}={v}" for k, v in shape.items())] = shape
    return list(out.values())


def _clock_line(clock: str) -> str:
    if clock == "process":
        return "Clock: process CPU time (time.process_time) per call, torch.get_num_threads()=1"
    return "Clock: wall (time.perf_counter; CUDA: do_bench or CUDA events)"


def run(args: argparse.Namespace, benches: dict) -> int:
    """Run the benchmark the parsed options ask for; returns the exit status (130 when interrupted, rows kept)."""
    from pemoe.bench import harness

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    clock = getattr(args, "clock", "wall")
    if clock != "wall":
        if device.type != "cpu":
            raise SystemExit(f"--clock {clock} times CPU work; on {device.type} use --clock wall")
        torch.set_num_threads(1)  # one thread: the process's CPU time is that of the one core the work ran on
    settings = (
        harness.Settings(warmup=3, reps=5, min_rounds=5, max_rounds=20, budget_s=10.0)
        if args.full
        else harness.Settings(warmup=2, reps=2, min_rounds=4, max_rounds=10, budget_s=2.5)
    )
    if args.rounds is not None:
        settings = dataclasses.replace(settings, min_rounds=args.rounds, max_rounds=args.rounds)
    settings = dataclasses.replace(settings, clock=clock)
    out_dir: pathlib.Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out_dir / "results.csv", out_dir / "results.md", out_dir / "ratios.png"

    def dtypes(bench) -> list[torch.dtype]:
        return [harness.DTYPES[d] for d in args.dtypes or bench.dtypes or DEFAULT_DTYPES]

    header = [f"Device: {harness.device_description(device)}", _clock_line(clock)]
    header += [
        f"implementation='auto' on {device.type}: {op} -> {impl}"
        for op, impl in harness.auto_choices(args.ops, device).items()
    ]
    header += list(dict.fromkeys(benches[op].describe(device) for op in args.ops if benches[op].describe is not None))
    skipped: list[str] = []
    plan = []
    for op in args.ops:
        bench = benches[op]
        chosen = [bench.floor] + [p for p in (args.providers or bench.providers) if p != bench.floor]
        runnable = []
        for p in chosen:
            if p not in bench.providers:  # asked for by name, but this op has no such provider
                skipped.append(f"skipped {op} / {p}: not a provider of this op")
                continue
            reason = harness.unavailable_reason(op, bench.providers[p], device)
            if reason is None:
                runnable.append(p)
            else:
                skipped.append(f"skipped {op} / {p} on {device.type}: {reason}")
        plan.append((bench, runnable))
    for line in header + skipped:
        print(line)

    sink = harness.CsvSink(csv_path, clock)
    header.insert(1, f"Commit: {sink.commit}; mode: {'full' if args.full else 'quick'}")
    interrupted = False
    try:
        for bench, runnable in plan:
            modes = args.modes or list(bench.default_modes)
            for shape in _shapes(bench, args.full, args.tokens, args.shape_scale):
                applies = []
                for p in runnable:
                    reason = harness.shape_skip_reason(bench.providers[p], shape)
                    if reason is None:
                        applies.append(p)
                    else:
                        skipped.append(f"skipped {bench.op} / {p} at {harness.shape_str(shape)}: {reason}")
                        print(skipped[-1])
                for dtype in dtypes(bench):
                    (bench.run_group or harness.run_group)(bench, applies, shape, dtype, device, modes, settings, sink)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sink.close()

    rows = harness.read_csv(csv_path)
    table = harness.markdown_table(rows)
    md = "\n".join(["# pemoe bench", "", *(f"- {h}" for h in header), *(f"- {s}" for s in skipped), "", table, ""])
    if interrupted:
        md += "\n**Interrupted**: the table holds only the cases finished before the interruption.\n"
    md_path.write_text(md)
    print()
    print(table)
    print()
    wrote = [f"CSV:      {csv_path}", f"Markdown: {md_path}"]
    if any(r["metric"] == "ratio_vs_floor" for r in rows):
        harness.plot_ratios(csv_path, png_path)
        wrote.append(f"PNG:      {png_path}")
    else:
        wrote.append("PNG:      not written (no ratios measured)")
    print("\n".join(wrote))
    if interrupted:
        print(f"interrupted: {len(rows)} rows kept in {csv_path}", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None, *, ops: Sequence[str] = DEFAULT_OPS, prog: str = "pemoe.bench") -> int:
    """``python -m pemoe.bench [options]`` (``ops``: the default ``--ops``, e.g. one op's module's own)."""
    benches = load_benches()
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=DESCRIPTION)
    add_arguments(parser, benches, default_ops=ops)
    return run(parser.parse_args(list(sys.argv[1:] if argv is None else argv)), benches)
