"""``implementation="triton"``: pemoe's Triton kernels (``pemoe.kernels.triton``) called from JAX on GPU
through jax-triton, so GPU users of JAX run the very kernels the PyTorch side runs.

``mov_linear`` (SPEC §3.1): y = mov(x Wᵀ + b), x [T, K], weight [N, K] (frozen), router [D, E] float32
(None: (IA)3), experts [G, E, D] float32, probs [T, E] float32 (sentence routing) -> y [T, N] in x's dtype.
  forward:  ``mov_linear_fwd_kernel`` (one GEMM, MoV epilogue); under differentiation it also writes
            p_soft [T, G, E] float32, the only residual besides the op's inputs (h is recomputed);
  backward: h = x Wᵀ + b by XLA's GEMM (in x's dtype; or recomputed per tile when the plan's
            ``h_from_gemm`` is off), ``mov_linear_bwd_kernel`` (writes dh and per-chunk partial sums of
            d experts, d router / d probs), then XLA finishes: the partial sums, dx = dh·W, d bias = Σ_t dh
            and, for completeness, the frozen weight's cotangent dhᵀ·x (dead code under ``jax.jit`` when
            nothing asks for it, the usual case: only adapters train).

One launch plan for both frameworks: each kernel module (``kernels/triton/mov_linear.py``, ``mov_ffn.py``,
``molora_linear.py``) describes its launches from shapes, dtype names, strides and routing flags alone
(:mod:`pemoe.kernels.triton.plan`: grids, buffer shapes and dtypes, runtime scalars, constexprs, the legal tile
configurations, which kernel), and both the PyTorch launcher and this module consume those descriptions; nothing
here imports torch on the jax-triton path. For ``mov_linear`` that is ``plan_problem``, ``default_config``, the
grids, the feature constexprs and ``backward_outputs``; for ``mov_ffn`` ``plan_problem`` and the per-kernel
``up_launch`` / ``down_launch`` / ``down_backward_launch`` / ``router_backward_launch`` / ``up_backward_launch``
(built one after another: (b) reads as many logit partials as (a)'s tile made); for ``molora_linear``
``plan_problem``, ``resolve_schedule``, ``forward_plan`` and ``backward_plan`` (whole :class:`Plan` s).
jax-triton passes the array inputs in order and then one pointer per output; the kernels' parameters start
with exactly that (inputs, then outputs), so the ``triton.jit`` functions themselves are called, no wrapper.
Every size and stride after them is passed as a compile-time constant (jax-triton specialises any keyword it is
given): JAX shapes are static and each shape is compiled when JAX lowers it anyway, and constant sizes and
strides give Triton the alignment facts the PyTorch launch gets from specialising integers divisible by 16. A
pointer the plan leaves unnamed (an absent optional input, an output a feature flag turns off) gets a
one-element float32 placeholder array, as the PyTorch launcher passes a one-element float32 tensor.

``mov_ffn`` (SPEC §3.2): the T5 FFN with MoV on the activation, x [T, M] -> [T, M]: the forward kernels
(a) dual GEMM + router-logit partials and (b) wo GEMM with softmax and merge as its prologue (saving u [T, F]
and p_soft [T, E]); the backward kernels (c), (r), (d) of ``kernels/triton/mov_ffn.py``, then XLA for the
partial sums and dx = dh0·wi_0 + dg·wi_1 (and the frozen weights' cotangents, dead code under jit). Tiles: each
launch's default (the first legal configuration).

``molora_linear`` (SPEC §3.3): y = x Wᵀ + b + scale·Σ_e p_e (x A_e) B_e, x [T, K], weight [N, K] (frozen),
bias [N], lora_a [E, K, r], lora_b [E, r, N], router [K, E] (None: LoRA), probs [T, E] (sentence routing)
-> y [T, N] in x's dtype; adapters and probs are used in float32.
  forward:  either schedule of ``kernels/triton/molora_linear.py``, chosen as the torch launcher chooses
            (``resolve_schedule``: a ``use_schedule`` context, ``schedule=``, else ``choose_schedule``'s
            H100 model — two kernels at T5 shapes, one for plain LoRA): "two_kernel" = shrink (U′, U, p_soft)
            then the base GEMM over the extended K; "fused" = one kernel. Under differentiation it saves U
            [T, E·r] and p_soft [T, E] float32 (the residuals besides the inputs);
  backward: grad_u (dU, U′, dlogits or d probs), the dx GEMM (dy·W + dU·A_catᵀ + dlogits·routerᵀ) and the two
            weight-gradient launches (per-chunk partial sums of d lora_a, d router, d lora_b, d bias), then
            XLA adds the chunks (deterministic, no atomics) and forms the frozen weight's cotangent dyᵀ·x
            (dead code under ``jax.jit`` when nothing asks for it).
Tiles: ``Launch.configs`` (the pruned list, as the AOT cases see it; a ``use_configs`` tile when forced), the
first by default, all of them with ``configs="all"``.

Tile configuration: the default of each kernel (the first legal entry of its configuration list, the one
the AOT reports hold to zero spills); for ``mov_linear`` and ``molora_linear``, ``configs="all"`` (or
:func:`tile_configs`) emits every legal configuration and lets jax-triton's autotuned kernel call pick on the
GPU at the first run. ``python -m pemoe.jax.triton_export`` (:mod:`pemoe.jax.triton_export`) exports the
training step of every ``EXPORT_PROBLEMS`` entry (the three ops; molora_linear at T5-large attention shape,
LoRA / E = 10 r = 4 / E = 15 r = 16, each schedule, top-k and sentence routing) and reports registers and
spills per kernel: zero spills for every 16-bit default; float32 molora's fused forward at E = 10 spills 8
(sm_80) / 16 (sm_90) bytes.

Where it runs (``pemoe.jax.ops.resolve_implementation`` enforces it, nothing falls back):
  * the "gpu" JAX backend (CUDA), jax-triton compiling for the device's compute capability;
  * any backend inside :func:`cuda_target` (or with ``$PEMOE_TRITON_CAPABILITY`` set) — ahead-of-time
    lowering (``jax.export(..., platforms=["cuda"])``) for a stated compute capability without a GPU;
  * the Triton interpreter when ``TRITON_INTERPRET=1`` (the development machines): the same kernels
    with the same launch plans run on the CPU through ``jax.pure_callback`` (torch tensors in and out: the
    interpreter runs on torch CPU tensors, so this development path alone imports torch), so outputs and
    gradients are tested here; outputs that the kernel must write are NaN-filled first.
Elsewhere asking for it raises ``NotImplementedError``.

Install: ``pip install "pemoe[jax-gpu]"`` on a GPU machine (jax[cuda12] and jax-triton). For ahead-of-time
export only, jax-triton and the ``jax-cuda12-plugin`` wheel matching jaxlib (without its PJRT runtime and
CUDA libraries) suffice: ``scripts/setup.sh`` installs those into ``.venv/cuda-export`` (outside
site-packages, since the plugin logs "Could not find cuda drivers" at every ``import jax`` on a machine
without a GPU), so run the export CLI as ``PYTHONPATH=.venv/cuda-export .venv/bin/python -m pemoe.jax.triton_export``
(the tests put that folder on the path themselves). jax-triton hands the PTX to the CUDA driver,
which assembles it at load time: with Triton 3.9 the PTX is ISA 8.8 for sm_80 (its CUDA 12.9 ptxas) and ISA
9.4 for sm_90 (its CUDA 13.4 ``ptxas-blackwell``), so the driver must know that ISA; pointing
``TRITON_PTXAS_BLACKWELL_PATH`` at an older ptxas lowers the ISA Triton targets. (Not tried on a GPU.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import triton

from pemoe.kernels.triton import interpreter
from pemoe.kernels.triton import molora_linear as ml_lora
from pemoe.kernels.triton import mov_ffn as mf
from pemoe.kernels.triton import mov_linear as ml
from pemoe.kernels.triton import plan as kplan

__all__ = [
    "CAPABILITY_ENV",
    "cuda_target",
    "tile_configs",
    "target_capability",
    "runnable",
    "mov_linear",
    "mov_ffn",
    "molora_linear",
]

#: Environment variable naming the compute capability (e.g. 90) to compile for when no GPU is present.
CAPABILITY_ENV = "PEMOE_TRITON_CAPABILITY"

# ------------------------------------------------------------------------------------------
# Where the kernels run; the compute capability to compile for
# ------------------------------------------------------------------------------------------

_target: list[int] = []  # stack of cuda_target() capabilities


@contextlib.contextmanager
def cuda_target(capability: int) -> Iterator[None]:
    """Lower ``implementation="triton"`` for sm_<capability> (e.g. 80, 90) on any machine, GPU or not:
    for ahead-of-time ``jax.export(..., platforms=["cuda"])``. jax-triton compiles the kernels to PTX at
    lowering time and would otherwise read the capability from GPU 0."""
    if isinstance(capability, bool) or not isinstance(capability, int) or capability < 70:
        raise ValueError(f"capability must be an int such as 80 or 90 (sm_80, sm_90), got {capability!r}")
    _target.append(capability)
    try:
        yield
    finally:
        _target.pop()


_configs_choice: list[str] = []  # stack of tile_configs() choices


@contextlib.contextmanager
def tile_configs(choice: str) -> Iterator[None]:
    """Tile configurations of the kernels traced inside (through ``pemoe.jax`` ops): "default" (the
    AOT-checked default of each kernel) or "all" (every legal configuration, autotuned by jax-triton on the
    GPU at the first run; each is compiled when the op is lowered)."""
    if choice not in ("default", "all"):
        raise ValueError(f"tile configurations must be 'default' or 'all', got {choice!r}")
    _configs_choice.append(choice)
    try:
        yield
    finally:
        _configs_choice.pop()


def target_capability() -> int | None:
    """The capability to compile for: the innermost :func:`cuda_target`, else ``$PEMOE_TRITON_CAPABILITY``,
    else None (jax-triton asks GPU 0)."""
    if _target:
        return _target[-1]
    value = os.environ.get(CAPABILITY_ENV)
    if value:
        if not value.isdigit():
            raise ValueError(f"{CAPABILITY_ENV} must be an integer such as 90, got {value!r}")
        return int(value)
    return None


def runnable(backend: str) -> str | None:
    """None when ``implementation="triton"`` can run (or be lowered) with JAX backend ``backend``; else why not.

    The Triton interpreter stand-in (``TRITON_INTERPRET=1``, off the GPU) runs the kernels on torch CPU tensors,
    so it alone needs torch: without torch it is refused here, rather than failing inside the first callback."""
    if backend == "gpu" or target_capability() is not None:
        return None
    if interpreter.INTERPRET:
        try:
            import torch  # noqa: F401
        except ImportError:
            return (
                "implementation='triton' runs in the Triton interpreter (TRITON_INTERPRET=1) on torch CPU tensors, "
                "and torch is not installed; the 'gpu' backend and pemoe.jax.triton.cuda_target(capability) do "
                "not need it"
            )
        return None
    return (
        f"implementation='triton' runs on the 'gpu' backend (CUDA, through jax-triton), got backend {backend!r}; "
        f"inside pemoe.jax.triton.cuda_target(capability) (or with ${CAPABILITY_ENV} set) it lowers for a GPU "
        "without one (jax.export), and with TRITON_INTERPRET=1 it runs in the Triton interpreter"
    )


# ------------------------------------------------------------------------------------------
# One kernel launch: what jax-triton needs, and the interpreter stand-in
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch of a kernel: arrays in (positional), outputs (shapes, zero-filled ones), grid and
    constexprs — exactly what ``jax_triton.triton_call`` takes, and what the interpreter stand-in runs."""

    kernel: Any
    name: str
    out_shapes: tuple[jax.ShapeDtypeStruct, ...]
    zeroed_outputs: tuple[int, ...]
    constexprs: dict[str, Any]
    configs: tuple[triton.Config, ...]  # one: that configuration; more: autotuned by jax-triton on the GPU
    grid_fn: Any  # meta (the configuration's kwargs) -> grid

    def grid(self, config: triton.Config) -> tuple[int, ...]:
        return self.grid_fn(config.kwargs)


def _import_jax_triton():
    """jax_triton, imported once; it sets TRITON_CACHE_DIR to "" at import, which is undone here."""
    cache = os.environ.get("TRITON_CACHE_DIR")
    try:
        import jax_triton
    except ImportError as e:  # no fallback: say what is missing
        raise ImportError(
            "implementation='triton' in pemoe.jax needs jax-triton and the CUDA plugin of jaxlib: "
            'pip install "pemoe[jax-gpu]" (or jax-triton plus jax-cuda12-plugin matching jaxlib for export only); '
            f"import failed: {e}"
        ) from e
    finally:
        if cache is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = cache
    return jax_triton


def _autotuned(launch: Launch):
    """The kernel under triton.autotune with the launch's configurations (jax-triton compiles each and
    benchmarks them on the GPU at the first call)."""
    return triton.autotune(configs=list(launch.configs), key=[])(launch.kernel)


def _call(launch: Launch, *inputs: jax.Array) -> list[jax.Array]:
    if interpreter.INTERPRET and target_capability() is None:
        return jax.pure_callback(partial(_interpret, launch), list(launch.out_shapes), *inputs)
    jt = _import_jax_triton()
    if len(launch.configs) == 1:
        (config,) = launch.configs
        kernel, tiles, grid = launch.kernel, config.kwargs, launch.grid(config)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    else:  # autotuned: the grid is a function of each configuration's tiles
        kernel, tiles, grid, options = _autotuned(launch), {}, launch.grid_fn, {}
    return jt.triton_call(
        *inputs,
        kernel=kernel,
        out_shape=list(launch.out_shapes),
        grid=grid,
        name=launch.name,
        compute_capability=target_capability(),
        zeroed_outputs=launch.zeroed_outputs,
        **options,
        **launch.constexprs,
        **tiles,
    )


def _to_torch(a: np.ndarray):
    import torch

    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def _to_numpy(t, dtype) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy().astype(dtype, copy=False)


def _interpret(launch: Launch, *inputs: np.ndarray) -> list[np.ndarray]:
    """Runs the launch in the Triton interpreter on torch CPU tensors (TRITON_INTERPRET=1; the one part of the JAX
    Triton path that imports torch, which :func:`runnable` checks first): the default
    configuration, outputs NaN-filled (zero-filled where the launch says so) so an unwritten output shows."""
    import torch

    ins = [_to_torch(a) for a in inputs]
    outs = []
    for i, s in enumerate(launch.out_shapes):
        dtype = _to_torch(np.zeros((), s.dtype)).dtype
        fill = 0 if i in launch.zeroed_outputs or not dtype.is_floating_point else float("nan")
        outs.append(torch.full(s.shape, fill, dtype=dtype))
    config = launch.configs[0]
    launch.kernel[launch.grid(config)](*ins, *outs, **launch.constexprs, **config.kwargs)
    return [_to_numpy(t, s.dtype) for t, s in zip(outs, launch.out_shapes, strict=True)]


# ------------------------------------------------------------------------------------------
# mov_linear: launch plans (shared with the torch launchers) and custom_vjp
# ------------------------------------------------------------------------------------------

_PLACEHOLDER = jax.ShapeDtypeStruct((1,), jnp.float32)


def _placeholder(dtype=jnp.float32) -> jax.Array:
    return jnp.zeros((1,), dtype)


def _problem(x, weight, router, experts, probs, top_k, renormalize) -> ml.Problem:
    if x.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32):
        raise NotImplementedError(
            f"mov_linear (triton): supports float16, bfloat16 and float32 activations, got {x.dtype}"
        )
    return ml.plan_problem(
        x.shape[0],
        x.shape[1],
        weight.shape[0],
        tuple(experts.shape),
        router_shape=None if router is None else tuple(router.shape),
        probs_shape=None if probs is None else tuple(probs.shape),
        top_k=top_k,
        renormalize=renormalize,
        itemsize=jnp.dtype(x.dtype).itemsize,
    )


def _configs(pb: ml.Problem, backward: bool, configs: str) -> tuple[triton.Config, ...]:
    if configs == "default":
        return (ml.default_config(pb, backward),)
    table = ml.BACKWARD_CONFIGS if backward else ml.FORWARD_CONFIGS
    h_read = backward and pb.h_from_gemm
    return tuple(ml.candidate_configs(table, pb.D, pb.block_e, pb.m_bucket, pb.itemsize, backward, pb.routing, h_read))


def _sizes(pb: ml.Problem) -> dict[str, int]:
    return dict(T=pb.T, N=pb.N, K=pb.K, G=pb.G, E=pb.E, M_BUCKET=pb.m_bucket)


def forward_launch(pb: ml.Problem, dtype, has_bias: bool, save_p_soft: bool, configs: str = "default") -> Launch:
    """The forward kernel's launch for problem ``pb`` with activations of ``dtype``: outputs y [T, N] and
    p_soft [T, G, E] float32 (a placeholder unless saved). x and W are row-major (JAX arrays)."""
    constexprs = _sizes(pb) | dict(stride_xm=pb.K, stride_xk=1, stride_wn=pb.K, stride_wk=1)
    constexprs |= dict(GROUP_ROWS=pb.group_rows) | ml.forward_constexprs(pb, has_bias, save_p_soft)
    p_soft = jax.ShapeDtypeStruct((pb.T, pb.G, pb.E), jnp.float32) if constexprs["SAVE_P_SOFT"] else _PLACEHOLDER
    return Launch(
        kernel=ml.mov_linear_fwd_kernel.fn,  # the @triton.jit function under the autotuner
        name="pemoe_mov_linear_fwd",
        out_shapes=(jax.ShapeDtypeStruct((pb.T, pb.N), dtype), p_soft),
        zeroed_outputs=(),
        constexprs=constexprs,
        configs=_configs(pb, False, configs),
        grid_fn=partial(ml.forward_grid, pb),
    )


def backward_launch(pb: ml.Problem, dtype, has_bias: bool, configs: str = "default") -> Launch:
    """The backward kernel's launch (every gradient needed): outputs as ``ml.backward_outputs`` lists them,
    placeholders for the ones this routing mode does not produce."""
    needs = (True, True, True)
    constexprs = _sizes(pb) | dict(stride_xm=pb.K, stride_xk=1, stride_wn=pb.K, stride_wk=1)
    constexprs |= dict(stride_dym=pb.N, stride_dyn=1) | ml.backward_constexprs(pb, has_bias, needs)
    out_shapes, zeroed = [], []
    for i, spec in enumerate(ml.backward_outputs(pb, needs).values()):
        if spec is None:
            out_shapes.append(_PLACEHOLDER)
            continue
        shape, kind, zero = spec
        out_shapes.append(jax.ShapeDtypeStruct(shape, dtype if kind == "act" else jnp.float32))
        if zero:
            zeroed.append(i)
    return Launch(
        kernel=ml.mov_linear_bwd_kernel.fn,
        name="pemoe_mov_linear_bwd",
        out_shapes=tuple(out_shapes),
        zeroed_outputs=tuple(zeroed),
        constexprs=constexprs,
        configs=_configs(pb, True, configs),
        grid_fn=partial(ml.backward_grid, pb),
    )


def _inputs(x, weight, bias, router, experts, probs) -> list[jax.Array]:
    """The kernels' array inputs in order; placeholders for the absent optional ones (never read)."""
    return [
        x,
        weight,
        _placeholder(x.dtype) if bias is None else bias,
        _placeholder() if router is None else router,
        experts,
        _placeholder() if probs is None else probs,
    ]


def _forward(x, weight, bias, router, experts, probs, top_k, renormalize, configs, save_p_soft):
    pb = _problem(x, weight, router, experts, probs, top_k, renormalize)
    launch = forward_launch(pb, x.dtype, bias is not None, save_p_soft, configs)
    if pb.T == 0:
        return jnp.zeros((0, pb.N), x.dtype), jnp.zeros((0, pb.G, pb.E), jnp.float32)
    y, p_soft = _call(launch, *_inputs(x, weight, bias, router, experts, probs))
    return y, p_soft


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _mov_linear(x, weight, bias, router, experts, probs, top_k, renormalize, configs):
    return _forward(x, weight, bias, router, experts, probs, top_k, renormalize, configs, False)[0]


def _mov_linear_fwd(x, weight, bias, router, experts, probs, top_k, renormalize, configs):
    y, p_soft = _forward(x, weight, bias, router, experts, probs, top_k, renormalize, configs, True)
    return y, (x, weight, bias, router, experts, probs, p_soft)


def _mov_linear_bwd(top_k, renormalize, configs, res, dy):
    x, weight, bias, router, experts, probs, p_soft = res
    pb = _problem(x, weight, router, experts, probs, top_k, renormalize)
    f32 = jnp.float32
    if pb.T == 0:
        dh = jnp.zeros((0, pb.N), x.dtype)
        d_experts = jnp.zeros(experts.shape, f32)
        d_router = None if router is None else jnp.zeros(router.shape, f32)
        d_probs = None if probs is None else jnp.zeros(probs.shape, f32)
    else:
        launch = backward_launch(pb, x.dtype, bias is not None, configs)
        p_soft_in = p_soft if pb.routing == ml.ROUTING_TOKEN else _placeholder()
        inputs = _inputs(x, weight, bias, router, experts, probs)
        h = _placeholder(x.dtype)
        if pb.h_from_gemm:  # the kernel reads h instead of recomputing it in its small tiles
            h = jnp.matmul(x, weight.T, preferred_element_type=f32, precision=jax.lax.Precision.HIGHEST)
            h = (h if bias is None else h + bias.astype(f32)).astype(x.dtype)
        dh, d_experts_part, d_router_part, d_probs_part = _call(launch, *inputs, p_soft_in, dy.astype(x.dtype), h)
        d_experts = d_experts_part.sum(0)
        d_router = d_router_part.sum((0, 1)) if router is not None and probs is None else None
        d_probs = d_probs_part.sum(0) if probs is not None else None
        if router is not None and probs is not None:  # sentence routing: the router is not used by the kernel
            d_router = jnp.zeros(router.shape, f32)
    dx = jnp.matmul(dh, weight, preferred_element_type=f32).astype(x.dtype)
    d_weight = jnp.matmul(dh.T, x, preferred_element_type=f32).astype(weight.dtype)  # frozen: DCE'd under jit
    d_bias = None if bias is None else dh.astype(f32).sum(0).astype(bias.dtype)
    return dx, d_weight, d_bias, d_router, d_experts.astype(experts.dtype), d_probs


_mov_linear.defvjp(_mov_linear_fwd, _mov_linear_bwd)


def mov_linear(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    router: jax.Array | None,
    experts: jax.Array,
    probs: jax.Array | None = None,
    *,
    top_k: int | None = None,
    renormalize: bool = False,
    configs: str | None = None,
) -> jax.Array:
    """y [T, N] = mov(x [T, K] · weight [N, K]ᵀ + bias) with the fused Triton kernels (differentiable).

    router [D, E] float32 (None: (IA)3), experts [G, E, D] float32, probs [T, E] float32 for sentence routing
    (its cotangent is returned; the router is then unused). ``configs``: "default" (the AOT-checked default
    tile of each kernel) or "all" (every legal configuration, autotuned by jax-triton on the GPU); None: the
    innermost :func:`tile_configs` choice, else "default". Kernel
    limits (D ∈ {16, 32, 64, 128}, E ≤ 64, float16/bfloat16/float32) raise NotImplementedError at trace time.
    """
    if configs is None:
        configs = _configs_choice[-1] if _configs_choice else "default"
    if configs not in ("default", "all"):
        raise ValueError(f"configs must be 'default' or 'all', got {configs!r}")
    return _mov_linear(x, weight, bias, router, experts, probs, top_k, renormalize, configs)


# ------------------------------------------------------------------------------------------
# mov_ffn: the shared launch plan (kernels/triton/mov_ffn.py), and custom_vjp
# ------------------------------------------------------------------------------------------


def _plan_launch(
    launch: kplan.Launch, buffers: dict[str, kplan.Buffer], arrays: dict[str, jax.Array | None], configs: str
) -> None:
    """Runs one planned launch on JAX arrays: its input pointers are ``arrays`` by name (a one-element
    placeholder where the plan names none), its outputs the plan's buffers (a placeholder for an unused output
    slot); the written buffers are added to ``arrays``. ``configs``: "default" (the launch's first legal tile)
    or "all" (every legal tile, autotuned by jax-triton)."""
    inputs = [_placeholder() if name is None else arrays[name] for name in launch.inputs]
    out_shapes = tuple(
        _PLACEHOLDER if name is None else jax.ShapeDtypeStruct(buffers[name].shape, jnp.dtype(buffers[name].dtype))
        for name in launch.outputs
    )
    zeroed = tuple(i for i, name in enumerate(launch.outputs) if name is not None and buffers[name].zeroed)
    outputs = _call(
        Launch(
            kernel=launch.fn,
            name=launch.name,
            out_shapes=out_shapes,
            zeroed_outputs=zeroed,
            constexprs=launch.scalars | launch.constexprs,
            configs=launch.configs if configs == "all" else launch.configs[:1],
            grid_fn=launch.grid,
        ),
        *inputs,
    )
    for name, out in zip(launch.outputs, outputs, strict=True):
        if name is not None:
            arrays[name] = out


def _ffn_problem(x, wi_0, wi_1, router, experts, probs, activation, top_k, renormalize) -> mf.Problem:
    (T, M), F, E = x.shape, wi_0.shape[0], experts.shape[1]
    return mf.plan_problem(
        T, M, F, E, jnp.dtype(x.dtype).name, gated=wi_1 is not None, has_router=router is not None,
        has_probs=probs is not None, activation=activation, top_k=top_k, renormalize=renormalize,
    )  # fmt: skip


def _ffn_forward(x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize, save_p_soft):
    """(a) then (b): y [T, M], u [T, F] (x's dtype), p_soft [T, E] float32 (a placeholder unless saved)."""
    pb = _ffn_problem(x, wi_0, wi_1, router, experts, probs, activation, top_k, renormalize)
    arrays = dict(x=x, wi_0=wi_0, wi_1=wi_1, wo=wo, router=router, experts=experts, probs=probs)
    buffers, up = mf.up_launch(pb)
    _plan_launch(up, buffers, arrays, "default")
    buffers, down = mf.down_launch(pb, save_p_soft)
    _plan_launch(down, buffers, arrays, "default")
    return arrays["y"], arrays["inter"], arrays.get("p_soft", _placeholder())


def _ffn_backward(dy, x, wi_0, wi_1, wo, router, experts, probs, inter, p_soft, activation, top_k, renormalize):
    """(c), (r), (d) and the dx GEMMs (XLA); every gradient the op's inputs have. Returns (dx, d router,
    d experts, d probs, dh0, dg) — dh0/dg [T, F] for the frozen weights' cotangents."""
    pb = _ffn_problem(x, wi_0, wi_1, router, experts, probs, activation, top_k, renormalize)
    self_routed, given = pb.mode == mf.ROUTE_SELF, pb.mode == mf.ROUTE_GIVEN
    arrays = dict(
        x=x, wi_0=wi_0, wi_1=wi_1, wo=wo, router=router, experts=experts, probs=probs, dy=dy.astype(x.dtype),
        inter=inter, p_soft=p_soft if self_routed else None,
    )  # fmt: skip
    need_dp = self_routed or given
    # ---- (c)
    buffers, down = mf.down_backward_launch(pb, True, need_dp, True)
    _plan_launch(down, buffers, arrays, "default")
    d_experts = arrays["dexperts_part"].sum(0)[None]  # one slot per row chunk, every one written
    if pb.mode == mf.ROUTE_NONE:
        d_experts = d_experts[:, :1]  # only expert row 0 is written when p ≡ 1 (E = 1)
    # ---- (r)
    d_probs = None
    if need_dp:
        buffers, router_bwd = mf.router_backward_launch(pb)
        _plan_launch(router_bwd, buffers, arrays, "default")
        d_probs = arrays["d_route"] if given else None
    # ---- (d) and the dx GEMMs
    buffers, up = mf.up_backward_launch(pb, True, self_routed)
    _plan_launch(up, buffers, arrays, "default")
    d_router = arrays["drouter_part"].sum(0) if self_routed else None
    dh0, dg = arrays["dh0"], arrays.get("dg")
    f32 = jnp.float32
    dx = jnp.matmul(dh0, wi_0, preferred_element_type=f32)
    if wi_1 is not None:
        dx = dx + jnp.matmul(dg, wi_1, preferred_element_type=f32)
    return dx.astype(x.dtype), d_router, d_experts, d_probs, dh0, dg


@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _mov_ffn(x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize):
    return _ffn_forward(x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize, False)[0]


def _mov_ffn_fwd(x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize):
    y, inter, p_soft = _ffn_forward(x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize, True)
    return y, (x, wi_0, wi_1, wo, router, experts, probs, inter, p_soft)


def _mov_ffn_bwd(activation, top_k, renormalize, res, dy):
    from pemoe.jax import xla

    x, wi_0, wi_1, wo, router, experts, probs, inter, p_soft = res
    dx, d_router, d_experts, d_probs, dh0, dg = _ffn_backward(
        dy, x, wi_0, wi_1, wo, router, experts, probs, inter, p_soft, activation, top_k, renormalize
    )
    # the frozen weights' cotangents (dead code under jax.jit when nothing asks for them): dwi_0 = dh0ᵀ x,
    # dwi_1 = dgᵀ x, dwo = dyᵀ (u ⊙ s) with s = p · experts[0] recomputed from the saved probabilities
    f32 = jnp.float32
    if probs is not None:
        p = probs
    elif router is None:
        p = jnp.ones((x.shape[0], 1), f32)
    else:
        p = xla.select(p_soft, top_k, renormalize)
    s = jnp.matmul(p, experts[0], preferred_element_type=f32)
    d_wo = jnp.matmul(dy.astype(f32).T, inter.astype(f32) * s).astype(wo.dtype)
    d_wi_0 = jnp.matmul(dh0.T, x, preferred_element_type=f32).astype(wi_0.dtype)
    d_wi_1 = None if wi_1 is None else jnp.matmul(dg.T, x, preferred_element_type=f32).astype(wi_1.dtype)
    d_router = None if router is None else d_router.astype(router.dtype)
    d_probs = None if probs is None else d_probs.astype(probs.dtype)
    return dx, d_wi_0, d_wi_1, d_wo, d_router, d_experts.astype(experts.dtype), d_probs


_mov_ffn.defvjp(_mov_ffn_fwd, _mov_ffn_bwd)


def mov_ffn(
    x: jax.Array,
    wi_0: jax.Array,
    wi_1: jax.Array | None,
    wo: jax.Array,
    router: jax.Array | None,
    experts: jax.Array,
    probs: jax.Array | None = None,
    *,
    activation: str = "gelu_new",
    top_k: int | None = None,
    renormalize: bool = False,
) -> jax.Array:
    """T5 FFN with MoV on the activation through the fused Triton kernels (differentiable), x [T, M] -> [T, M]:
    (mov(act(x wi_0ᵀ)) [⊙ x wi_1ᵀ]) woᵀ. wi_0/wi_1 [F, M], wo [M, F] (frozen), router [F, E] float32 (None:
    (IA)3), experts [1, E, F] float32, probs [T, E] float32 for sentence routing (then router is unused).
    Kernel limits (float16/bfloat16/float32, T ≥ 1) raise at trace time."""
    return _mov_ffn(x, wi_0, wi_1, wo, router, experts, probs, activation, top_k, renormalize)


# ------------------------------------------------------------------------------------------
# molora_linear: the shared launch plan (kernels/triton/molora_linear.py), and custom_vjp
# ------------------------------------------------------------------------------------------


def _molora_problem(x, weight, bias, lora_a, lora_b, router, probs, top_k, renormalize) -> ml_lora.MoLoRAProblem:
    """The launch plan's problem; the kernels' limits raise NotImplementedError at trace time."""
    try:
        return ml_lora.plan_problem(
            tuple(x.shape), tuple(lora_a.shape), tuple(lora_b.shape), jnp.dtype(x.dtype).name,
            has_router=router is not None, has_probs=probs is not None, top_k=top_k, renormalize=renormalize,
            has_weight=weight is not None, has_bias=bias is not None,
        )  # fmt: skip
    except (TypeError, ValueError) as e:
        raise NotImplementedError(f"molora_linear (triton): {e}") from e


def _molora_check(x, weight, bias, lora_a, lora_b, router, probs) -> None:
    """The kernels' limits beyond pemoe.jax's argument checks (NotImplementedError at trace time)."""
    if x.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32):
        raise NotImplementedError(
            f"molora_linear (triton): supports float16, bfloat16 and float32 activations, got {x.dtype}"
        )
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise NotImplementedError(
            f"molora_linear (triton): x, weight and bias must share one dtype, got x {x.dtype}, weight "
            f"{weight.dtype}, bias {None if bias is None else bias.dtype}"
        )
    _molora_problem(x, weight, bias, lora_a, lora_b, router, probs, None, False)


def _molora_forward(x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize, save, schedule, configs):
    """The forward launches of the schedule (``ml.resolve_schedule``: a ``use_schedule`` context, the argument, or
    ``choose_schedule``'s model pick): (y [T, N], U float32 [T, E·r] | None, p_soft float32 [T, E] | None), the
    last two when ``save`` (p_soft with token routing only)."""
    pb = _molora_problem(x, weight, bias, lora_a, lora_b, router, probs, top_k, renormalize)
    plan = ml_lora.forward_plan(pb, scale, save, ml_lora.resolve_schedule(schedule, pb, save))
    arrays = dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, router=router, probs=probs)
    for launch in plan.launches:
        _plan_launch(launch, plan.buffers, arrays, configs)
    return arrays["y"], arrays.get("u"), arrays.get("p_soft")


def _molora_backward(dy, x, weight, bias, lora_a, lora_b, router, probs, u, p_soft, scale, top_k, renormalize, configs):
    """grad_u, the dx GEMM and the two weight-gradient launches; the chunk partial sums are added by XLA.
    Returns (dx, d bias, d lora_a, d lora_b, d router, d probs), None where the input is None."""
    pb = _molora_problem(x, weight, bias, lora_a, lora_b, router, probs, top_k, renormalize)
    needs = (True, bias is not None, True, True, router is not None, probs is not None)
    plan = ml_lora.backward_plan(pb, scale, needs)
    arrays = dict(
        dy=dy.astype(x.dtype), x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, router=router, probs=probs, u=u,
        p_soft=p_soft,
    )  # fmt: skip
    for launch in plan.launches:
        _plan_launch(launch, plan.buffers, arrays, configs)

    def total(name):  # Σ over token chunks, in XLA
        return arrays[name].sum(0) if name in plan.buffers else None

    d_bias = total("part_bias")
    return (
        arrays["dx"],
        None if d_bias is None else d_bias.astype(bias.dtype),
        total("part_a"),
        total("part_b"),
        total("part_router"),
        arrays["d_route"] if probs is not None else None,
    )


@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _molora_linear(x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize, schedule, configs):
    return _molora_forward(
        x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize, False, schedule, configs
    )[0]


def _molora_linear_fwd(x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize, schedule, configs):
    y, u, p_soft = _molora_forward(
        x, weight, bias, lora_a, lora_b, router, probs, scale, top_k, renormalize, True, schedule, configs
    )
    return y, (x, weight, bias, lora_a, lora_b, router, probs, u, p_soft)


def _molora_linear_bwd(scale, top_k, renormalize, schedule, configs, res, dy):
    del schedule  # one backward for both forward schedules
    x, weight, bias, lora_a, lora_b, router, probs, u, p_soft = res
    dx, d_bias, d_a, d_b, d_router, d_probs = _molora_backward(
        dy, x, weight, bias, lora_a, lora_b, router, probs, u, p_soft, scale, top_k, renormalize, configs
    )
    # the frozen weight's cotangent dyᵀ·x (dead code under jax.jit when nothing asks for it)
    d_weight = jnp.matmul(dy.astype(x.dtype).T, x, preferred_element_type=jnp.float32).astype(weight.dtype)
    return dx, d_weight, d_bias, d_a, d_b, d_router, d_probs


_molora_linear.defvjp(_molora_linear_fwd, _molora_linear_bwd)


def molora_linear(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    lora_a: jax.Array,
    lora_b: jax.Array,
    router: jax.Array | None,
    probs: jax.Array | None = None,
    *,
    scale: float,
    top_k: int | None = None,
    renormalize: bool = False,
    schedule: str = "auto",
    configs: str | None = None,
) -> jax.Array:
    """y [T, N] = x Wᵀ + b + scale·Σ_e p_e (x A_e) B_e with the Triton MoLoRA kernels (differentiable).

    x [T, K], weight [N, K] (frozen), bias [N] (x's dtype), lora_a [E, K, r], lora_b [E, r, N], router [K, E]
    (None: LoRA, E = 1), probs [T, E] for sentence routing (its cotangent is returned; the router is then
    unused); adapters and probs are used in float32 (cast here, their cotangents cast back). ``schedule``:
    "auto" (``choose_schedule``'s model, the torch launcher's choice), "fused" or "two_kernel";
    ``kernels.triton.molora_linear.use_schedule`` wins, as for torch. ``configs``: "default" (each launch's
    first legal tile, the AOT-checked one) or "all" (every legal tile, autotuned by jax-triton on the GPU);
    None: the innermost :func:`tile_configs` choice, else "default". Kernel limits (float16 / bfloat16 /
    float32 activations, at most 256 padded adapter columns) raise NotImplementedError at trace time.
    """
    if configs is None:
        configs = _configs_choice[-1] if _configs_choice else "default"
    if configs not in ("default", "all"):
        raise ValueError(f"configs must be 'default' or 'all', got {configs!r}")
    if schedule != "auto" and schedule not in ml_lora.SCHEDULES:
        raise ValueError(f"schedule must be 'auto' or one of {ml_lora.SCHEDULES}, got {schedule!r}")
    _molora_check(x, weight, bias, lora_a, lora_b, router, probs)
    n = weight.shape[0]
    if x.shape[0] == 0:  # no token: no launch (the kernels need T >= 1); zero cotangents by autodiff
        return jnp.zeros((0, n), x.dtype)
    f32 = jnp.float32
    cast = [None if a is None else a.astype(f32) for a in (lora_a, lora_b, router, probs)]
    return _molora_linear(x, weight, bias, *cast, float(scale), top_k, bool(renormalize), schedule, configs)
