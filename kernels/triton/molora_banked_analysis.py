"""Analysis of the adapter-bank MoLoRA kernels (:mod:`.molora_banked`), off the runtime path: the ahead-of-time
compile cases (``aot_cases()``: every launch autotuning may choose, for :mod:`.aot`).

``python -m pemoe.kernels.triton.aot pemoe.kernels.triton.molora_banked_analysis`` prints the compile report.
"""

from __future__ import annotations

import os

import torch

from pemoe.kernels.triton.molora_banked import _launches, plan_segments, use_configs

#: T5-large attention projections (T = 2048 tokens over A = 4 adapters, K = N = 1024): LoRA (E = 1), the paper's
#: MoLoRA (E = 10, r = 4) and the widest supported adapters (E = 15, r = 16: 256 padded columns).
AOT_SHAPE = dict(T=2048, K=1024, N=1024, A=4)
AOT_ADAPTERS = ((1, 4), (10, 4), (15, 16))
AOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Row-tile heights the plan may pick, per activation dtype (float32: at most 32).
AOT_BLOCK_M = {torch.float16: (16, 32, 64), torch.bfloat16: (16, 32, 64), torch.float32: (16, 32)}


def _example_launches(dtype: torch.dtype, e: int, r: int, block_m: int, sentence: bool = False) -> list[tuple]:
    """(kernel, role, args, constexprs) of the shrink and the expand at AOT_SHAPE (tensors on the CPU)."""
    t, k, n, a = (AOT_SHAPE[key] for key in ("T", "K", "N", "A"))
    x = torch.empty((t, k), dtype=dtype)
    lora_a, lora_b = torch.empty((a, e, k, r)), torch.empty((a, e, r, n))
    router = None if e == 1 or sentence else torch.empty((a, k, e))
    probs = torch.empty((t, e)) if sentence else None
    out = torch.empty((t, n), dtype=dtype)
    with use_configs(block_m=block_m):
        plan = plan_segments(torch.arange(t) % a, a, dtype)
    launches = _launches(x, None, lora_a, lora_b, router, probs, 4.0, None, False, out, plan)
    return [(kernel, role, args, constexprs) for kernel, role, _, args, constexprs in launches]


def _named(kernel, args: tuple, constexprs: dict, config) -> dict:
    names = [n for n in kernel.fn.arg_names if n not in constexprs and n not in config.kwargs]
    return dict(zip(names, args, strict=True))


def aot_cases(selection: str | None = None) -> list:
    """Every configuration autotuning may choose for both kernels, fp16 / bf16 / fp32, every row-tile height
    the plan may pick, E·r from 4 to 240 (token routing; LoRA at E = 1) and sentence routing at E = 10.

    ``selection`` (or ``$PEMOE_AOT_SELECTION``, which the tests set for the child process): "all" (default),
    "default" (default configurations only) or "smoke" (default configurations, bfloat16, E = 10, r = 4, the
    smallest and largest row tiles: the quick check of the default test run).
    """
    from pemoe.kernels.triton.aot import AotCase

    selection = selection or os.environ.get("PEMOE_AOT_SELECTION", "all")
    if selection not in ("all", "default", "smoke"):
        raise ValueError(f"aot_cases: selection must be 'all', 'default' or 'smoke', got {selection!r}")
    name_of = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    variants = [(e, r, False) for e, r in AOT_ADAPTERS] + [(10, 4, True)]
    dtypes = AOT_DTYPES
    if selection == "smoke":
        variants, dtypes = [(10, 4, False)], (torch.bfloat16,)
    cases = []
    for dtype in dtypes:
        block_ms = AOT_BLOCK_M[dtype]
        for block_m in (block_ms[0], block_ms[-1]) if selection == "smoke" else block_ms:
            for e, r, sentence in variants:
                label = f"{name_of[dtype]} E={e} r={r}{' sentence' if sentence else ''} M{block_m}"
                for kernel, role, args, cx in _example_launches(dtype, e, r, block_m, sentence):
                    named = _named(kernel, args, cx, kernel.configs[0])
                    configs = kernel.early_config_prune(kernel.configs, named, **cx)
                    for i, config in enumerate(configs):
                        if i > 0 and selection != "all":
                            continue
                        blocks = "x".join(f"{key[6:]}{v}" for key, v in config.kwargs.items())
                        cases.append(
                            AotCase(
                                name=f"{label} {role} {blocks} w{config.num_warps}s{config.num_stages}",
                                kernel=kernel,
                                args=named,
                                constexprs={**cx, **config.kwargs},
                                num_warps=config.num_warps,
                                num_stages=config.num_stages,
                                default=i == 0,
                            )
                        )
    return cases
