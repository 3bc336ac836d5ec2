"""The first run on a GPU, in one command: ``python -m pemoe.bench.gpu_check [--out DIR]``.

On one CUDA GPU it

1. checks every Triton kernel (``mov_linear``, ``mov_ffn``, ``molora_linear``, and ``molora_adapter``: MoLoRA
   over a base that runs its own forward; forward and every gradient; the MoV adapter-bank kernels of
   ``mov_linear``, ``mov`` and ``mov_ffn``, forward only, as the "bank" variant) with real autotuning against the
   reference, by the tolerance rule of :mod:`pemoe.testing`: at T5-large widths in bfloat16, float16 and
   float32 with E ∈ {1, 10, 30}, plus top-2 (renormalised) and sentence routing (and mov_ffn with Llama's
   SiLU) at E = 10; at T5-XL and Llama-7B-like widths (K = N = 4096, F = 11008, D = 128) in bfloat16 at E = 10;
   the adapter-bank kernels (``molora_linear`` / ``molora_adapter`` with ``adapter_ids``: forward only) on the
   same matrix with a bank of 4 adapters, plus a decode-sized batch;
2. times the fused ops against ``F.linear`` (cuBLAS; the plain FFN for ``mov_ffn``), the authors' einsum
   formulation and, at E = 1, PEFT's IA3 / LoRA, with ``triton.testing.do_bench`` (the ``pemoe bench``
   harness: medians, ratios against the floor measured in the same run);
3. checks the JAX ``"pallas"`` (Triton lowering) and ``"triton"`` (jax-triton) paths at T5-large widths when
   JAX has a GPU backend.

It writes ``gpu_check.csv`` (one row per compared tensor: error, reference error, bound, verdict),
``results.csv`` (the timings, ``pemoe bench``'s format) and ``gpu_check.md`` (device, versions, verdicts,
the timing table) into ``--out``, and exits 1 if any comparison fails (0 otherwise). ``--dry-run`` runs the
same code on tiny shapes where there is no GPU: the kernels in the Triton interpreter, the JAX kernels in
their interpreters, timings on the CPU (pemoe's Triton provider is not timed there).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable, Sequence

import torch

OPS = ("mov_linear", "mov_ffn", "molora_linear")
#: Checked for correctness besides OPS (timed with them: no): MoLoRA over a base that runs its own forward, at
#: molora_linear's shapes (its ``base`` the frozen linear's output).
CHECKED_OPS = (*OPS, "molora_adapter", "molora_linear_banked", "molora_adapter_banked")
#: Adapter-bank checks: the op each runs with ``adapter_ids`` (forward only: those kernels have no backward), on a
#: bank of BANK_SIZE adapters, tokens naming BANK_IDS in turn (unsorted, -1 the base alone, adapter 2 absent).
BANKED = {"molora_linear_banked": "molora_linear", "molora_adapter_banked": "molora_adapter"}
BANK_SIZE = 4
BANK_IDS = (0, 3, -1, 1, 3, 0, 1)
DECODE_TOKENS = 32  # the "decode" variant: this many tokens, one per sequence, every id in turn
#: Ops whose shapes are another op's.
SHAPE_OF = {"molora_adapter": "molora_linear", "molora_linear_banked": "molora_linear",
            "molora_adapter_banked": "molora_linear"}  # fmt: skip
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EXPERTS = (1, 10, 30)
#: Per-op widths of each model shape (T tokens; MoV heads of width D = N / G; FFN M = d_model, F = d_ff).
SHAPES: dict[str, dict[str, dict[str, int]]] = {
    "t5-large": {
        "mov_linear": dict(T=2048, K=1024, N=1024, G=16),
        "mov_ffn": dict(T=2048, M=1024, F=2816),
        "molora_linear": dict(T=2048, K=1024, N=1024, r=4),
    },
    "t5-xl": {
        "mov_linear": dict(T=2048, K=2048, N=2048, G=32),
        "mov_ffn": dict(T=2048, M=2048, F=5120),
        "molora_linear": dict(T=2048, K=2048, N=2048, r=4),
    },
    "llama-7b": {
        "mov_linear": dict(T=2048, K=4096, N=4096, G=32),
        "mov_ffn": dict(T=2048, M=4096, F=11008),
        "molora_linear": dict(T=2048, K=4096, N=4096, r=4),
    },
}
#: ``--dry-run``: interpreter-sized (D = 16, ragged tiles), the same code paths.
DRY_SHAPES: dict[str, dict[str, dict[str, int]]] = {
    "tiny": {
        "mov_linear": dict(T=40, K=48, N=48, G=3),
        "mov_ffn": dict(T=40, M=48, F=40),
        "molora_linear": dict(T=40, K=48, N=56, r=4),
    },
}
DRY_EXPERTS = (1, 3)
VARIANTS = ("soft", "top2-renorm", "sentence")
#: Variants of one op only: mov_ffn with Llama's gated SiLU; "bank": an adapter bank (per-token adapter_ids over
#: BANK_SIZE stacked adapters, -1 included; forward only), which for mov_linear also checks the standalone mov;
#: "decode": the MoLoRA bank kernels at DECODE_TOKENS tokens.
OP_VARIANTS = {
    "mov_ffn": ("silu", "bank"), "mov_linear": ("bank",),
    "molora_linear_banked": ("decode",), "molora_adapter_banked": ("decode",),
}  # fmt: skip
ROUTER_INPUT_WIDTH = 64  # sentence routing: one [B, 64] vector per sequence
CSV_COLUMNS = ["op", "shape", "dtype", "E", "variant", "implementation", "tensor", "err", "ref_err", "bound", "ok"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One correctness comparison: an op at a model shape, dtype, expert count and routing variant."""

    op: str
    shape_name: str
    shape: dict[str, int]
    dtype: torch.dtype
    experts: int
    variant: str = "soft"

    @property
    def label(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.op} {self.shape_name} {dt} E={self.experts} {self.variant}"


def correctness_cases(shapes: dict[str, dict[str, dict[str, int]]], experts: Sequence[int]) -> list[Case]:
    """The first shape: every dtype × every E with soft routing, and top-2 (renormalised) and sentence
    routing (and the op's own variants) at the middle E in bfloat16. The other shapes: bfloat16 at the middle E."""
    names = list(shapes)
    mid = experts[len(experts) // 2]
    cases = []
    for op in CHECKED_OPS:
        key = SHAPE_OF.get(op, op)
        first = shapes[names[0]][key]
        cases += [Case(op, names[0], first, dt, e) for dt in DTYPES.values() for e in experts]
        cases += [Case(op, names[0], first, torch.bfloat16, mid, v) for v in VARIANTS[1:] + OP_VARIANTS.get(op, ())]
        cases += [Case(op, n, shapes[n][key], torch.bfloat16, mid) for n in names[1:]]
    return cases


def _bench_module(op: str):
    return importlib.import_module(f"pemoe.bench.{SHAPE_OF.get(op, op)}")


def make_arguments(case: Case, device: torch.device) -> tuple[dict, tuple[str, ...]]:
    """(keyword arguments of ``pemoe.ops.<op>``, the names of the tensors whose gradients are compared).
    Activations and frozen weights in the case's dtype, adapter parameters float32 (the bench's inputs)."""
    if case.op in BANKED:
        return _bank_arguments(case, device), ()
    shape = dict(case.shape, E=case.experts)
    t = _bench_module(case.op).make_inputs(shape, case.dtype, device)
    if case.op == "mov_linear":
        kw = dict(x=t["x"], weight=t["weight"], router=t["router"], experts=t["experts"], bias=t["bias"])
        params = ("router", "experts")
    elif case.op == "mov_ffn":
        kw = dict(x=t["x"], wi_0=t["wi_0"], wo=t["wo"], router=t["router"], experts=t["experts"], wi_1=t["wi_1"])
        params = ("router", "experts")
    elif case.op == "molora_linear":
        kw = dict(x=t["x"], weight=t["weight"], lora_a=t["lora_a"], lora_b=t["lora_b"], router=t["router"])
        kw |= dict(scale=16.0 / case.shape["r"], bias=t["bias"])
        params = ("router", "lora_a", "lora_b")
    else:  # molora_adapter: the frozen linear's output as its base, which gets dy
        base = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])
        kw = dict(x=t["x"], base=base, lora_a=t["lora_a"], lora_b=t["lora_b"], router=t["router"])
        kw |= dict(scale=16.0 / case.shape["r"])
        params = ("router", "lora_a", "lora_b", "base")
    if case.experts == 1:
        kw["router"] = None  # (IA)3 / LoRA
        params = tuple(p for p in params if p != "router")
    if case.variant == "top2-renorm":
        kw |= dict(top_k=2, renormalize=True)
    elif case.variant == "silu":
        kw["activation"] = "silu"
    elif case.variant == "sentence":
        g = torch.Generator().manual_seed(1)
        x = kw["x"]
        kw["x"] = x.reshape(2, x.shape[0] // 2, x.shape[1])
        if "base" in kw:
            kw["base"] = kw["base"].reshape(2, x.shape[0] // 2, kw["base"].shape[1])
        kw["router_input"] = torch.randn(2, ROUTER_INPUT_WIDTH, generator=g).to(device)
        kw["router"] = (torch.randn(ROUTER_INPUT_WIDTH, case.experts, generator=g) * 0.2).to(device)
        params = (*params, "router_input")
    elif case.variant == "bank":
        return _bank(kw, device), ()  # the bank kernels are forward only: the output alone is compared
    return kw, ("x", *params)


def _bank(kw: dict, device: torch.device) -> dict:
    """The case's adapter as adapter 0 of BANK_SIZE (the others: perturbed copies) and seeded per-token ids in
    [-1, BANK_SIZE), unsorted."""
    g = torch.Generator().manual_seed(3)
    for name in ("router", "experts"):
        p = kw[name]
        if p is not None:
            noise = [torch.randn(p.shape, generator=g).to(device) for _ in range(BANK_SIZE - 1)]
            kw[name] = torch.stack([p] + [p * (1 + 0.2 * n) for n in noise])
    kw["adapter_ids"] = torch.randint(-1, BANK_SIZE, kw["x"].shape[:-1], generator=g).to(device)
    return kw


def _bank_arguments(case: Case, device: torch.device) -> dict:
    """Keyword arguments of a BANKED case: the single-adapter op's, its adapter parameters stacked with
    BANK_SIZE - 1 more of the same scale (seeded), and ``adapter_ids``."""
    one = dataclasses.replace(case, op=BANKED[case.op], variant="soft" if case.variant == "decode" else case.variant)
    kw, _ = make_arguments(one, device)
    g = torch.Generator().manual_seed(3)
    for name in ("lora_a", "lora_b", "router"):
        p = kw[name]
        if p is not None:
            more = [(torch.randn(p.shape, generator=g) * p.std().item()).to(device) for _ in range(BANK_SIZE - 1)]
            kw[name] = torch.stack([p, *more])
    if case.variant == "decode":
        kw["x"] = kw["x"][:DECODE_TOKENS]
        if kw.get("base") is not None:
            kw["base"] = kw["base"][:DECODE_TOKENS]
        ids = torch.arange(kw["x"].shape[0]) % (BANK_SIZE + 1) - 1
    else:
        ids = torch.tensor([BANK_IDS[(5 * t + 1) % len(BANK_IDS)] for t in range(kw["x"].shape[:-1].numel())])
    kw["adapter_ids"] = ids.reshape(kw["x"].shape[:-1]).to(device)
    return kw


def _run(op: str, kw: dict, grad_names: Sequence[str], implementation: str, grad_out: torch.Tensor | None = None):
    """(output, {name: gradient}, grad_out) of ``pemoe.ops.<op>`` on fresh leaves of ``kw``, differentiated
    along ``grad_out`` (None: a seeded float64 normal of the output's shape, made here); no gradients for an
    empty ``grad_names`` (forward-only checks)."""
    from pemoe import ops

    fn = getattr(ops, BANKED.get(op, op))
    if not grad_names:  # forward only
        with torch.no_grad():
            return fn(**kw, implementation=implementation), {}, grad_out
    leaves = {
        k: (v.detach().clone().requires_grad_(k in grad_names) if torch.is_tensor(v) else v) for k, v in kw.items()
    }
    out = fn(**leaves, implementation=implementation)
    if grad_out is None:
        g = torch.Generator().manual_seed(2)
        grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    grads = torch.autograd.grad(out, [leaves[n] for n in grad_names], grad_out.to(out.dtype))
    return out.detach(), dict(zip(grad_names, grads, strict=True)), grad_out


def _references(op: str, kw: dict, names: Sequence[str]):
    """(grad_out, (truth, its gradients), (ref, its gradients)): the reference in float64 from the upcast
    inputs and in the inputs' dtype, both along one grad_out, as the tolerance rule compares them."""
    truth_kw = {k: (v.to(torch.float64) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    truth, truth_grads, grad_out = _run(op, truth_kw, names, "reference")
    ref, ref_grads, _ = _run(op, kw, names, "reference", grad_out)
    return grad_out, (truth, truth_grads), (ref, ref_grads)


def check_case(case: Case, device: torch.device, implementation: str = "triton") -> list[dict]:
    """Compare ``implementation``'s output and every gradient with the reference (:mod:`pemoe.testing`)."""
    from pemoe.testing import check_rule

    kw, names = make_arguments(case, device)
    grad_out, (truth, truth_grads), (ref, ref_grads) = _references(case.op, kw, names)
    rows = []
    try:
        out, grads, _ = _run(case.op, kw, names, implementation, grad_out)
    except Exception as e:  # noqa: BLE001 - a kernel that raises is a failed check, reported with its error
        return [_row(case, implementation, "all", None, error=f"{type(e).__name__}: {e}")]
    for tensor, got, want, eager in [("output", out, truth, ref)] + [
        (f"d{n}", grads[n], truth_grads[n], ref_grads[n]) for n in names
    ]:
        rows.append(_row(case, implementation, tensor, check_rule(got, eager, want, case.dtype)))
    if case.variant == "bank" and case.op == "mov_linear":  # the standalone mov on h = x Wᵀ + b, same bank
        h = torch.nn.functional.linear(kw["x"], kw["weight"], kw["bias"])
        mov_kw = dict(h=h, router=kw["router"], experts=kw["experts"], adapter_ids=kw["adapter_ids"])
        _, (truth, _), (ref, _) = _references("mov", mov_kw, ())
        try:
            out, _, _ = _run("mov", mov_kw, (), implementation)
        except Exception as e:  # noqa: BLE001 - as above
            return [*rows, _row(case, implementation, "mov output", None, error=f"{type(e).__name__}: {e}")]
        rows.append(_row(case, implementation, "mov output", check_rule(out, ref, truth, case.dtype)))
    return rows


def _row(case: Case, implementation: str, tensor: str, rule, error: str | None = None) -> dict:
    return dict(
        op=case.op,
        shape=case.shape_name,
        dtype=str(case.dtype).removeprefix("torch."),
        E=case.experts,
        variant=case.variant,
        implementation=implementation,
        tensor=tensor,
        err=f"{rule.err:.3e}" if rule else error,
        ref_err=f"{rule.ref_err:.3e}" if rule else "",
        bound=f"{rule.bound:.3e}" if rule else "",
        ok=bool(rule and rule.ok),
    )


# --------------------------------------------------------------------------------------------------
# Timing: the pemoe bench harness on the same shapes
# --------------------------------------------------------------------------------------------------

#: Providers timed per op: the floor, pemoe's Triton kernels, the authors' einsum; PEFT at E = 1.
TIMED = {"linear", "pemoe-triton", "authors-einsum"}
PEFT = {"mov_linear": "peft-ia3", "mov_ffn": "peft-ia3", "molora_linear": "peft-lora"}


def run_timing(
    shapes: dict[str, dict[str, dict[str, int]]],
    experts: Sequence[int],
    device: torch.device,
    out_dir: pathlib.Path,
    log: Callable[[str], None] = print,
) -> tuple[pathlib.Path, list[str]]:
    """Time every op at every shape in bfloat16 (float32 on a CPU dry run) at the middle E, and at E = 1 with
    PEFT; returns (the CSV, the skip notes)."""
    from pemoe.bench import harness

    settings = harness.Settings(warmup=3, reps=5, min_rounds=3, max_rounds=10, budget_s=3.0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sink = harness.CsvSink(out_dir / "results.csv")
    notes: list[str] = []
    mid = experts[len(experts) // 2]
    try:
        for shape_name, per_op in shapes.items():
            for op in OPS:
                bench = _bench_module(op).BENCH
                for e, wanted in ((mid, TIMED), (1, {"linear", "pemoe-triton", PEFT[op]})):
                    shape = dict(per_op[op], E=e)
                    if op == "molora_linear":
                        shape = {k: shape[k] for k in ("T", "K", "N", "E", "r")}
                    providers = []
                    for p in [bench.floor, *sorted(wanted - {bench.floor})]:
                        reason = harness.unavailable_reason(op, bench.providers[p], device)
                        reason = reason or harness.shape_skip_reason(bench.providers[p], shape)
                        if reason is None:
                            providers.append(p)
                        else:
                            notes.append(f"{op} {shape_name} E={e}: {p} not timed: {reason}")
                    log(f"timing {op} {shape_name} E={e}: {', '.join(providers)}")
                    harness.run_group(bench, providers, shape, dtype, device, ("fwd", "fwd_bwd"), settings, sink, log)
    finally:
        sink.close()
    return out_dir / "results.csv", notes


# --------------------------------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------------------------------


def run_jax(
    case_shapes: dict[str, dict[str, int]], experts: int, device: torch.device, dry_run: bool
) -> tuple[list[dict], list[str]]:
    """The JAX "pallas" and "triton" paths against the torch reference (same values): rows and skip notes."""
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np
    except ImportError as e:
        return [], [f"JAX not checked: {e}"]
    if jax.default_backend() != "gpu" and not dry_run:
        return [], [f"JAX not checked: its backend is {jax.default_backend()!r} (install jax[cuda12] for the GPU)"]
    if dry_run:
        os.environ.setdefault("PEMOE_PALLAS_INTERPRET", "1")
    from pemoe.jax import ops as jops
    from pemoe.testing import check_rule

    rows, notes = [], []
    for op in OPS:
        case = Case(op, "jax", case_shapes[op], torch.bfloat16, experts)
        kw, names = make_arguments(case, device)  # the torch reference runs where the tensors are
        grad_out, (truth, truth_grads), (ref, ref_grads) = _references(op, kw, names)

        def to_jax(t: torch.Tensor):
            return jnp.asarray(t.detach().float().cpu().numpy()).astype(_jax_dtype(t.dtype))

        arrays = {k: to_jax(v) for k, v in kw.items() if torch.is_tensor(v)}
        static = {k: v for k, v in kw.items() if not torch.is_tensor(v)}
        g = to_jax(grad_out.to(torch.bfloat16))
        for impl in ("pallas", "triton"):
            try:
                jops.resolve_implementation(op, impl)
            except (NotImplementedError, ValueError) as e:
                notes.append(f"JAX {op} {impl}: not checked: {e}")
                continue
            try:
                fn = jax.jit(
                    lambda a, impl=impl, op=op, static=static: getattr(jops, op)(**a, **static, implementation=impl)
                )
                y, vjp = jax.vjp(fn, {k: arrays[k] for k in arrays})
                (grads,) = vjp(g)
            except Exception as e:  # noqa: BLE001 - reported as a failed check with its error
                rows.append(_row(case, f"jax-{impl}", "all", None, error=f"{type(e).__name__}: {e}"))
                continue
            for tensor, got, want, eager in [("output", y, truth, ref)] + [
                (f"d{n}", grads[n], truth_grads[n], ref_grads[n]) for n in names
            ]:
                got_t = torch.from_numpy(np.array(jnp.asarray(got, jnp.float32)))
                rows.append(_row(case, f"jax-{impl}", tensor, check_rule(got_t, eager.cpu(), want.cpu(), case.dtype)))
    return rows, notes


def _jax_dtype(dtype: torch.dtype):
    import jax.numpy as jnp

    return {torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16}.get(dtype, jnp.float32)


# --------------------------------------------------------------------------------------------------
# Report and command line
# --------------------------------------------------------------------------------------------------


def _versions() -> str:
    import importlib.metadata as md

    found = []
    for name in ("torch", "triton", "jax", "jaxlib", "jax-triton", "transformers", "peft", "pemoe"):
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(found)


def write_report(
    out_dir: pathlib.Path, device_line: str, rows: list[dict], timing_csv: pathlib.Path | None, notes: list[str]
) -> pathlib.Path:
    """gpu_check.md: the verdicts (failures listed), the timing table and the notes."""
    from pemoe.bench import harness

    failed = [r for r in rows if not r["ok"]]
    lines = [
        "# pemoe GPU check",
        "",
        f"- Device: {device_line}",
        f"- Versions: {_versions()}; Python {platform.python_version()}",
        f"- Correctness: {len(rows) - len(failed)} of {len(rows)} comparisons within the tolerance rule "
        "(pemoe.testing: max|out − truth| ≤ 2·max|ref − truth| + atol·max(|truth|, 1))",
        "",
    ]
    if failed:
        lines += ["## Failures", "", "| case | implementation | tensor | err | bound |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['op']} {r['shape']} {r['dtype']} E={r['E']} {r['variant']} | {r['implementation']} | "
            f"{r['tensor']} | {r['err']} | {r['bound']} |"
            for r in failed
        ]
        lines.append("")
    by_case: dict[tuple, list[dict]] = {}
    for r in rows:
        by_case.setdefault((r["op"], r["shape"], r["dtype"], r["E"], r["variant"], r["implementation"]), []).append(r)
    lines += [
        "## Correctness",
        "",
        "| op | shape | dtype | E | routing | implementation | tensors ok | worst err / bound |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|")
    for key, rs in by_case.items():
        ratios = [float(r["err"]) / float(r["bound"]) for r in rs if r["bound"] not in ("", "nan")]
        worst = f"{max(ratios):.2f}" if ratios else "–"
        lines.append("| " + " | ".join(map(str, key)) + f" | {sum(r['ok'] for r in rs)}/{len(rs)} | {worst} |")
    if timing_csv is not None:
        lines += ["", "## Timing", "", harness.markdown_table(harness.read_csv(timing_csv))]
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    path = out_dir / "gpu_check.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pemoe.bench.gpu_check``: exit 0 when every comparison holds, 1 otherwise, 2 on bad use."""
    parser = argparse.ArgumentParser(prog="python -m pemoe.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("gpu-check"), help="output folder")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, wherever it runs (no GPU needed)")
    parser.add_argument("--skip-timing", action="store_true", help="correctness only")
    parser.add_argument("--skip-jax", action="store_true", help="no JAX checks")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device here; run it on a GPU machine, or with --dry-run", file=sys.stderr)
        return 2
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_check --dry-run without a GPU needs TRITON_INTERPRET=1 set before Python starts", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    shapes, experts = (DRY_SHAPES, DRY_EXPERTS) if args.dry_run else (SHAPES, EXPERTS)
    args.out.mkdir(parents=True, exist_ok=True)
    from pemoe.bench import harness

    device_line = harness.device_description(device)
    print(f"gpu_check: {device_line}")
    start = time.perf_counter()
    rows: list[dict] = []
    for case in correctness_cases(shapes, experts):
        case_rows = check_case(case, device)
        rows += case_rows
        verdict = "ok" if all(r["ok"] for r in case_rows) else "FAILED"
        print(f"  {case.label}: {verdict} ({time.perf_counter() - start:.0f} s)")
    notes: list[str] = []
    if not args.skip_jax:
        jax_rows, jax_notes = run_jax(next(iter(shapes.values())), experts[len(experts) // 2], device, args.dry_run)
        rows += jax_rows
        notes += jax_notes
    with open(args.out / "gpu_check.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    timing_csv = None
    if not args.skip_timing:
        timing_csv, timing_notes = run_timing(shapes, experts, device, args.out)
        notes += timing_notes
    report = write_report(args.out, device_line, rows, timing_csv, notes)
    failed = sum(not r["ok"] for r in rows)
    print(
        f"gpu_check: {len(rows) - failed}/{len(rows)} comparisons ok in {time.perf_counter() - start:.0f} s; {report}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
