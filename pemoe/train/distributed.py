"""Data-parallel ``pemoe train`` over ``torch.distributed``: DDP and FSDP2 (``fully_shard``).

Launch the same ``pemoe train`` command under ``torchrun`` (``torchrun --nproc-per-node N -m pemoe train ...``);
:func:`setup` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and starts the process
group: gloo on the CPU, NCCL with device ``cuda:LOCAL_RANK`` when CUDA is available.

Semantics (what makes W ranks give the single-process result):

* ``--batch-size`` stays the *global* micro-batch. Every rank draws the same example indices from the same
  :class:`~pemoe.train.data.DataStream` (so the data-loader state is one state, identical on every rank, and a
  checkpoint resumes at any world size), encodes the whole micro-batch (identical padding) and keeps its rows
  :meth:`ParallelContext.rows` (contiguous chunks whose sizes differ by at most one).
* Each rank's loss is its token-sum of cross-entropy divided by the *global* target-token count of the step,
  and gradients are *summed* over ranks (DDP with a sum comm hook; FSDP2 with divide factor 1), so the summed
  gradient is the single-process gradient up to float32 summation order.
* Losses are all-reduced (sum), so metrics show the global token-mean loss.

Modes (``--parallel``):

* ``ddp``: ``DistributedDataParallel`` over the model; only parameters that require grad are synchronised
  (the frozen backbone is ignored by DDP). Every adapter parameter is used in every forward, so
  ``find_unused_parameters=False``. Gradient accumulation syncs on the last micro-batch only (``no_sync``).
* ``fsdp``: FSDP2 ``fully_shard`` on the model family's units (:mod:`pemoe.train.models`: for T5 each
  relative-attention-bias table, which the pemoe T5 stack reads outside its block, and each T5 block; for a
  causal LM each decoder layer), then the root. With adapters, the *frozen backbone* is sharded; the trainable
  adapter parameters (at most ~1% of the model) are passed as ``ignored_params``: they stay replicated plain
  tensors and their gradients are all-reduced here in one flat buffer after the step's last backward.
  Reason: ``torch.optim.Adafactor`` (the default optimizer) cannot step sharded 2-D DTensor parameters (its
  factored second moment does an in-place op on a partial reduction), while replicated adapters work with
  every optimizer and keep the optimizer state and checkpoints unsharded. With ``--method full`` every
  parameter is sharded (DTensor parameters and optimizer state): this needs ``--optimizer adamw``
  (ValueError otherwise); checkpoints gather full tensors.

Rank 0 alone writes checkpoints, metrics, logs and the progress bar; checkpoints keep the single-process format
(full, unsharded tensors), plus each rank's RNG state (dropout) as ``rng.torch.rank<r>``: a run resumed at the
same world size is bit-exact to the uninterrupted one; at another world size it continues from the same weights,
optimizer and data position (ranks without a saved RNG state reseed theirs, so dropout masks differ). The
output directory must be visible to every rank (one node, or a shared filesystem).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pemoe.train.data import Batch

__all__ = ["PARALLEL_MODES", "ParallelContext", "setup", "torchrun_world"]

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
RANK_SEED_STRIDE = 1_000_003  # rank r > 0 seeds its dropout RNG with seed + r * stride


def torchrun_world(environ: dict[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's environment, or None outside a torchrun launch."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None
    values = []
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = env.get(name, "0" if name == "LOCAL_RANK" else None)
        if text is None or not text.strip().isdigit():
            raise ValueError(
                f"environment variable {name} must be a non-negative integer (set by torchrun), got {text!r}"
            )
        values.append(int(text))
    rank, world, local = values
    if world < 1 or rank >= world:
        raise ValueError(f"torchrun environment: RANK={rank} must be < WORLD_SIZE={world} (and WORLD_SIZE >= 1)")
    return rank, world, local


def _sum_hook(process_group, bucket):  # no annotations: DDP checks them, and they are strings in this module
    """DDP communication hook: all-reduce SUM (DDP's default divides by the world size)."""
    group = process_group if process_group is not None else dist.group.WORLD
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


@dataclass
class ParallelContext:
    """The run's data-parallel setting: mode ``"none"`` (one process), ``"ddp"`` or ``"fsdp"``."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: leave the model where it is (single process, CPU)
    owns_group: bool = False  # this context started the process group (and ends it in close())
    method: str = "mov"

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    # -- data ------------------------------------------------------------------------------

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global micro-batch of ``batch_size`` examples (contiguous; sizes differ by ≤ 1)."""
        base, extra = divmod(batch_size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def shard_batch(self, batch: Batch) -> Batch:
        """This rank's rows of a global micro-batch (padding kept as encoded for the whole batch)."""
        if self.world_size == 1:
            return batch
        return batch.select(self.rows(batch.input_ids.shape[0]))

    # -- collectives (identity in one process) ----------------------------------------------

    def reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a list of floats (float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (SIGINT on one rank stops all at the same step)."""
        return bool(flag) if not self.distributed else self.reduce_sum([float(bool(flag))])[0] > 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """End the process group if this context started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def _comm_device(self) -> torch.device:
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")

    # -- model -----------------------------------------------------------------------------

    def wrap(
        self,
        model: nn.Module,
        named: list[tuple[str, nn.Parameter]],
        units: list[nn.Module] | None = None,
    ) -> tuple[nn.Module, list[tuple[str, nn.Parameter]]]:
        """Move ``model`` to this rank's device and wrap it for the mode.

        ``units``: the FSDP2 sharding units before the root (the model family's
        :meth:`~pemoe.train.models.ModelFamily.fsdp_units`; default: T5's).

        Returns the module to call in training (the DDP wrapper, or ``model`` itself) and the trainable
        ``(name, parameter)`` list, rebuilt when sharding replaced the parameters (``--method full`` under
        FSDP: DTensor parameters). ``model`` stays the unwrapped module (evaluation, saving).
        """
        if self.device is not None:
            model.to(self.device)
        if self.mode == "none":
            return model, named
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            cuda = self.device is not None and self.device.type == "cuda"
            ddp = DDP(
                model,
                device_ids=[self.device.index] if cuda else None,
                find_unused_parameters=False,
            )
            ddp.register_comm_hook(None, _sum_hook)
            return ddp, named
        return model, self._fully_shard(model, named, units)

    def _fully_shard(
        self, model: nn.Module, named: list[tuple[str, nn.Parameter]], units: list[nn.Module] | None = None
    ) -> list[tuple[str, nn.Parameter]]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self._comm_device().type, (self.world_size,))
        ignored = None if self.method == "full" else {p for _, p in named}
        if ignored:
            with torch.no_grad():  # replicated adapters: start from rank 0's values on every rank
                for _, p in named:
                    dist.broadcast(p.data, src=0)
        if units is None:
            from pemoe.train.models import T5Family

            units = T5Family().fsdp_units(model)
        for unit in [*units, model]:
            fully_shard(unit, mesh=mesh, ignored_params=ignored)
            unit.set_gradient_divide_factor(1.0)  # sum over ranks (the loss is already a global mean)
            unit.set_force_sum_reduction_for_comms(True)
        return _renamed(model, named) if self.method == "full" else named

    @staticmethod
    def logits(train_model: nn.Module, batch: Batch) -> torch.Tensor:
        """Decoder logits [B, T, V] through the training module (:func:`pemoe.train.evaluate.model_logits`,
        seeing through a DDP wrapper, whose own forward must run for its gradient hooks)."""
        from pemoe.models.t5 import T5

        kwargs = dict(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            decoder_input_ids=batch.decoder_input_ids,
            decoder_attention_mask=batch.decoder_attention_mask,
        )
        if not isinstance(getattr(train_model, "module", train_model), T5):
            kwargs["use_cache"] = False  # transformers: no key/value cache in teacher forcing
        return train_model(**kwargs).logits

    @contextlib.contextmanager
    def accumulate(self, train_model: nn.Module, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward + backward: DDP skips its gradient sync unless ``last``."""
        if self.mode == "ddp" and not last:
            with train_model.no_sync():
                yield
        else:
            yield

    def finish_gradients(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """After the step's last backward: sum the replicated adapter gradients over ranks (FSDP with adapters)."""
        if self.mode != "fsdp" or self.method == "full":
            return
        params = [p for _, p in named]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n

    # -- full tensors for checkpoints ---------------------------------------------------------

    @staticmethod
    def full(t: torch.Tensor) -> torch.Tensor:
        """A CPU copy of the whole tensor (gathers a DTensor: collective, every rank must call it)."""
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            t = t.full_tensor()
        return t.detach().to("cpu").contiguous()

    @staticmethod
    def like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """``full`` laid out as ``ref``: this rank's shard when ``ref`` is a DTensor (no communication)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(ref, DTensor) and tuple(full.shape) == tuple(ref.shape):
            full = full.to(device=ref.device, dtype=ref.dtype)
            return distribute_tensor(full, ref.device_mesh, ref.placements, src_data_rank=None)
        return full

    def rng_tensors(self) -> dict[str, torch.Tensor]:
        """Every rank's RNG state for the checkpoint (collective): ``rng.torch.rank<r>`` for r ≥ 1, and
        ``rng.cuda.rank<r>`` for every rank on CUDA. (Rank 0's CPU state is the checkpoint's ``rng.torch``.)"""
        cuda = self._comm_device().type == "cuda"
        if not self.distributed and not cuda:
            return {}
        own = {"torch": torch.get_rng_state()}
        if cuda:
            own["cuda"] = torch.cuda.get_rng_state(self.device)
        gathered: list[dict | None] = [own]
        if self.distributed:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, own)
        out = {}
        for r, states in enumerate(gathered):
            for kind, state in states.items():
                if kind != "torch" or r > 0:
                    out[f"rng.{kind}.rank{r}"] = state
        return out

    def seed(self, seed: int) -> None:
        """Seed this rank's RNG (dropout): rank 0 with ``seed`` (as one process does), rank r with seed + r·stride."""
        if self.rank > 0:
            torch.manual_seed(seed + self.rank * RANK_SEED_STRIDE)

    def restore_rng(self, checkpoint: pathlib.Path, seed: int, step: int) -> bool:
        """After a checkpoint's rank-0 RNG state was loaded: rank r ≥ 1 loads its own saved state, or, when
        the checkpoint has none for it (written at a smaller world size), reseeds from (seed, rank, step).
        Returns whether this rank's saved state was found."""
        if not self.distributed and self._comm_device().type != "cuda":
            return True
        from safetensors import safe_open

        with safe_open(str(checkpoint / "optimizer.safetensors"), framework="pt") as f:
            keys = set(f.keys())
            found = self.rank == 0 or f"rng.torch.rank{self.rank}" in keys
            if self.rank > 0 and found:
                torch.set_rng_state(f.get_tensor(f"rng.torch.rank{self.rank}"))
            elif self.rank > 0:
                torch.manual_seed(seed + self.rank * RANK_SEED_STRIDE + step)
            cuda_key = f"rng.cuda.rank{self.rank}"
            if self._comm_device().type == "cuda" and cuda_key in keys:
                torch.cuda.set_rng_state(f.get_tensor(cuda_key), self.device)
        return found


def _renamed(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    """The model's current parameter objects under ``named``'s module paths (``fully_shard`` replaces them)."""
    current = dict(model.named_parameters())
    return [(n, current[n]) for n, _ in named]


def setup(parallel: str, *, method: str, optimizer: str, batch_size: int) -> ParallelContext:
    """Resolve ``--parallel`` against torchrun's environment and start the process group.

    ``auto``: ``ddp`` under torchrun with WORLD_SIZE > 1, else ``none``. ``ddp``/``fsdp`` need a torchrun
    launch (WORLD_SIZE 1 is allowed); ``none`` under WORLD_SIZE > 1 is refused (ranks would race on the
    output). ``batch_size`` (the global micro-batch) must be at least the world size.
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {list(PARALLEL_MODES)}, got {parallel!r}")
    world = torchrun_world()
    if world is None:
        if parallel in ("ddp", "fsdp"):
            raise ValueError(
                f"--parallel {parallel} needs a torchrun launch (RANK / WORLD_SIZE are not set): "
                f"torchrun --nproc-per-node N -m pemoe train ... --parallel {parallel}"
            )
        return ParallelContext(method=method)
    rank, world_size, local_rank = world
    mode = ("ddp" if world_size > 1 else "none") if parallel == "auto" else parallel
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else None
    if mode == "none":
        if world_size > 1:
            raise ValueError(
                f"--parallel none under torchrun with WORLD_SIZE={world_size}: every rank would train alone "
                "and write the same files; use --parallel ddp or fsdp"
            )
        return ParallelContext(method=method, local_rank=local_rank, device=device)  # one process, one GPU
    if batch_size < world_size:
        raise ValueError(
            f"--batch-size {batch_size} is the global micro-batch, split over {world_size} ranks: "
            f"it must be >= the world size"
        )
    if mode == "fsdp" and method == "full" and optimizer == "adafactor":
        raise ValueError(
            "--parallel fsdp --method full shards every parameter (DTensor), and torch.optim.Adafactor cannot "
            "step sharded 2-D DTensor parameters: use --optimizer adamw, or --parallel ddp"
        )
    owns = not dist.is_initialized()
    if owns:
        if cuda:
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(
            f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match torchrun's "
            f"environment (RANK={rank}, WORLD_SIZE={world_size})"
        )
    return ParallelContext(mode, rank, world_size, local_rank, device, owns, method)
