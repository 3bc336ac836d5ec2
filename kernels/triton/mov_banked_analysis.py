"""Ahead-of-time compile cases of the adapter-bank MoV kernels (:mod:`.mov_banked`), off the runtime path:
``aot_cases()`` lists launches autotuning may choose at representative shapes, for :mod:`.aot`.

``python -m pemoe.kernels.triton.aot pemoe.kernels.triton.mov_banked_analysis`` prints the compile report.
"""

from __future__ import annotations

import torch
import triton

from pemoe.kernels.triton.mov_banked import (
    ROUTING_NONE,
    ROUTING_SENTENCE,
    ROUTING_TOKEN,
    SCALE_CONFIGS,
    UP_CONFIGS,
    ffn_candidates,
    mov_banked_kernel,
    mov_candidates,
    mov_ffn_banked_scale_kernel,
    mov_ffn_banked_up_kernel,
    up_f_chunk,
)

#: mov / mov_linear shapes: (name, T, K, G, D, E, routing, top_k, renormalize, A). T5-large k/v with a bank of
#: 32 adapters (E = 10; its (IA)3; top-2 renormalised; sentence routing; E = 60), a D = 128 site, decode-sized T.
AOT_SHAPES = (
    ("t5-large E=10", 2048, 1024, 16, 64, 10, "token", 0, False, 32),
    ("t5-large ia3", 2048, 1024, 16, 64, 1, "none", 0, False, 32),
    ("t5-large E=10 top2r", 2048, 1024, 16, 64, 10, "token", 2, True, 32),
    ("t5-large E=10 sent", 2048, 1024, 16, 64, 10, "sentence", 0, False, 32),
    ("t5-large E=60", 2048, 1024, 16, 64, 60, "token", 0, False, 32),
    ("d128 E=10", 2048, 4096, 32, 128, 10, "token", 0, False, 32),
    ("decode E=10", 32, 1024, 16, 64, 10, "token", 0, False, 32),
)
#: FFN shapes: (name, T, M, F, E, routing, top_k, renormalize, A, gated).
FFN_SHAPES = (
    ("t5-large ffn E=10", 2048, 1024, 2816, 10, "token", 0, False, 32, True),
    ("t5-large ffn ia3", 2048, 1024, 2816, 1, "none", 0, False, 32, True),
    ("t5-large ffn E=10 sent", 2048, 1024, 2816, 10, "sentence", 0, False, 32, True),
    ("t5-large ffn E=60", 2048, 1024, 2816, 60, "token", 0, False, 32, True),
    ("decode ffn E=10", 32, 1024, 2816, 10, "token", 0, False, 32, True),
)
MODES = {"none": ROUTING_NONE, "token": ROUTING_TOKEN, "sentence": ROUTING_SENTENCE}
DEFAULT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _tiles(c: triton.Config, keys: tuple[str, ...]) -> str:
    return "x".join(str(c.kwargs[k]) for k in keys)


#: Default configurations that spill, with the reason (the AOT tests require exactly these): float32 activations
#: with E > 16 on sm_90, where the loop over a tile's adapters keeps two "ieee" (FMA) dots with K = BLOCK_E = 64
#: live at 255 registers and ptxas spills 8 bytes at every 16-row tile and warp count tried (float32 is the
#: correctness path; the 16-bit paths are spill-free).
KNOWN_SPILLS = {("mov_linear t5-large E=60 float32", 90)}


def aot_cases(
    dtypes: tuple[torch.dtype, ...] = DEFAULT_DTYPES,
    all_configs: bool = False,
    shapes: tuple = AOT_SHAPES,
    ffn_shapes: tuple = FFN_SHAPES,
) -> list:
    """The default configuration (``all_configs``: every legal one) of each kernel at each shape and dtype:
    mov_linear (the GEMM with the bank epilogue) and mov (no GEMM) from ``shapes``, the FFN's up and scaling
    kernels from ``ffn_shapes``. Case names are "<kernel use> <shape> <dtype> <tiles>"."""
    from pemoe.kernels.triton.aot import AotCase

    cases = []
    for dtype in dtypes:
        dt = str(dtype).removeprefix("torch.")
        fp32 = dtype == torch.float32
        for label, T, K, G, D, E, routing_name, top_k, renorm, A in shapes:
            mode, N = MODES[routing_name], G * D
            block_e, m_bucket = max(16, triton.next_power_of_2(E)), max(16, triton.next_power_of_2(T))
            for linear in (True, False):
                k = K if linear else N
                args = dict(
                    x_ptr=torch.empty(T, k, dtype=dtype), w_ptr=torch.empty(N, k, dtype=dtype), bias_ptr=None,
                    router_ptr=torch.empty(A, D, E) if mode == ROUTING_TOKEN else None,
                    experts_ptr=torch.empty(A, G, E, D),
                    probs_ptr=torch.empty(T, E) if mode == ROUTING_SENTENCE else None,
                    ids_ptr=torch.empty(T, dtype=torch.int32), rows_ptr=torch.empty(T, dtype=torch.int64),
                    y_ptr=torch.empty(T, N, dtype=dtype), T=T, N=N, K=k, G=G, E=E, A=A, M_BUCKET=m_bucket,
                    stride_xm=k, stride_xk=1, stride_wn=k, stride_wk=1,
                )  # fmt: skip
                constexprs = dict(
                    LINEAR=linear, HAS_BIAS=False, ROUTING=mode, TOP_K=top_k, RENORMALIZE=renorm,
                    MAIN_PRECISION="ieee" if fp32 else "tf32", EPILOGUE_PRECISION="ieee", HEAD_DIM=D, BLOCK_E=block_e,
                )  # fmt: skip
                legal = mov_candidates(D, block_e, m_bucket, dtype.itemsize, mode)
                for i, c in enumerate(legal if all_configs else legal[:1]):
                    op = "mov_linear" if linear else "mov"
                    name = f"{op} {label} {dt} {_tiles(c, ('BLOCK_M', 'BLOCK_N', 'BLOCK_K'))}"
                    cases.append(
                        AotCase(name, mov_banked_kernel, args, constexprs | c.kwargs, c.num_warps, c.num_stages, i == 0)
                    )
        for label, T, M, F, E, routing_name, top_k, renorm, A, gated in ffn_shapes:
            mode = MODES[routing_name]
            block_e, t_bucket = max(16, triton.next_power_of_2(E)), max(16, triton.next_power_of_2(T))
            ids = dict(ids_ptr=torch.empty(T, dtype=torch.int32), rows_ptr=torch.empty(T, dtype=torch.int64))
            up_legal = ffn_candidates(UP_CONFIGS, T, F, M, dtype.itemsize, block_e)
            chunk = up_f_chunk(T, F, E, dtype)  # the launch plan's F chunk: one logit partial slot each
            slots = triton.cdiv(F, chunk)
            parts = torch.empty(slots, T, E) if mode == ROUTING_TOKEN else None
            for i, c in enumerate(up_legal if all_configs else up_legal[:1]):
                args = dict(
                    x_ptr=torch.empty(T, M, dtype=dtype), wi_0_ptr=torch.empty(F, M, dtype=dtype),
                    wi_1_ptr=torch.empty(F, M, dtype=dtype),
                    router_ptr=torch.empty(A, F, E) if mode == ROUTING_TOKEN else None,
                    **ids, u_ptr=torch.empty(T, F, dtype=dtype), logits_part_ptr=parts,
                    T=T, M=M, F=F, E=E, A=A, T_BUCKET=t_bucket, F_CHUNK=chunk,
                    stride_xt=M, stride_xm=1, stride_w0f=M, stride_w0m=1, stride_w1f=M, stride_w1m=1, stride_lj=T * E,
                )  # fmt: skip
                constexprs = dict(
                    ACTIVATION="gelu_new", GATED=gated, ROUTE_LOGITS=mode == ROUTING_TOKEN,
                    MAIN_PRECISION="ieee" if fp32 else "tf32", EPILOGUE_PRECISION="ieee", BLOCK_E=block_e,
                )  # fmt: skip
                name = f"ffn up {label} {dt} {_tiles(c, ('BLOCK_M', 'BLOCK_F', 'BLOCK_K'))}"
                cases.append(
                    AotCase(
                        name, mov_ffn_banked_up_kernel, args, constexprs | c.kwargs, c.num_warps, c.num_stages, i == 0
                    )
                )
            scale_legal = ffn_candidates(SCALE_CONFIGS, T, F, None, dtype.itemsize, block_e)
            for i, c in enumerate(scale_legal if all_configs else scale_legal[:1]):
                args = dict(
                    logits_part_ptr=parts, probs_ptr=torch.empty(T, E) if mode == ROUTING_SENTENCE else None,
                    experts_ptr=torch.empty(A, 1, E, F), **ids, u_ptr=torch.empty(T, F, dtype=dtype),
                    T=T, M=M, F=F, E=E, A=A, T_BUCKET=t_bucket, F_SLOTS=slots, stride_lj=T * E,
                )  # fmt: skip
                constexprs = dict(
                    ROUTING=mode, TOP_K=top_k, RENORMALIZE=renorm, EPILOGUE_PRECISION="ieee", BLOCK_E=block_e
                )
                name = f"ffn scale {label} {dt} {_tiles(c, ('BLOCK_M', 'BLOCK_F'))}"
                cases.append(
                    AotCase(
                        name,
                        mov_ffn_banked_scale_kernel,
                        args,
                        constexprs | c.kwargs,
                        c.num_warps,
                        c.num_stages,
                        i == 0,
                    )
                )
    return cases
