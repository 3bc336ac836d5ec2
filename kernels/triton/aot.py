"""Ahead-of-time compiles of pemoe's Triton kernels for NVIDIA targets, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the whole compiler
(TTIR → TTGIR → LLVM → PTX → cubin with the bundled ptxas) on a machine with no GPU. To compile
the code a GPU would really run, the signature, constants and ``tt.divisibility`` hints are
derived from example arguments by Triton's own ``native_specialize_impl`` — the function the JIT
calls at launch: pointers 16-byte aligned and integers divisible by 16 get divisibility 16, an
integer equal to 1 (a unit stride) becomes the constant 1. Registers and spills come from the
bundled ``cuobjdump --dump-resource-usage``: ptxas puts register spills in the per-thread stack frame
(``STACK``), older toolchains in ``LOCAL``; our kernels keep no local arrays, so ``spill_bytes`` is
``STACK + LOCAL`` — any non-zero value is a spill.

Each kernel module lists what autotuning may launch in an ``aot_cases()`` function returning
:class:`AotCase` objects. Compiling needs real ``triton.jit`` functions, so it cannot run in a
process started with ``TRITON_INTERPRET=1``; :func:`compile_module_in_subprocess` runs
``python -m pemoe.kernels.triton.aot MODULE`` in a child process without it and returns its
reports (this is what the tests use).

    python -m pemoe.kernels.triton.aot pemoe.kernels.triton.mov_linear --capability 80 90
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from pemoe.kernels.triton.interpreter import INTERPRET

CAPABILITIES = (80, 90)


@dataclass(frozen=True)
class AotCase:
    """One launch autotuning may choose: a kernel, example arguments, constants and launch options.

    ``args`` maps every non-constexpr parameter name to an example value (tensors may live on the
    CPU; only dtype and alignment matter); ``constexprs`` maps the ``tl.constexpr`` parameters.
    ``default`` marks the configurations the kernel uses unless tuning picks another: those must
    not spill.
    """

    name: str
    kernel: Any
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    default: bool = False
    capabilities: tuple[int, ...] = CAPABILITIES


@dataclass
class CompileReport:
    name: str
    kernel: str
    capability: int
    default: bool
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # STACK + LOCAL bytes per thread (where ptxas spills registers)
    stack_bytes: int
    shared_bytes: int
    uses_wgmma: bool
    uses_mma: bool
    constexprs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _jit_function(kernel):
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"{kernel!r} is not a triton.jit function (is TRITON_INTERPRET=1 set?)")
    return kernel


def specialize(kernel, args: dict[str, Any], constexprs: dict[str, Any]):
    """(signature, constexprs, attrs) exactly as the JIT would specialise a launch with ``args``."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = _jit_function(kernel)
    signature: dict[str, str] = {}
    constants: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    missing = [n for n in fn.arg_names if n not in args and n not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no example value for {missing}")
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constants[name] = constexprs[name]
            continue
        value = args[name]
        ty, key = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize, True)
        signature[name] = ty
        if ty == "constexpr":  # an integer equal to 1, or None
            constants[name] = key
        elif isinstance(key, str):
            hints = BaseBackend.parse_attr(key)
            if hints:
                attrs[(i,)] = hints
    return signature, constants, attrs


def _resource_usage(cubin: bytes, kernel_name: str) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the kernel's own ``Function`` block in cuobjdump's report (a cubin
    may hold more than one function; the first block is not necessarily the kernel)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    blocks = dict(re.findall(r"Function ([^:\s]+):\s*\n\s*([^\n]*)", out.stdout))
    line = blocks.get(kernel_name)
    if line is None:
        raise RuntimeError(f"cuobjdump reported no function {kernel_name!r}: {sorted(blocks)}")
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", line)
        usage[key] = int(m.group(1)) if m else -1
    return usage


def compile_case(case: AotCase, capability: int) -> CompileReport:
    """Compiles one case for sm_<capability> and reports registers, spills and the MMA flavour."""
    if INTERPRET:
        raise RuntimeError("AOT compiles need real triton.jit functions: run without TRITON_INTERPRET=1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(case.kernel)
    report = dict(
        name=case.name,
        kernel=fn.__name__,
        capability=capability,
        default=case.default,
        num_warps=case.num_warps,
        num_stages=case.num_stages,
        constexprs={k: v for k, v in case.constexprs.items() if isinstance(v, (int, float, bool, str))},
    )
    try:
        signature, constants, attrs = specialize(fn, case.args, case.constexprs)
        src = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": case.num_warps, "num_stages": case.num_stages},
        )
    except Exception as exc:  # reported, and the tests fail on it
        return CompileReport(
            **report,
            registers=-1,
            spill_bytes=-1,
            stack_bytes=-1,
            shared_bytes=-1,
            uses_wgmma=False,
            uses_mma=False,
            error=f"{type(exc).__name__}: {exc}"[:2000],
        )
    usage = _resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    ptx = compiled.asm["ptx"]
    return CompileReport(
        **report,
        registers=usage["REG"],
        spill_bytes=usage["STACK"] + usage["LOCAL"],
        stack_bytes=usage["STACK"],
        shared_bytes=int(compiled.metadata.shared),
        uses_wgmma="wgmma.mma_async" in ptx,
        uses_mma="mma.sync" in ptx or "wgmma.mma_async" in ptx,
    )


def compile_module(module: str, capabilities: tuple[int, ...] = CAPABILITIES) -> list[CompileReport]:
    cases = importlib.import_module(module).aot_cases()
    return [compile_case(c, cc) for c in cases for cc in capabilities if cc in c.capabilities]


def compile_module_in_subprocess(module: str, capabilities: tuple[int, ...] = CAPABILITIES) -> list[CompileReport]:
    """Runs :func:`compile_module` in a child process without ``TRITON_INTERPRET`` and returns its reports."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "pemoe.kernels.triton.aot", module, "--json", "--capability", *map(str, capabilities)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    return [CompileReport(**r) for r in json.loads(out.stdout)]


def format_reports(reports: list[CompileReport]) -> str:
    lines = [
        f"{'kernel':<28} {'config':<40} {'sm':>3} {'warps':>5} {'stages':>6} {'regs':>4} {'spill':>5} "
        f"{'smem KiB':>8} {'mma':>6}"
    ]
    for r in reports:
        mma = "wgmma" if r.uses_wgmma else ("mma" if r.uses_mma else "-")
        if r.error:
            lines.append(f"{r.kernel:<28} {r.name:<40} {r.capability:>3} ERROR {r.error.splitlines()[0][:80]}")
            continue
        lines.append(
            f"{r.kernel:<28} {r.name:<40} {r.capability:>3} {r.num_warps:>5} {r.num_stages:>6} {r.registers:>4} "
            f"{r.spill_bytes:>5} {r.shared_bytes / 1024:>8.1f} {mma:>6}" + ("  (default)" if r.default else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pemoe.kernels.triton.aot", description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="+", help="kernel modules with an aot_cases() function")
    parser.add_argument("--capability", type=int, nargs="+", default=list(CAPABILITIES))
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    reports = [r for m in args.modules for r in compile_module(m, tuple(args.capability))]
    print(json.dumps([asdict(r) for r in reports]) if args.json else format_reports(reports))
    # With --json the errors travel inside the reports (the caller decides); otherwise fail loudly.
    return 1 if any(r.error for r in reports) and not args.json else 0


if __name__ == "__main__":
    sys.exit(main())
