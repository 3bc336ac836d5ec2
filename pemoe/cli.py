"""Command line: ``pemoe bench`` measures the ops against the frozen-linear floor.

``pemoe bench`` times, for each op (mov_linear, molora_linear, mov_ffn), shape, dtype and mode
(``fwd``: a training forward; ``fwd_bwd``: forward + backward), every provider (``linear`` floor,
``pemoe-torch``, ``pemoe-triton``, ``reference``, ``authors-einsum``), and records time, time relative to
the floor, and the activation memory saved for backward. It writes a long-format CSV (rows appended as
each case finishes), a markdown table and a PNG plot of the ratios into ``--out``. The benchmark code
lives in the checkout's ``bench/`` package (see bench/harness.py for exactly what is measured).
``--ops jax_mov_linear,jax_molora_linear,jax_mov_ffn`` times the JAX ops under ``jax.jit`` the same way
(bench/jax_ops.py: providers ``linear`` — a plain jitted matmul —, ``pemoe-xla`` and ``reference``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pathlib
import sys
from collections.abc import Callable, Sequence

import torch

DEFAULT_OPS = ("mov_linear", "molora_linear", "mov_ffn")
#: the JAX ops under jax.jit (bench/jax_ops.py), on request: their compiles would double the default run
JAX_OPS = ("jax_mov_linear", "jax_molora_linear", "jax_mov_ffn")
ALL_OPS = (*DEFAULT_OPS, "t5_step", *JAX_OPS)  # t5_step (a whole training step per adapter method) on request
DEFAULT_DTYPES = ("float32", "bfloat16")
MODES = ("fwd", "bwd", "fwd_bwd", "step")  # bench/harness.py's; "bwd" (backward alone) on request


def _import_bench():
    """Import the checkout's ``bench`` package (not installed with pemoe: it lives beside pemoe/)."""
    try:
        return importlib.import_module("bench.harness")
    except ImportError:
        root = pathlib.Path(__file__).resolve().parent.parent
        if not (root / "bench" / "harness.py").is_file():
            raise SystemExit(
                "pemoe bench: the benchmark code (bench/ beside pemoe/) was not found; run it from a source "
                "checkout of pemoe (pip install -e .)"
            ) from None
        sys.path.insert(0, str(root))
        return importlib.import_module("bench.harness")


def _benches() -> dict:
    _import_bench()
    benches = {op: importlib.import_module(f"bench.{op}").BENCH for op in ALL_OPS if op not in JAX_OPS}
    return benches | importlib.import_module("bench.jax_ops").BENCHES  # (imports jax only when run)


def _csv_list(valid: Sequence[str], what: str, convert: Callable[[str], object] = str) -> Callable[[str], list]:
    """argparse type: a comma list whose items must be in ``valid`` (empty ``valid``: any, via ``convert``)."""

    def parse(text: str) -> list:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {what} list")
        out = []
        for s in items:
            if valid and s not in valid:
                raise argparse.ArgumentTypeError(f"unknown {what} {s!r}; valid {what}s: {', '.join(valid)}")
            try:
                out.append(convert(s))
            except ValueError:
                raise argparse.ArgumentTypeError(f"invalid {what} {s!r}") from None
        return out

    return parse


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise ValueError(text)
    return v


def build_parser(benches: dict) -> argparse.ArgumentParser:
    """The ``pemoe`` argument parser (subcommand ``bench``)."""
    from bench.harness import DTYPES

    providers = list(dict.fromkeys(p for b in benches.values() for p in b.providers))
    parser = argparse.ArgumentParser(prog="pemoe", description="pemoe command line")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "bench",
        help="benchmark the ops against the frozen-linear floor",
        description="Time each op / provider / shape / dtype / mode, relative to the frozen linear floor, and "
        "measure the activation memory saved for backward. Writes results.csv, results.md and ratios.png.",
    )
    b.add_argument("--ops", type=_csv_list(list(benches), "op"), default=list(DEFAULT_OPS), help="comma list")
    b.add_argument(
        "--providers",
        type=_csv_list(providers, "provider"),
        default=None,
        help=f"comma list of {', '.join(providers)} (default: each op's own; the 'linear' floor is always measured)",
    )
    b.add_argument("--dtypes", type=_csv_list(list(DTYPES), "dtype"), default=list(DEFAULT_DTYPES))
    b.add_argument(
        "--modes",
        type=_csv_list(list(MODES), "mode"),
        default=None,
        help="comma list (default: each op's own: fwd,fwd_bwd; t5_step: fwd_bwd,step)",
    )
    b.add_argument(
        "--tokens",
        type=_csv_list([], "token count", _positive_int),
        default=None,
        help="comma list of token counts T replacing the default ones",
    )
    b.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results"), help="output folder")
    b.add_argument("--device", default=None, help="device to measure (default: cuda if available, else cpu)")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="full", action="store_false", help="issue's shapes, few reps (default)")
    g.add_argument(
        "--full",
        dest="full",
        action="store_true",
        help="more reps; adds T5 base and XL widths and tokens 16 and 512",
    )
    b.set_defaults(full=False)
    b.add_argument(
        "--rounds",
        type=_positive_int,
        default=None,
        help="time every case over exactly this many interleaved rounds (default: the --quick / --full time "
        "budget); more rounds give steadier medians on a noisy machine",
    )
    # Testing aid: divide the model widths by this factor (tiny shapes for fast tests).
    b.add_argument("--shape-scale", type=_positive_int, default=1, help=argparse.SUPPRESS)
    from pemoe.params import METHODS, T5_V1_1

    pp = sub.add_parser(
        "params",
        help="trainable-parameter table of the adapters on T5 v1.1 (meta device, no weights)",
        description="Trainable parameters (absolute and %% of the base model) of (IA)3, MoV, LoRA and MoLoRA "
        "on T5 v1.1 small/base/large/xl/xxl, counted on models built on the meta device.",
    )
    pp.add_argument("--sizes", type=_csv_list(list(T5_V1_1), "size"), default=list(T5_V1_1), help="comma list")
    pp.add_argument("--methods", type=_csv_list(list(METHODS), "method"), default=list(METHODS), help="comma list")
    from pemoe.train.cli import add_eval_parser, add_train_parser

    add_train_parser(sub)
    add_eval_parser(sub)
    return parser


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


def run_bench(args: argparse.Namespace, benches: dict) -> int:
    """Run ``pemoe bench``; returns the exit status (130 when interrupted, rows kept)."""
    from bench import harness

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = (
        harness.Settings(warmup=3, reps=5, min_rounds=5, max_rounds=20, budget_s=10.0)
        if args.full
        else harness.Settings(warmup=2, reps=2, min_rounds=4, max_rounds=10, budget_s=2.5)
    )
    if args.rounds is not None:
        settings = dataclasses.replace(settings, min_rounds=args.rounds, max_rounds=args.rounds)
    out_dir: pathlib.Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out_dir / "results.csv", out_dir / "results.md", out_dir / "ratios.png"
    dtypes = [harness.DTYPES[d] for d in args.dtypes]

    header = [f"Device: {harness.device_description(device)}"]
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

    sink = harness.CsvSink(csv_path)
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
                for dtype in dtypes:
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pemoe`` console script."""
    benches = _benches()
    args = build_parser(benches).parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "bench":
        return run_bench(args, benches)
    if args.command == "params":
        from pemoe.params import format_table, parameter_table

        print(format_table(parameter_table(args.sizes, args.methods)))
        return 0
    if args.command in ("train", "eval"):
        from pemoe.train.cli import run

        return run(args)
    return 2


def _exit_under_torchrun(code: int) -> None:
    """Under torchrun (``python -m pemoe.cli`` per rank), end the process without interpreter finalisation.

    The run is complete at this point (checkpoints written, process group destroyed, the training loop's
    ``finally`` blocks done), but torch's C++ static destructors at interpreter shutdown sometimes abort a
    rank ("terminate called without an active exception", seen about one run in ten with FSDP2 on gloo),
    which torchrun reports as a failed job. Flushing and ``os._exit`` skips only that teardown."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    import os

    code = main()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _exit_under_torchrun(code)
    raise SystemExit(code)
