"""Fine-tuning report on the built-in synthetic multi-task set (issue 8, item 3; not a timed test).

The whole paper workflow, shrunk to run on a CPU in minutes:

1. pre-train a random-initialised tiny T5 (byte-level tokenizer) on a task-free span-corruption corpus
   over the prompts of all tasks (``synthetic:pretrain``; ``pemoe train --method full``), so the model
   knows the text but no task;
2. freeze it and instruction-tune adapters on the 29 training tasks (``synthetic:train``): (IA)3 vs MoV-E,
   LoRA vs MoLoRA-E (r = 4), soft vs top-2 routing, plus full fine-tuning and the untouched backbone as
   references;
3. evaluate zero-shot on the 12 held-out tasks by rank classification (median over templates, mean over
   tasks) and, in distribution, on fresh examples of the training tasks;
4. write ``summary.md`` (trainable share, final loss, accuracies, per-task table), ``loss_curves.png``,
   ``routing_<run>.png`` (the paper's Figure 5: mean routing probability per expert per task at the last
   encoder FFN) and ``results.json``.

Optimizer: AdamW at lr 1e-3 for every adapter run by default (``--optimizer``/``--lr``); the paper's
Adafactor at 3e-4 is added as one extra LoRA run (``--paper-optimizer-run``), because torch's Adafactor
scales updates by max(1e-3, RMS(param)) and so barely moves the zero-initialised ``lora_b`` within a few
hundred steps.

    python bench/finetune_report.py --size quick --out bench-results/finetune
    python bench/finetune_report.py --size micro --out /tmp/ft   # seconds: a smoke test of the pipeline
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import time

import torch

from pemoe.train.data import SYNTHETIC_TASKS, load_dataset
from pemoe.train.evaluate import format_table, rank_classification, routing_statistics
from pemoe.train.loop import TrainConfig, load_trained_model, train
from pemoe.train.report import markdown_table, plot_loss_curves, plot_routing

SIZES = {
    # smoke test (tests/test_train.py): a 1-layer 32-wide model, a handful of steps
    "micro": dict(
        init=json.dumps(dict(d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)),
        pretrain_steps=3,
        steps=3,
        batch_size=4,
        train_per_template=1,
        eval_per_template=1,
        experts=3,
        eval_every=0,
    ),
    "quick": dict(
        init="tiny",
        pretrain_steps=1500,
        steps=500,
        batch_size=32,
        train_per_template=60,
        eval_per_template=10,
        experts=8,
        eval_every=100,
    ),
    "full": dict(
        init="mini",
        pretrain_steps=4000,
        steps=2000,
        batch_size=32,
        train_per_template=200,
        eval_per_template=20,
        experts=10,
        eval_every=250,
    ),
}


def _runs(e: int, paper_run: bool) -> list[tuple[str, str, dict]]:
    """(key for --only, display name, TrainConfig fields) of every compared run."""
    runs = [
        ("ia3", "(IA)3", dict(method="ia3")),
        ("mov", f"MoV-{e}", dict(method="mov", num_experts=e)),
        ("mov-top2", f"MoV-{e} top-2", dict(method="mov", num_experts=e, top_k=2)),
        ("lora", "LoRA r=4", dict(method="lora", rank=4)),
        ("molora", f"MoLoRA-{e} r=4", dict(method="molora", num_experts=e, rank=4)),
        ("molora-top2", f"MoLoRA-{e} r=4 top-2", dict(method="molora", num_experts=e, rank=4, top_k=2)),
        ("full", "full fine-tune", dict(method="full")),
    ]
    if paper_run:
        runs.append(
            ("lora-paper", "LoRA r=4, Adafactor 3e-4", dict(method="lora", rank=4, optimizer="adafactor", lr=3e-4))
        )
    return runs


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="quick")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results/finetune"))
    p.add_argument("--optimizer", choices=["adafactor", "adamw"], default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-paper-optimizer-run", dest="paper_run", action="store_false")
    p.add_argument("--progress", action="store_true", help="progress bars (default: quiet)")
    p.add_argument("--only", type=lambda t: set(t.split(",")), default=None, help="comma list of run keys")
    p.add_argument("--backbone-dir", type=pathlib.Path, default=None, help="reuse a pre-trained model directory")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: small models)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    size = SIZES[a.size]
    out: pathlib.Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    sizes = f"seed={a.seed},train={size['train_per_template']},eval={size['eval_per_template']}"
    data = {split: f"synthetic:{split}:{sizes}" for split in ("train", "seen", "heldout", "pretrain")}
    held_out = {t.name for t in SYNTHETIC_TASKS if t.held_out}
    seen = load_dataset(data["seen"]).examples
    heldout = load_dataset(data["heldout"]).examples
    common = dict(batch_size=size["batch_size"], max_input_len=64, max_target_len=16, seed=a.seed, progress=a.progress)
    common["log_every"] = 0

    # 1. pre-training (task-free); this script owns --out: earlier runs there are replaced
    stale = [out / _slug(name) for _, name, _ in _runs(size["experts"], True)]
    for path in stale + ([] if a.backbone_dir else [out / "pretrain"]):
        shutil.rmtree(path, ignore_errors=True)
    if a.backbone_dir is None:
        t0 = time.perf_counter()
        pre = train(
            TrainConfig(
                data=data["pretrain"],
                out=str(out / "pretrain"),
                init=size["init"],
                method="full",
                optimizer="adamw",
                lr=1e-3,
                max_steps=size["pretrain_steps"],
                **common,
            )
        )
        pre_note = (
            f"pre-trained {pre.step} steps (AdamW 1e-3, batch {size['batch_size']}) on task-free span corruption, "
            f"last loss {pre.losses[-1][1]:.3f}, {time.perf_counter() - t0:.0f} s"
        )
        model_dir = out / "pretrain" / "model"
    else:
        model_dir = a.backbone_dir
        pre_note = f"the pre-trained backbone {model_dir} (reused)"
    print(pre_note, flush=True)

    def evaluate(bundle) -> tuple[float, float, object]:
        kw = dict(max_input_len=64, max_target_len=16, batch_size=128)
        h = rank_classification(bundle.model, bundle.tokenizer, heldout, **kw)
        s = rank_classification(bundle.model, bundle.tokenizer, seen, **kw)
        return h.average, s.average, h

    base = load_trained_model(str(model_dir))
    base_held, base_seen, base_res = evaluate(base)
    results: dict[str, dict] = {
        "backbone (no adapter)": dict(trainable=0, total=sum(p.numel() for p in base.model.parameters()))
    }
    results["backbone (no adapter)"].update(heldout=base_held, seen=base_seen, loss=None, seconds=0.0)
    per_task = {"backbone": base_res}
    curves = {}
    figures = []

    # 2.–3. adapters on the frozen backbone
    for key, name, kw in _runs(size["experts"], a.paper_run):
        if a.only and key not in a.only:
            continue
        kw = {"optimizer": a.optimizer, "lr": a.lr, **kw}
        t0 = time.perf_counter()
        r = train(
            TrainConfig(
                data=data["train"],
                out=str(out / _slug(name)),
                model=str(model_dir),
                max_steps=size["steps"],
                eval_data=data["heldout"],
                eval_every=size["eval_every"],
                **common,
                **kw,
            )
        )
        seconds = time.perf_counter() - t0
        held_avg, seen_avg, held_res = evaluate(r.bundle)
        tail = [v for _, v in r.losses[-20:]]
        results[name] = dict(
            trainable=r.trainable,
            total=r.total,
            heldout=held_avg,
            seen=seen_avg,
            loss=sum(tail) / len(tail),
            seconds=seconds,
            heldout_curve=[(s, e.average) for s, e in r.evals],
            config=kw,
        )
        per_task[name] = held_res
        curves[name] = r.losses
        if kw["method"] in ("mov", "molora"):
            site, stats = routing_statistics(
                r.bundle.model, r.bundle.tokenizer, seen + heldout, max_input_len=64, max_target_len=16
            )
            png = out / f"routing_{_slug(name)}.png"
            plot_routing(stats, held_out, png, title=f"{name}: mean routing probability\nat {site}")
            results[name]["routing"] = {"site": site, "per_task": stats}
            figures.append((name, site, png.name))
        print(
            f"{name}: held-out {100 * held_avg:.1f}%, seen {100 * seen_avg:.1f}%, "
            f"loss {results[name]['loss']:.3f}, {seconds:.0f} s",
            flush=True,
        )

    plot_loss_curves(curves, out / "loss_curves.png", window=max(1, min(20, size["steps"] // 10)))
    (out / "results.json").write_text(json.dumps({"size": a.size, "results": results}, indent=1))

    rows = []
    for name, r in results.items():
        share = f"{100 * r['trainable'] / r['total']:.3f}%" if r["trainable"] else "0"
        loss = "-" if r["loss"] is None else f"{r['loss']:.3f}"
        rows.append([name, f"{r['trainable']:,}", share, loss, f"{100 * r['heldout']:.1f}", f"{100 * r['seen']:.1f}"])
        rows[-1].append(f"{r['seconds']:.0f}")
    lines = [
        f"# pemoe fine-tuning report ({a.size})",
        "",
        f"- backbone: random-initialised T5 `{size['init']}` (byte tokenizer), {pre_note}",
        f"- adapters: {size['steps']} steps, batch {size['batch_size']}, {a.optimizer} lr {a.lr:g} "
        "(unless named), on the training tasks; backbone frozen",
        "- accuracy: rank classification, median over templates per task, mean over tasks (%); "
        f"held-out: {len(held_out)} tasks never trained on (chance level per task in the table below); "
        "seen: fresh examples of the training tasks",
        "",
        markdown_table(
            ["run", "trainable", "share", "final loss", "held-out acc", "seen acc", "seconds"],
            rows,
        ),
        "",
        "## Held-out tasks (median accuracy over templates, %)",
        "",
        format_table(per_task, heldout),
        "",
        "## Figures",
        "",
        "- `loss_curves.png`: training loss per run",
        *(
            f"- `{png}`: {name}, mean routing probability per expert per task at `{site}`"
            for name, site, png in figures
        ),
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
