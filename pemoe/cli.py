"""Command line: ``pemoe bench``, ``pemoe params``, ``pemoe train``, ``pemoe eval``.

``pemoe bench`` measures the ops against the frozen-linear floor; its options and the run live with the
benchmarks (:mod:`pemoe.bench.runner`, installed from the checkout's ``bench/`` folder), which never import
this module. ``python -m pemoe`` is the same command as the ``pemoe`` script.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pemoe._argtypes import csv_list


def build_parser(benches: dict) -> argparse.ArgumentParser:
    """The ``pemoe`` argument parser (subcommand ``bench``)."""
    from pemoe.bench import runner

    parser = argparse.ArgumentParser(prog="pemoe", description="pemoe command line")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "bench", help="benchmark the ops against the frozen-linear floor", description=runner.DESCRIPTION
    )
    runner.add_arguments(b, benches)
    from pemoe.params import METHODS, MODELS

    pp = sub.add_parser(
        "params",
        help="trainable-parameter table of the adapters on T5 v1.1 and decoder LLMs (meta device, no weights)",
        description="Trainable parameters (absolute and %% of the base model) of (IA)3, MoV, LoRA and MoLoRA "
        "on T5 v1.1 small/base/large/xl/xxl and Llama-3-8B, Qwen3-8B, Mistral-7B shapes, counted on models "
        "built on the meta device.",
    )
    pp.add_argument("--sizes", type=csv_list(MODELS, "size"), default=list(MODELS), help="comma list")
    pp.add_argument("--methods", type=csv_list(list(METHODS), "method"), default=list(METHODS), help="comma list")
    from pemoe.train.cli import add_eval_parser, add_train_parser

    add_train_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pemoe`` command with ``argv`` (default: ``sys.argv[1:]``); returns its exit status."""
    from pemoe.bench import runner

    benches = runner.load_benches()
    args = build_parser(benches).parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "bench":
        return runner.run(args, benches)
    if args.command == "params":
        from pemoe.params import format_table, parameter_table

        print(format_table(parameter_table(args.sizes, args.methods)))
        return 0
    if args.command in ("train", "eval"):
        from pemoe.train.cli import run

        return run(args)
    return 2


def console_main() -> None:
    """Entry point of the ``pemoe`` script, ``python -m pemoe`` and ``python -m pemoe.cli``: exits the process.

    Under torchrun (one process per rank) the process ends through ``os._exit`` once the run is complete
    (checkpoints written, process group destroyed, the training loop's ``finally`` blocks done): torch's C++
    static destructors at interpreter shutdown sometimes abort a rank ("terminate called without an active
    exception", seen about one run in ten with FSDP2 on gloo), which torchrun reports as a failed job.
    Flushing and ``os._exit`` skip only that teardown."""
    code = main()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    console_main()
