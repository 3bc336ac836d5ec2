"""Scale-out for JAX training: a ("data", "model") device mesh, a sharded frozen backbone, and a jitted
train step whose loss is the exact global token mean over every shard of the batch.

    mesh = make_mesh(data=4, model=2)                 # 8 devices: GPUs of a node, TPU chips, or CPU devices
    frozen = shard_frozen(frozen, mesh)               # large T5 matrices split over "model", the rest replicated
    trainable, opt_state = replicate((trainable, optimizer.init(trainable)), mesh)
    step = make_train_step(loss_fn, optimizer, mesh)  # loss_fn(trainable, frozen, batch) -> (loss_sum, n_tokens)
    trainable, opt_state, loss = step(trainable, opt_state, frozen, shard_batch(batch, mesh))

The math. ``loss_fn`` returns a *sum* over the tokens of the batch it sees and the number of those tokens;
the step minimises ``L = Σ_shards loss_sum / Σ_shards n_tokens`` (psum over "data"), the loss of the whole
batch on one device, so per-shard token counts may differ (padding) and the result is still exact up to
float32 summation order. ``∇L = Σ_shards ∇loss_sum / Σ_shards n_tokens``: each shard's gradient of its own
``loss_sum``, summed over "data", over the global token count (a mean of per-shard means would be wrong
whenever the counts differ). The optimizer update then runs replicated (adapters are small).

Two ways to run the loss, both under one ``jax.jit``:

  * ``mode="shard_map"`` (the default): ``jax.shard_map`` manual over "data" — ``loss_fn`` and its gradient
    run once per data shard on the local batch slice ``[B / data, ...]``, so every pemoe op inside (the
    Pallas kernels included) is called per shard with local shapes and a custom kernel is never handed to
    the SPMD partitioner along the batch; then explicit ``psum``s over "data" of loss_sum, n_tokens and the
    gradients. The "model" axis stays automatic (``axis_names={"data"}``), so the sharded backbone matmuls
    are partitioned by XLA inside each data shard. (``check_vma=False``: Pallas calls and pemoe's custom_vjp
    backwards carry no varying-axis types; the psums above are the whole cross-shard contract.)
  * ``mode="jit"``: plain ``jax.jit`` over the global batch (constrained to ``P("data")``) and
    ``jax.value_and_grad`` of ``L``; XLA's SPMD partitioner splits everything and inserts the reductions.
    Fine for the ``"xla"`` / ``"reference"`` ops; a Pallas (Mosaic) kernel cannot be partitioned this way on
    a TPU — use ``"shard_map"`` there.

Pallas on a TPU with ``model > 1``: in ``"shard_map"`` mode the model axis is still automatic, so a Pallas
kernel whose frozen weight is split over "model" is again handed to the partitioner. Run Pallas kernels with
``model=1`` (data parallel, backbone replicated), or keep those weights replicated
(``shard_frozen(..., keep_replicated=[...])``). (On CPU the Pallas
interpreter lowers to plain HLO and partitions either way; the TPU behaviour is not tested here.)

``mesh=None`` is a plain ``jax.jit`` of the same step on the default device (the single-device baseline).

Several processes (multi-controller JAX: one process per TPU host, per GPU node or per GPU). Every process runs
the same program; :func:`initialize_distributed` (``jax.distributed.initialize``) must come before any device
use, after which ``jax.devices()`` lists every process's devices and :func:`make_mesh` spans them all. Arrays on
such a mesh are global: each process holds only the shards of its own devices. The placement helpers build
them from host data without any cross-process traffic (``jax.make_array_from_callback``: each process copies
only its own devices' slices): :func:`shard_frozen` and :func:`replicate` take the same host values on every
process (the same checkpoint / seed); :func:`shard_batch` takes either the same global batch on every process
or (``process_local=True``) only this process's rows, :func:`process_batch_indices` of the global batch
(``jax.make_array_from_process_local_data``). The step itself is unchanged: the psums over "data" cross the
processes (gloo on CPU — ``jax_cpu_collectives_implementation``, the default in jax 0.10 —, NCCL on GPU, ICI on
TPU). :func:`gather_from_processes` and :func:`fingerprint` let the processes check that they agree (same
data, same initial state) and stop at the same step.

Backbone placement (:func:`frozen_partition_specs`, Megatron-style, by T5 weight kind; torch layout
``[N, K]``, weights applied as ``x @ W.T``):
  * column-parallel, split the output dim 0 over "model": ``q``, ``k``, ``v`` (along heads when the head
    count divides by the model size), ``wi`` / ``wi_0`` / ``wi_1``;
  * row-parallel, split the input dim 1: ``o``, ``wo`` (the layer after a column-parallel one, so an
    attention block or an FFN needs one all-reduce of its output, which XLA inserts);
  * vocabulary-parallel, dim 0: ``shared.weight`` (embedding) and ``lm_head.weight``;
  * replicated: everything else (layer norms, relative position biases, adapter parameters), any matrix
    with fewer than ``min_size`` elements, and any matrix whose split dim does not divide by the model size
    (those are logged on the ``pemoe`` logger, never silently mis-sharded).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "AXES",
    "DEFAULT_MIN_SIZE",
    "MODES",
    "fingerprint",
    "frozen_partition_specs",
    "gather_from_processes",
    "initialize_distributed",
    "make_mesh",
    "make_train_step",
    "process_batch_indices",
    "replicate",
    "shard_batch",
    "shard_frozen",
    "sync_processes",
]

logger = logging.getLogger("pemoe")

#: Mesh axis names: batch parallelism, then tensor (backbone) parallelism.
AXES: tuple[str, str] = ("data", "model")
#: Train-step modes of :func:`make_train_step`; the first is the default.
MODES: tuple[str, ...] = ("shard_map", "jit")
#: Matrices with fewer elements stay replicated (4 MiB in float32): splitting them saves less memory than
#: the collectives cost. T5 v1.1 small's FFN matrices (512 × 1024) are just below it; base and larger are above.
DEFAULT_MIN_SIZE: int = 1 << 20

# T5 weight kind -> the dim split over "model" (torch layout [N, K]); matched on the full parameter name.
_SPLIT_RULES: tuple[tuple[re.Pattern[str], int, str], ...] = (
    (re.compile(r"(^|\.)(q|k|v|wi|wi_0|wi_1)\.weight$"), 0, "column-parallel"),
    (re.compile(r"(^|\.)(o|wo)\.weight$"), 1, "row-parallel"),
    (re.compile(r"^(shared|lm_head)\.weight$"), 0, "vocabulary-parallel"),
)


# ---------------------------------------------------------------------------------------------
# processes


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int = 300,
) -> tuple[int, int]:
    """Join a multi-process JAX job (``jax.distributed.initialize``); returns ``(process_index, process_count)``.

    Call it before anything touches a device. ``coordinator`` (``"HOST:PORT"``, the address of process 0, which
    listens there), ``num_processes`` and ``process_id`` (0 ≤ id < num_processes) name the job explicitly; any
    left ``None`` comes from JAX's own cluster detection (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes,
    or the ``JAX_COORDINATOR_ADDRESS`` variable). ``local_device_ids``: the local devices this process uses
    (default all; one process per GPU under SLURM / Open MPI picks its own). A second call in a process that
    already joined returns the same answer (``jax.distributed`` can be initialised only once).

    Raises ValueError for a malformed argument or when neither the arguments nor the environment name a job,
    RuntimeError when a device was used before this call.
    """
    if coordinator is not None:
        host, sep, port = str(coordinator).rpartition(":")
        if not isinstance(coordinator, str) or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"coordinator must be 'HOST:PORT' (process 0's address), got {coordinator!r}")
    for name, value, low in (("num_processes", num_processes, 1), ("process_id", process_id, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(f"process_id must be < num_processes = {num_processes}, got {process_id}")
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            local_device_ids=None if local_device_ids is None else list(local_device_ids),
            initialization_timeout=initialization_timeout,
        )
    except ValueError as e:  # JAX found no job: say what would name one
        raise ValueError(
            f"jax.distributed.initialize: {e} — pass the coordinator 'HOST:PORT', num_processes and process_id "
            "(--coordinator, --num-processes, --process-id), or run under a cluster JAX detects (Cloud TPU, "
            "SLURM, Open MPI, Kubernetes)"
        ) from None
    logger.info(
        "pemoe.jax.parallel: process %d of %d, %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return jax.process_index(), jax.process_count()


def gather_from_processes(values: Any) -> np.ndarray:
    """``[process_count, *shape]``: the small host array ``values`` of every process, stacked by process index.

    A collective: every process must call it (with the same shape and dtype). One process: ``values[None]``.
    """
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values, tiled=False))


def sync_processes(name: str) -> None:
    """Wait until every process reached ``sync_processes(name)`` (a no-op in one process), e.g. after process 0
    wrote a file that the others read next."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def fingerprint(tree: Any) -> np.ndarray:
    """uint32[8]: SHA-256 of every leaf of ``tree`` (path, dtype, shape and bytes, in tree order) — equal
    fingerprints on every process (:func:`gather_from_processes`) mean equal host values. Leaves are fetched to
    the host: use it on host data or on fully replicated / fully addressable arrays."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return np.frombuffer(digest.digest(), dtype=np.uint32).copy()


# ---------------------------------------------------------------------------------------------
# mesh


def make_mesh(data: int | None = None, model: int = 1, devices: list | None = None) -> Mesh:
    """A ``("data", "model")`` mesh over ``devices`` (default: ``jax.devices()``, every device of every process).

    ``data=None`` takes ``len(devices) // model``. Without ``devices`` the layout comes from
    ``jax.make_mesh`` (topology-aware on TPU: the "model" axis gets the closest chips); with ``devices`` they
    are laid out in the given order, row-major ``[data, model]``. Both axes are ``AxisType.Auto``.

    Raises ValueError unless ``data * model`` equals the number of devices.
    """
    if devices is None:
        devices = jax.devices()
        given = False
    else:
        devices = list(devices)
        given = True
    count = len(devices)
    for name, value in (("model", model), ("data", data)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"make_mesh: {name} must be a positive int, got {value!r}")
    if data is None:
        if count % model:
            raise ValueError(f"make_mesh: model={model} does not divide the {count} available devices")
        data = count // model
    if data * model != count:
        raise ValueError(
            f"make_mesh: data * model = {data} * {model} = {data * model} must equal the number of available "
            f"devices, {count} (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)"
        )
    axis_types = (AxisType.Auto, AxisType.Auto)
    if given:
        return Mesh(np.asarray(devices, dtype=object).reshape(data, model), AXES, axis_types=axis_types)
    return jax.make_mesh((data, model), AXES, axis_types=axis_types)


def _axis_size(mesh: Mesh, axis: str) -> int:
    return int(mesh.shape[axis]) if axis in mesh.shape else 1


def _check_mesh(mesh: Any) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (see make_mesh) or None, got {type(mesh).__name__}")
    if "data" not in mesh.axis_names:
        raise ValueError(f"mesh must have a 'data' axis (axes {AXES}), got axes {mesh.axis_names}")


# ---------------------------------------------------------------------------------------------
# placement


def frozen_partition_specs(
    frozen: Mapping[str, Any],
    model_size: int,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    keep_replicated: Sequence[str] = (),
) -> dict[str, P]:
    r"""The :class:`PartitionSpec` of every frozen weight for a "model" axis of ``model_size`` devices.

    ``frozen`` maps transformers-style T5 names (as :func:`pemoe.models.t5_jax.params_from_torch`) to arrays
    (anything with ``.shape``). Rules in the module docstring: a 2-D weight of a known kind with at least
    ``min_size`` elements is split along its kind's dim when that dim divides by ``model_size``; every other
    array is replicated (``P()``), as is every name matching one of the ``keep_replicated`` regular
    expressions (``re.search``; e.g. ``(r"\.(k|v)\.weight$",)`` for the weights of Pallas mov_linear sites on a
    TPU). Large matrices left replicated for a reason other than ``keep_replicated`` are logged with it.
    """
    if not isinstance(frozen, Mapping):
        raise TypeError(f"frozen must be a dict of arrays keyed by parameter name, got {type(frozen).__name__}")
    if isinstance(model_size, bool) or not isinstance(model_size, int) or model_size < 1:
        raise ValueError(f"model_size must be a positive int, got {model_size!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")
    if isinstance(keep_replicated, str):
        raise TypeError(
            f"keep_replicated must be a sequence of regular expressions, got the string {keep_replicated!r}"
        )
    keep = [re.compile(pattern) for pattern in keep_replicated]
    specs: dict[str, P] = {}
    not_split: list[str] = []
    for name, value in frozen.items():
        shape = tuple(np.shape(value))
        specs[name] = P()
        if model_size == 1 or len(shape) != 2 or math.prod(shape) < min_size:
            continue
        if any(pattern.search(name) for pattern in keep):
            continue
        rule = next(((dim, kind) for pattern, dim, kind in _SPLIT_RULES if pattern.search(name)), None)
        if rule is None:
            not_split.append(f"{name} {list(shape)} (no split rule for this weight kind)")
            continue
        dim, kind = rule
        if shape[dim] % model_size:
            not_split.append(f"{name} {list(shape)} ({kind}: dim {dim} does not divide by model={model_size})")
            continue
        specs[name] = P("model", None) if dim == 0 else P(None, "model")
    if not_split:
        logger.info(
            "pemoe.jax.parallel: %d frozen matri%s of >= %d elements stay replicated: %s",
            len(not_split),
            "x" if len(not_split) == 1 else "ces",
            min_size,
            "; ".join(not_split),
        )
    return specs


def shard_frozen(
    frozen: Mapping[str, Any],
    mesh: Mesh,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    keep_replicated: Sequence[str] = (),
) -> dict[str, jax.Array]:
    """Place the frozen backbone on ``mesh`` by :func:`frozen_partition_specs` (split over "model", or
    replicated over every device). Returns a new dict of committed ``jax.Array`` with those shardings."""
    _check_mesh(mesh)
    specs = frozen_partition_specs(
        frozen, _axis_size(mesh, "model"), min_size=min_size, keep_replicated=keep_replicated
    )
    return {name: _place(value, NamedSharding(mesh, specs[name])) for name, value in frozen.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of ``tree`` (adapters, optimizer state) replicated on every device of ``mesh``. Several
    processes: each passes the same host values (or global arrays already on ``mesh``)."""
    _check_mesh(mesh)
    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda x: _place(x, sharding), tree)


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` with ``sharding``. One process: ``jax.device_put``. Several: a global array already spanning the
    processes is resharded by ``jax.device_put``; a host value (numpy, or an array on this process's devices),
    the same on every process, becomes a global array of which each process fills only its own devices' slices
    (``jax.make_array_from_callback``: no cross-process traffic; ``jax.device_put`` would all-gather the whole
    value to check it is equal everywhere)."""
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _check_batch(batch: Any, data: int) -> None:
    """Every batch array has a leading batch dim divisible by the "data" axis size."""
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError("batch must hold at least one array")
    for path, leaf in leaves:
        shape = tuple(np.shape(leaf))
        where = "batch" + jax.tree_util.keystr(path)
        if not shape:
            raise ValueError(f"{where} must have a leading batch dim [B, ...] to split over 'data', got a scalar")
        if shape[0] % data:
            raise ValueError(
                f"{where} has shape {list(shape)}: its batch dim B = {shape[0]} must be divisible by the mesh's "
                f"'data' axis size {data}"
            )


def _local_row_blocks(mesh: Mesh, batch_size: int) -> list[tuple[int, int]]:
    """The distinct ``[start, stop)`` row blocks of a ``[batch_size]`` array split over "data" that this
    process's devices hold, ascending."""
    index_map = NamedSharding(mesh, P("data")).addressable_devices_indices_map((batch_size,))
    rows = [index[0] for index in index_map.values()]
    return sorted({(r.start or 0, batch_size if r.stop is None else r.stop) for r in rows})


def process_batch_indices(mesh: Mesh, batch_size: int) -> np.ndarray:
    """int64 ``[rows]``: the rows of a global batch of ``batch_size`` examples (split over "data") that this
    process's devices hold, ascending — what this process loads for ``shard_batch(..., process_local=True)``.
    One process: ``arange(batch_size)``. Processes that share a data shard (a "model" axis across
    processes) get the same rows.

    Raises ValueError unless ``batch_size`` is a positive multiple of the "data" axis size.
    """
    _check_mesh(mesh)
    data = _axis_size(mesh, "data")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or batch_size % data:
        raise ValueError(
            f"batch_size must be a positive multiple of the mesh's 'data' axis size {data}, got {batch_size!r}"
        )
    blocks = _local_row_blocks(mesh, batch_size)
    return np.concatenate([np.arange(start, stop) for start, stop in blocks])


def shard_batch(batch: Any, mesh: Mesh, *, process_local: bool = False) -> Any:
    """Place every batch array split along axis 0 over "data" (replicated over "model").

    ``process_local=False``: ``batch`` is the global batch ``[B, ...]``, the same on every process (each one
    copies only its own devices' rows). ``process_local=True``: ``batch`` holds only this process's rows,
    ``global[process_batch_indices(mesh, B)]`` ``[B_local, ...]``; the result is the global ``[B, ...]`` array
    (``jax.make_array_from_process_local_data``), ``B = B_local · data / (data shards on this process)``.
    One process, ``process_local=True``: the local rows are the whole batch.

    Raises ValueError naming the array whose batch dim does not divide by the "data" axis size (global) or by
    this process's number of data shards (process-local).
    """
    _check_mesh(mesh)
    data = _axis_size(mesh, "data")
    sharding = NamedSharding(mesh, P("data"))
    if not process_local:
        _check_batch(batch, data)
        return jax.tree_util.tree_map(lambda x: _place(x, sharding), batch)
    local_shards = len(_local_row_blocks(mesh, data))  # data shards held here (one row each at B = data)
    _check_batch(batch, local_shards)

    def place(x: Any) -> jax.Array:
        host = np.asarray(x)
        global_rows = host.shape[0] // local_shards * data
        return jax.make_array_from_process_local_data(sharding, host, (global_rows, *host.shape[1:]))

    return jax.tree_util.tree_map(place, batch)


# ---------------------------------------------------------------------------------------------
# train step

LossFn = Callable[[Any, Any, Any], tuple[jax.Array, jax.Array]]


def _global_mean(loss_sum: jax.Array, n_tokens: jax.Array) -> jax.Array:
    return jnp.asarray(loss_sum, jnp.float32) / jnp.asarray(n_tokens, jnp.float32)


def make_train_step(
    loss_fn: LossFn,
    optimizer: Any,
    mesh: Mesh | None,
    *,
    mode: str = "shard_map",
    donate: bool = True,
) -> Callable[[Any, Any, Any, Any], tuple[Any, Any, jax.Array]]:
    """A jitted ``step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss)``.

    ``loss_fn(trainable, frozen, batch) -> (loss_sum, n_tokens)``: the summed token loss of the batch it is
    given and its token count (scalars). ``optimizer`` is an optax ``GradientTransformation``. The step
    computes ``loss = Σ loss_sum / Σ n_tokens`` over the whole batch (psum over the "data" axis of ``mesh``),
    its gradient with respect to ``trainable`` and one optimizer update; ``frozen`` gets no gradient.

    ``mesh=None``: plain ``jax.jit`` on the default device. With a mesh, ``mode`` (see the module docstring):
    ``"shard_map"`` runs ``loss_fn`` per data shard on batch arrays ``[B / data, ...]``; ``"jit"`` runs it on
    the global batch under the SPMD partitioner. Pass trainable / opt_state replicated (:func:`replicate`),
    frozen placed by :func:`shard_frozen` (or replicated) and the batch split by :func:`shard_batch` (a host
    batch is split on entry). The returned trainable and opt_state are replicated. ``donate=True`` donates
    the trainable and opt_state buffers (argument 0 and 1) to the outputs.

    Raises ValueError at trace time when a batch array's leading dim does not divide by the "data" axis size.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (trainable, frozen, batch) -> (loss_sum, n_tokens), got {loss_fn!r}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def total(trainable, frozen, batch):
        return _global_mean(*loss_fn(trainable, frozen, batch))

    if mesh is None:
        value_and_grad, data, replicated = jax.value_and_grad(total), 1, None
    else:
        _check_mesh(mesh)
        data, replicated = _axis_size(mesh, "data"), NamedSharding(mesh, P())
        if mode == "shard_map":

            def local(trainable, frozen, batch):
                # per data shard: local loss_sum and its gradient, then explicit sums over "data"
                def shard_loss(t):
                    loss_sum, n_tokens = loss_fn(t, frozen, batch)
                    return jnp.asarray(loss_sum, jnp.float32), jnp.asarray(n_tokens, jnp.float32)

                (loss_sum, n_tokens), grads = jax.value_and_grad(shard_loss, has_aux=True)(trainable)
                count = jax.lax.psum(n_tokens, "data")
                grads = jax.tree_util.tree_map(lambda g: jax.lax.psum(g, "data") / count, grads)
                return jax.lax.psum(loss_sum, "data") / count, grads

            # Manual over "data" only: the "model" axis stays with the partitioner (the sharded backbone).
            # check_vma=False: pallas_call outputs and custom_vjp cotangents carry no varying-axis types;
            # the gradient sum over "data" is the explicit psum above.
            value_and_grad = jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(P(), P(), P("data")),
                out_specs=(P(), P()),
                axis_names={"data"},
                check_vma=False,
            )
        else:
            batch_sharding = NamedSharding(mesh, P("data"))

            def objective(trainable, frozen, batch):
                return total(trainable, frozen, jax.lax.with_sharding_constraint(batch, batch_sharding))

            value_and_grad = jax.value_and_grad(objective)

    def step(trainable, opt_state, frozen, batch):
        _check_batch(batch, data)
        loss, grads = value_and_grad(trainable, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = jax.tree_util.tree_map(lambda p, u: (p + u).astype(p.dtype), trainable, updates)
        if replicated is not None:
            trainable, opt_state = jax.lax.with_sharding_constraint((trainable, opt_state), replicated)
        return trainable, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())
