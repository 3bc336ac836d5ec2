"""``pemoe train`` and ``pemoe eval`` subcommands (argument parsers and their runners).

``pemoe/cli.py`` adds these parsers to its subcommands and dispatches to :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

__all__ = ["add_train_parser", "add_eval_parser", "run"]

EPILOG = """\
data: a JSONL file ({"task", "input", "target", optional "choices", "template"} per line) or the built-in
synthetic multi-task set, synthetic:<train|seen|heldout|pretrain>[:seed=S,train=N,eval=M] (pretrain: span
corruption over all prompts, no answers).

examples (the synthetic pipeline on a tiny random T5, byte-level tokenizer; bench/finetune_report.py runs it all):
  pemoe train --init tiny --method full --data synthetic:pretrain --optimizer adamw --lr 1e-3 \\
      --batch-size 32 --max-steps 1500 --out runs/pre          # task-free pre-training
  pemoe train --model runs/pre/model --method mov --num-experts 8 --data synthetic:train --batch-size 32 \\
      --optimizer adamw --lr 1e-2 --eval-data synthetic:heldout --eval-every 100 --max-steps 300 \\
      --checkpoint-every 100 --out runs/mov
  pemoe train ...same arguments... --max-steps 500 --resume    # continue from the latest checkpoint
  pemoe eval --model runs/pre/model --adapter runs/mov/adapter.safetensors --data synthetic:heldout \\
      --routing-plot runs/mov/routing.png                    # + the per-task routing heat maps (Figure 5)

causal LMs (Llama, Mistral, Qwen, Gemma, GPT-2 folders; the sequence is input + target + eos, the loss and the
rank-classification scores on the target tokens):
  pemoe train --init tiny-llama --method mov --num-experts 4 --data synthetic:train --out runs/llama-mov
  pemoe train --model path/to/llama --method molora --num-experts 8 --data train.jsonl --out runs/molora
"""


def _csv(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise argparse.ArgumentTypeError("empty list")
    return items


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", choices=["pemoe", "transformers"], default="pemoe", help="T5 implementation to run")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a local SentencePiece .model file (default: the model directory's own, else the built-in byte "
        "tokenizer: UTF-8 bytes + 3, pad 0, eos 1, 259 ids)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="backbone dtype")
    p.add_argument("--max-input-len", type=int, default=128, help="input tokens (incl. end-of-sequence)")
    p.add_argument("--max-target-len", type=int, default=32, help="target tokens (incl. end-of-sequence)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad JSONL lines instead of failing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def add_train_parser(sub) -> argparse.ArgumentParser:
    """The ``train`` subcommand."""
    p = sub.add_parser(
        "train",
        help="fine-tune a T5 or causal LM with MoV / MoLoRA / (IA)3 / LoRA adapters (or all weights) on JSONL data",
        description="Fine-tune pemoe's or transformers' T5, or a transformers causal LM (sequence input + target + "
        "eos, loss on the target tokens only), with adapters (frozen backbone) or, with --method "
        "full, all weights (e.g. to pre-train a random model). Checkpoints hold only the trained weights, the "
        "optimizer and the data-loader state; --resume continues bit-exactly; Ctrl-C saves a resumable "
        "checkpoint. Writes <out>/metrics.jsonl, <out>/adapter.safetensors (or <out>/model/), <out>/eval.md.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model",
        help="model directory: pemoe format (pemoe train --method full), transformers T5, or a transformers causal "
        "LM (Llama, Mistral, Qwen2/3, Gemma 1-3, GPT-2: AutoModelForCausalLM, local files only)",
    )
    src.add_argument(
        "--init",
        help="random-initialised model: T5 preset tiny, mini, small, or a JSON of T5Config fields; tiny-llama: a "
        "2-layer Llama of width 64 with grouped-query attention (causal LM)",
    )
    p.add_argument("--data", required=True, help="training data (JSONL path or synthetic:train)")
    p.add_argument("--out", required=True, type=pathlib.Path, help="output directory")
    p.add_argument("--method", choices=["mov", "ia3", "molora", "lora", "full"], default="mov")
    p.add_argument("--num-experts", type=int, default=10, help="experts of MoV / MoLoRA (default 10)")
    p.add_argument("--rank", type=int, default=4, help="LoRA / MoLoRA rank (default 4)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA / MoLoRA alpha, scale = alpha / rank")
    p.add_argument("--top-k", type=int, default=None, help="top-k routing (default: soft merge of all experts)")
    p.add_argument("--renormalize", action="store_true", help="renormalise the top-k probabilities")
    p.add_argument("--sites", type=_csv, default=None, help="comma list of adapter sites (default: the paper's)")
    p.add_argument("--implementation", default="auto", help="pemoe.ops implementation (auto, torch, reference, ...)")
    p.add_argument(
        "--framework",
        choices=["torch", "jax"],
        default="torch",
        help="train with PyTorch (default) or JAX (pemoe.train.jax_loop: same data, checkpoints and adapter files; "
        "adapter methods only, no dropout; --implementation then names a pemoe.jax implementation)",
    )
    p.add_argument(
        "--mesh",
        default=None,
        help="--framework jax: data=N[,model=M] runs the step over a device mesh (pemoe.jax.parallel): the batch "
        "split over N devices, large backbone matrices over M",
    )
    p.add_argument(
        "--jax-distributed",
        action="store_true",
        help="--framework jax: one process of a multi-process job (jax.distributed.initialize: each process runs "
        "this same command; the job is found by JAX's cluster detection on Cloud TPU, SLURM, Open MPI, Kubernetes "
        "or by --coordinator/--num-processes/--process-id); --mesh then spans every process's devices (default "
        "data=<all devices>); process 0 writes the outputs; --out must be shared",
    )
    p.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="--framework jax, several processes: process 0's address (it listens on PORT); implies --jax-distributed",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="--framework jax: processes in the job (implies --jax-distributed)",
    )
    p.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="--framework jax: this process's index, 0..N-1 (implies --jax-distributed)",
    )
    _model_args(p)
    p.add_argument("--dropout", type=float, default=None, help="override the model's dropout rate")
    p.add_argument("--optimizer", choices=["adafactor", "adamw"], default="adafactor")
    p.add_argument("--lr", type=float, default=3e-4, help="constant learning rate (default 3e-4)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps in all (resume included)")
    p.add_argument("--seed", type=int, default=0, help="data order, dropout and --init seed")
    p.add_argument("--eval-data", default=None, help="evaluation data with choices (e.g. synthetic:heldout)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="(input, choice) pairs per evaluation batch")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="most recent checkpoints kept")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from a checkpoint directory (no value: the latest under --out)",
    )
    p.add_argument(
        "--router-stats-every",
        type=int,
        default=10,
        help="router health every N steps (MoV/MoLoRA, E > 1): per site the routing entropy, largest mean expert "
        "probability and load over experts, written to metrics.jsonl (kind router) and logged; 0: off; "
        "--framework torch only",
    )
    p.add_argument(
        "--balance-loss",
        type=float,
        default=0.0,
        help="add COEF x KL(mean routing probabilities || uniform), averaged over the sites, to the loss "
        "(load balancing; default 0: off, as in the paper)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="plain log lines instead of a bar")
    p.add_argument("--log-every", type=int, default=10, help="plain log line every N steps (without a bar)")
    p.add_argument(
        "--parallel",
        choices=["auto", "none", "ddp", "fsdp"],
        default="auto",
        help="data parallelism under torchrun (torchrun --nproc-per-node N -m pemoe train ...): ddp, or fsdp "
        "(FSDP2: backbone sharded per T5 block); --batch-size is the global micro-batch, split over the ranks; "
        "auto: ddp when WORLD_SIZE > 1, else none",
    )
    return p


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """The ``eval`` subcommand."""
    p = sub.add_parser(
        "eval",
        help="rank-classification accuracy of a model (+ adapter) on JSONL data with choices",
        description="Score each answer choice by the model's log-likelihood; accuracy per task is the median "
        "over prompt templates; prints a markdown table per task and the average.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="model directory (pemoe format, transformers T5 or transformers causal LM)"
    )
    p.add_argument("--adapter", default=None, help="adapter file written by pemoe train")
    p.add_argument("--data", required=True, help="JSONL with choices, or synthetic:heldout / synthetic:seen")
    p.add_argument("--batch-size", type=int, default=64, help="(input, choice) pairs per batch")
    p.add_argument("--length-normalize", action="store_true", help="score by mean instead of summed log-likelihood")
    p.add_argument("--json", type=pathlib.Path, default=None, help="also write the result as JSON here")
    p.add_argument(
        "--routing-plot",
        type=pathlib.Path,
        default=None,
        metavar="PNG",
        help="also draw the paper's Figure 5 here: mean expert probability per task (rows) and expert (columns), "
        "one heat map per routed adapter site, over the data's inputs and targets (MoV / MoLoRA with E > 1); "
        "the numbers go to PNG with the suffix .json",
    )
    p.add_argument(
        "--routing-sites",
        type=_csv,
        default=None,
        help="comma list of the adapter sites to plot (default: every routed site)",
    )
    _model_args(p)
    return p


def _train(args: argparse.Namespace) -> int:
    from pemoe.train.data import BadLineError
    from pemoe.train.loop import CheckpointMismatch, TrainConfig, train

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    fields["out"] = str(fields["out"])
    framework = getattr(args, "framework", "torch")
    try:
        if framework == "jax" and args.parallel not in ("auto", "none"):
            raise ValueError("--parallel (torch.distributed DDP / FSDP) applies to --framework torch only")
        if framework == "jax":
            from pemoe.train import jax_loop

            if args.threads:
                raise ValueError(
                    "--threads sets PyTorch's CPU threads and does not apply to --framework jax (XLA sizes its own "
                    "thread pool)"
                )
            result = jax_loop.train(TrainConfig(**fields), mesh=args.mesh, distributed=_jax_distributed(args))
        else:
            if args.mesh is not None:
                raise ValueError("--mesh applies to --framework jax only")
            if _jax_distributed(args) is not None:
                raise ValueError(
                    "--jax-distributed / --coordinator / --num-processes / --process-id apply to --framework jax "
                    "only (torch: torchrun)"
                )
            result = train(TrainConfig(**fields))
    except (BadLineError, CheckpointMismatch, FileNotFoundError, NotImplementedError, ValueError) as e:
        print(f"pemoe train: error: {e}", file=sys.stderr)
        return 2
    code = 130 if result.interrupted else 0
    if getattr(result, "rank", 0) != 0:  # torchrun: rank 0 reports
        return code
    last = result.losses[-1][1] if result.losses else float("nan")
    print(f"pemoe train: step {result.step}, last loss {last:.4f}, checkpoint {result.checkpoint}")
    if result.skipped_lines:
        print(f"pemoe train: {len(result.skipped_lines)} bad line(s) skipped")
    if result.evals:
        print(f"pemoe train: held-out average accuracy {100 * result.evals[-1][1].average:.1f}%")
    return code


def _jax_distributed(args: argparse.Namespace) -> dict | None:
    """The ``jax_loop.train(distributed=...)`` of the multi-process options (None: one process)."""
    given = {
        "coordinator": getattr(args, "coordinator", None),
        "num_processes": getattr(args, "num_processes", None),
        "process_id": getattr(args, "process_id", None),
    }
    if not getattr(args, "jax_distributed", False) and all(v is None for v in given.values()):
        return None
    return {k: v for k, v in given.items() if v is not None}


def _eval(args: argparse.Namespace) -> int:
    from pemoe.train.data import BadLineError, load_dataset
    from pemoe.train.evaluate import format_table, rank_classification
    from pemoe.train.loop import load_trained_model

    try:
        data = load_dataset(args.data, skip_bad_lines=args.skip_bad_lines)
        bundle = load_trained_model(
            args.model,
            adapter=args.adapter,
            backbone=args.backbone,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            max_input_len=args.max_input_len,
            max_target_len=args.max_target_len,
        )
        result = rank_classification(
            bundle.model,
            bundle.tokenizer,
            data.examples,
            batch_size=args.batch_size,
            max_input_len=args.max_input_len,
            max_target_len=args.max_target_len,
            length_normalize=args.length_normalize,
            family=bundle.family,
        )
        if args.routing_plot is not None:
            from pemoe.router_health import plot_routing
            from pemoe.train.evaluate import routing_statistics_all

            stats = routing_statistics_all(
                bundle.model,
                bundle.tokenizer,
                data.examples,
                args.routing_sites,
                batch_size=args.batch_size,
                max_input_len=args.max_input_len,
                max_target_len=args.max_target_len,
                family=bundle.family,
            )
            plot_routing(stats, args.routing_plot, title=f"mean routing probability per task ({args.data})")
            args.routing_plot.with_suffix(".json").write_text(json.dumps(stats, indent=1))
    except (BadLineError, FileNotFoundError, ValueError) as e:
        print(f"pemoe eval: error: {e}", file=sys.stderr)
        return 2
    if data.skipped:
        print(f"pemoe eval: {len(data.skipped)} bad line(s) skipped, first: {data.skipped[0]}", file=sys.stderr)
    print(format_table({"accuracy %": result}, data.examples))
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=1))
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch ``pemoe train`` / ``pemoe eval``."""
    if args.threads and getattr(args, "framework", "torch") == "torch":
        import torch

        torch.set_num_threads(args.threads)
    return _train(args) if args.command == "train" else _eval(args)
