"""Ops over an adapter bank: every token picks its adapter from parameters stacked along a leading axis A.

With ``adapter_ids`` (one integer per token, [T] or the activations' leading shape), token t runs the
single-adapter op with adapter ``a = adapter_ids[t]``'s parameters (SPEC §1 per adapter):

    MoV:     experts [A, G, E, D], router [A, D, E]          -> experts[a], router[a]
    MoLoRA:  lora_a [A, E, K, r], lora_b [A, E, r, N], router [A, K, E] -> lora_a[a], lora_b[a], router[a]

and ``a = -1`` means no adapter for that token: the frozen base alone (``mov``: h unchanged; ``mov_linear``:
x Wᵀ + b; ``mov_ffn``: the plain FFN; ``molora_linear``: x Wᵀ + b; ``molora_adapter``: ``base``, or zeros).
The routers stay per adapter, so a token's routing weights come from its own adapter's router; routing
options (top-k, sentence routing) apply to every adapter alike.

Two implementations, one semantics:

* ``reference_*`` — a loop over the A adapters: the rows of adapter a go through the single-adapter
  einsum reference (:mod:`pemoe.reference`) with adapter a's parameters, the others keep the base output.
  The ground truth; plain autograd.
* ``grouped_*`` (``implementation="torch"``), two strategies, the same math:

  - grouped by adapter: rows are sorted by adapter once (one stable argsort and one gather of the
    activations; skipped when every token names the same adapter), each adapter's contiguous segment runs
    the single-adapter ``"torch"`` autograd Function on that segment alone, and the outputs are put back in
    token order (one gather). Python loops only over the adapters the batch names, each step on its own
    rows: the work is that of one single-adapter call per adapter on its rows. Gradients reach the stacked
    parameters through the slices ``param[a]`` (autograd sums them), the activations through the gathers.
  - gathered per token (MoV only), for batches of at most :data:`GATHER_MAX_TOKENS` tokens that name
    several adapters (decoding: one token per sequence): each token's router [T, D, E] and experts
    [T, G, E, D] are gathered (``param[ids]``) and the op runs as batched products in the compute dtype
    (float32), in one pass whatever the number of adapters, with plain autograd (the gathers' backward
    accumulates into the stacked parameters). Its memory grows with T times one adapter's size, hence the
    bound. When autograd records nothing these batches run batched over the adapters present instead
    (:func:`_batched_mov`, where the padding stays within :data:`BATCHED_MAX_PADDING`): the same products
    in the compute dtype on the rows laid out [P, L, G, D] (each adapter present padded with zero rows to the
    longest count L), each adapter's router and experts read in place rather than copied per token (the
    gather's T·G·E·D copy was most of the gathered form's time). MoLoRA does not gather (a token's A_cat and
    B_cat would be T copies of K·E·r + E·r·N values).
  - MoLoRA batched over the adapters when autograd records nothing, for batches of at most
    :data:`BATCHED_MAX_TOKENS` tokens that name several ids and whose padding stays within
    :data:`BATCHED_MAX_PADDING` (decoding: one token per sequence), in a fixed number of ops on the rows laid
    out [P, L, ·] (each adapter present padded with zero rows to the longest count L): the shrink and router
    GEMM (one ``bmm`` over the kept operands where every adapter is present with the same count, else one
    GEMM per adapter), routing weights, U·p, and one batched expand ``baddbmm_`` onto the base rows. The
    shrink keeps each adapter's own GEMM's bits: the operands' rows are padded to 64 bytes
    (:data:`pemoe.ops.molora.SHRINK_COLUMNS_MULTIPLE`), where MKL's batched GEMM sums each block as the
    GEMM does (unpadded widths changed the float32 order, which broke the tolerance rule at the model level
    on the ill-conditioned tiny T5). The whole form is not bitwise the sorted one (the batched expand rounds
    as ``addmm_`` only within the rule; the routing is laid out as the single-adapter op lays it out, [E, L]:
    softmax over a contiguous last axis rounds otherwise and broke the rule on the tiny Llama). A whole-bank
    block form (one GEMM over every adapter's [A_cat | router], A-fold FLOPs) measured no faster than the
    sorted form at 8 adapters of E = 8, r = 4.
  - MoLoRA when autograd records nothing (inference, ``torch.no_grad``), for the batches the batched form
    does not take: grouped by adapter, each segment
    through the single-adapter forward's own steps (shrink and router GEMM, routing weights, ``addmm_`` of
    the expand onto the base rows) written in place into one sorted buffer, without the autograd Function
    and the per-segment copies (clone of the base rows, concatenation of the outputs): the same GEMMs on
    the same rows, so the same bits, at a third of the per-adapter overhead (still about seven small ops per
    adapter and site). The shrink's right operand of each adapter
    ([A_cat | router], a re-laid copy of lora_a[a]) is built once per bank site and kept while the parameters
    keep their values (:func:`_shrink_operands`: checked by storage, version counter, dtype and device), not
    re-laid at every call; calls that autograd records build their own, so gradients reach lora_a. The
    batched form shares these operands.
  - MoV when autograd records nothing, for the batches the gathered strategy does not take (prefill): grouped
    by adapter, each segment through the single-adapter forward's steps (router softmax, routing weights, the
    expert merge, h·s) written into one sorted output buffer, without the autograd Function, the per-segment
    outputs and their concatenation: the same ops on the same rows, so the same bits.

  - runs of consecutive rows when autograd records nothing and the groups know them (:attr:`AdapterGroups.runs`:
    built per sequence) with at least :data:`RUN_MIN_MEAN_ROWS` rows and :data:`RUN_MIN_MEAN_ELEMENTS`
    copied elements saved per run on average (prefill on wide enough rows): no sort.
    The output starts as the base (the frozen GEMM's fresh output itself; a caller's ``base`` or ``h``
    copied once) and each run of an adapter gets the single-adapter forward's steps on row views of the
    inputs, written in place into its rows of the output (MoLoRA: ``addmm_`` of the expand; MoV: h·s), so
    none of the sorted form's three row gathers (activations, base rows, back to token order). An adapter in
    several runs runs its GEMMs once per run: the same operands on fewer rows, so the same bits where each
    adapter has one run and otherwise within float32 GEMM rounding; the FFN site's activation runs once
    over all rows. Decoding (one row per sequence) keeps the sorted, gathered or batched form.

  Either way the frozen GEMMs (x Wᵀ, the FFN's wi_1 and wo) run once over all tokens.

Finding the segments needs the per-adapter token counts on the host. Given a plain ids tensor, an op reads
them back (one device-to-host sync per call, which the argument check of the ids' range needs anyway: ids
outside [-1, A) are refused before any computation) and sorts the ids. Given an :class:`AdapterGroups`
(validated once when built, from ids known on the host when built per sequence), it reads nothing back: a
model's sites share the one grouping of their batch (:class:`pemoe.layers.BankBatch`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pemoe import _checks, reference
from pemoe.ops import _router
from pemoe.ops.molora import MoLoRAFunction, _adapter_output, _shrink_and_logits, expand_into, shrink_operand
from pemoe.ops.mov import MoVActFunction, MoVFunction, _routing_weights, _scaling, router_softmax

__all__ = ["AdapterGroups", "token_router_input", "token_sentence_probs", "run_grouped", "run_reference_loop"]

Rows = list[torch.Tensor | None]


def token_router_input(router_input: torch.Tensor | None, tokens_shape: tuple[int, ...]) -> torch.Tensor | None:
    """Sentence routing's per-sequence vectors as one row per token, [T, R] (None stays None).

    ``router_input`` is [B, R] for tokens [B, S, ...] or broadcastable to tokens_shape + (R,), as in
    :func:`pemoe.reference.sentence_router_probs`; the router of each token's adapter then reads its row.
    """
    if router_input is None:
        return None
    r = router_input
    if r.dim() == 2 and len(tokens_shape) > 1:
        r = r.reshape(r.shape[:1] + (1,) * (len(tokens_shape) - 1) + r.shape[1:])
    return r.expand(tokens_shape + (r.shape[-1],)).reshape(-1, r.shape[-1])


def token_sentence_probs(
    ri: torch.Tensor, router: torch.Tensor, ids: torch.Tensor, top_k: int | None, renormalize: bool
) -> torch.Tensor:
    """Sentence routing's probabilities per token [T, E] float32, each from its own adapter's router:
    ``ri`` [T, R] (:func:`token_router_input`), router [A, R, E], ids [T] (rows of id -1 get adapter 0's,
    which nothing reads). The logits of every adapter, [T, A, E] (small: A·E per token), then each token's
    own; no host sync. For the kernels that take sentence routing as given probabilities."""
    logits = torch.einsum("tr,are->tae", ri.float(), router.float())
    own = logits.gather(1, ids.clamp(min=0).view(-1, 1, 1).expand(-1, 1, logits.shape[-1])).squeeze(1)
    return _router.select(torch.softmax(own, dim=-1), top_k, renormalize, dim=-1)


class AdapterGroups:
    """Per-token adapter ids together with their segments, built once and reused by every banked op call.

    An op given ``adapter_ids`` as a plain tensor reads the per-id token counts on the host (one
    device-to-host sync) and sorts the ids (a stable argsort) at every call; a model running one batch
    through many adapter sites pays that at every site. An ``AdapterGroups`` holds, for one leading shape:

    * ``ids`` — [T] int64 on the device, -1 (no adapter) or an adapter index in [0, A);
    * ``counts`` — tokens per id -1, 0, …, A-1 (a host tuple of A + 1 ints);
    * ``perm`` / ``inverse`` — the stable permutation sorting the tokens by id and its inverse ([T] int64 on
      the device; made on first use);
    * ``runs`` — the maximal ranges of consecutive rows naming one id, host tuples ``(start, stop, id)`` in
      row order, or None where unknown without a host sync (built from a tensor of ids);
    * ``present`` — how many ids (-1 included) name at least one token; ``adapters_present`` — how many
      adapters (-1 excluded); ``longest`` — the most tokens one adapter has; ``even`` — whether every adapter
      of the bank has the same, nonzero, number of tokens (host facts from ``counts``, which every banked call
      reads to pick its form: computed once here rather than at every site).

    It is validated once, when built (ids outside [-1, A) raise ValueError, as for a plain tensor); an op
    given one checks only that it was built for its token count and bank size (``num_adapters``). Build it
    with :meth:`from_ids` (a tensor of ids: one host sync) or :meth:`from_sequences` (one id per sequence,
    known on the host: no sync, the permutation built on the host).
    """

    __slots__ = (
        "ids", "counts", "num_adapters", "tokens_shape", "runs", "present", "adapters_present", "longest", "even",
        "_perm", "_inverse", "_adapter_rows", "_padded",
    )  # fmt: skip

    def __init__(
        self,
        ids: torch.Tensor,
        counts: tuple[int, ...],
        tokens_shape: tuple[int, ...],
        perm: torch.Tensor | None = None,
        runs: tuple[tuple[int, int, int], ...] | None = None,
    ) -> None:
        self.ids, self.counts, self.tokens_shape = ids, tuple(counts), tuple(tokens_shape)
        self.num_adapters = len(self.counts) - 1
        self.runs = None if runs is None else tuple(runs)
        adapter_counts = self.counts[1:]
        self.adapters_present = sum(1 for n in adapter_counts if n)
        self.present = self.adapters_present + (1 if self.counts[0] else 0)
        self.longest = max(adapter_counts, default=0)
        self.even = self.longest > 0 and min(adapter_counts) == self.longest
        self._perm, self._inverse, self._adapter_rows, self._padded = perm, None, None, None

    @classmethod
    def from_ids(cls, adapter_ids: torch.Tensor, num_adapters: int) -> AdapterGroups:
        """From an integer tensor of ids (any shape: its shape is the tokens' leading shape), checked like a
        plain ``adapter_ids`` (TypeError for a non-integer tensor, ValueError for an id outside [-1, A))."""
        shape = tuple(adapter_ids.shape) if isinstance(adapter_ids, torch.Tensor) else ()
        return cls.of(_checks.check_adapter_ids(adapter_ids, shape, num_adapters), num_adapters, shape)

    @classmethod
    def from_sequences(
        cls,
        sequence_ids: list[int] | tuple[int, ...],
        tokens_shape: tuple[int, ...],
        num_adapters: int,
        device: torch.device | str | None = None,
    ) -> AdapterGroups:
        """One adapter id per sequence (host ints, -1: none) for tokens of leading shape ``tokens_shape``
        = [B, ...]: sequence b's id for each of its tokens. Nothing is read back from the device."""
        seq = [int(a) for a in sequence_ids]
        bad = [a for a in seq if not -1 <= a < num_adapters]
        if bad:
            raise ValueError(
                f"adapter_ids holds the index {bad[0]}, outside [-1, {num_adapters}) (the bank holds "
                f"{num_adapters} adapter(s); -1 means no adapter)"
            )
        tokens_shape = tuple(tokens_shape)
        if not tokens_shape or tokens_shape[0] != len(seq):
            raise ValueError(
                f"adapter_ids names {len(seq)} sequence(s), but the tokens' leading shape is {list(tokens_shape)}"
            )
        per = math.prod(tokens_shape[1:])
        counts = [0] * (num_adapters + 1)
        for a in seq:
            counts[a + 1] += per
        host = torch.tensor(seq, dtype=torch.long)
        order = torch.tensor(sorted(range(len(seq)), key=seq.__getitem__), dtype=torch.long)  # stable
        perm = (order.unsqueeze(1) * per + torch.arange(per)).reshape(-1)
        ids = host.repeat_interleave(per)
        runs: list[tuple[int, int, int]] = []
        for b, a in enumerate(seq):
            if runs and runs[-1][2] == a:
                runs[-1] = (runs[-1][0], (b + 1) * per, a)
            else:
                runs.append((b * per, (b + 1) * per, a))
        return cls(ids.to(device), tuple(counts), tokens_shape, perm.to(device), tuple(runs))

    @classmethod
    def of(cls, ids: torch.Tensor, num_adapters: int, tokens_shape: tuple[int, ...] | None = None) -> AdapterGroups:
        """From flat ids [T] already checked (:func:`pemoe._checks.check_adapter_ids`), for tokens of leading
        shape ``tokens_shape`` (default [T]): one host sync."""
        counts = tuple(torch.bincount(ids + 1, minlength=num_adapters + 1).tolist())
        return cls(ids, counts, tuple(ids.shape) if tokens_shape is None else tokens_shape)

    @property
    def perm(self) -> torch.Tensor:
        """The stable permutation sorting the tokens by id (-1 first), [T]."""
        if self._perm is None:
            self._perm = torch.argsort(self.ids, stable=True)
        return self._perm

    @property
    def inverse(self) -> torch.Tensor:
        """The inverse of :attr:`perm`: sorted rows ``.index_select(0, inverse)`` are back in token order."""
        if self._inverse is None:
            perm = self.perm
            self._inverse = torch.empty_like(perm)
            self._inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return self._inverse

    @property
    def adapter_rows(self) -> torch.Tensor:
        """The tokens naming an adapter, sorted by adapter: ``perm[counts[0]:]``, [T - counts[0]]."""
        if self._adapter_rows is None:
            self._adapter_rows = self.perm[self.counts[0] :]
        return self._adapter_rows

    def padded(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
        """The tokens naming an adapter laid out per adapter present, each adapter's rows padded to the longest
        count L: ``(rows, slots, present, L)``. ``rows`` [P·L]: the token of each padded row, pad rows T (one
        past the last token: a row the caller appends); ``slots`` [P·L]: each padded row's position among the
        adapter tokens sorted by adapter (``perm[counts[0]:]``), pad rows one past the last, or None where no
        adapter needs pad rows (the sorted rows are then the padded layout); ``present`` [P]: the adapters
        present, increasing. Built from the host counts and :attr:`perm` on first use; every site of a batch
        shares it."""
        if self._padded is None:
            counts, length = self.counts, self.longest
            present = [a for a in range(self.num_adapters) if counts[a + 1]]
            rows, slots = self.adapter_rows, None
            if any(counts[a + 1] != length for a in present):
                device, tokens = rows.device, rows.shape[0]
                filled = [j * length + i for j, a in enumerate(present) for i in range(counts[a + 1])]
                filled_t = torch.tensor(filled, dtype=torch.long, device=device)
                slots = torch.full((len(present) * length,), tokens, dtype=torch.long, device=device)
                slots.index_copy_(0, filled_t, torch.arange(tokens, device=device))
                pad_rows = torch.full_like(slots, self.ids.numel())
                rows = pad_rows.index_copy_(0, filled_t, rows)
            self._padded = (rows, slots, torch.tensor(present, dtype=torch.long, device=rows.device), length)
        return self._padded

    def __repr__(self) -> str:
        return f"AdapterGroups(tokens_shape={list(self.tokens_shape)}, counts={list(self.counts)})"


def run_grouped(
    groups: AdapterGroups,
    rows: Rows,
    base_fn: Callable[..., torch.Tensor],
    adapter_fn: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """y[t] = adapter_fn(a, *rows of a's tokens) for a = ids[t] >= 0, base_fn(*rows) for ids[t] = -1.

    ``rows``: per-token tensors [T, ...] (or None) handed to the functions segment by segment. Rows are
    sorted by adapter once (stable), each adapter's segment is processed on its own, and the outputs are
    gathered back into token order.
    """
    counts = groups.counts
    present = [i for i, n in enumerate(counts) if n]
    if len(present) <= 1:  # one adapter (or none) for the whole batch: no permutation
        a = present[0] - 1 if present else -1
        return base_fn(*rows) if a < 0 else adapter_fn(a, *rows)
    perm = groups.perm
    sorted_rows = [None if t is None else t.index_select(0, perm) for t in rows]
    outs, start = [], 0
    for i, n in enumerate(counts):
        if n == 0:
            continue
        seg = [None if t is None else t[start : start + n] for t in sorted_rows]
        outs.append(base_fn(*seg) if i == 0 else adapter_fn(i - 1, *seg))
        start += n
    return torch.cat(outs).index_select(0, groups.inverse)


def run_reference_loop(
    ids: torch.Tensor,
    num_adapters: int,
    rows: Rows,
    base: torch.Tensor,
    adapter_fn: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """``base`` [T, ...] with the rows of each adapter a replaced by adapter_fn(a, *those rows): a plain loop
    over the A adapters (the reference; ids -1 keep ``base``)."""
    out = base
    for a in range(num_adapters):
        idx = (ids == a).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        seg = [None if t is None else t.index_select(0, idx) for t in rows]
        out = out.index_put((idx,), adapter_fn(a, *seg).to(out.dtype))
    return out


def _pick(t: torch.Tensor | None, a: int) -> torch.Tensor | None:
    return None if t is None else t[a]


def _probs(ri: torch.Tensor | None, router: torch.Tensor | None, top_k, renormalize) -> torch.Tensor | None:
    """Sentence-routing probabilities [T_a, E] of one adapter's router from its tokens' router-input rows."""
    if ri is None:
        return None
    return reference.router_probs(ri, router, top_k=top_k, renormalize=renormalize)


# ------------------------------------------------------------------------------------------
# "torch": gathered per token (small batches naming several adapters)
# ------------------------------------------------------------------------------------------

#: MoV batches of at most this many tokens that name more than one adapter gather each token's parameters
#: instead of running one single-adapter call per adapter (decoding a batch of sequences over many
#: adapters: the per-adapter calls' fixed costs, not their arithmetic, dominate there).
GATHER_MAX_TOKENS = 64


def _use_gather(groups: AdapterGroups) -> bool:
    if groups.ids.numel() > GATHER_MAX_TOKENS or groups.ids.numel() == 0:
        return False
    return groups.present > 1


def _gathered_probs(router_in, router_t, top_k, renormalize, cd):
    """p [T, E] (compute dtype) from router_in [T, R] and per-token routers router_t [T, R, E]."""
    logits = torch.bmm(router_in.to(cd).unsqueeze(1), router_t.to(cd)).squeeze(1)
    return _router.select(torch.softmax(logits, dim=-1), top_k, renormalize, dim=-1)


def _gathered_mov(h2d, ids, router, experts, ri, top_k, renormalize):
    """mov with each token's own router [D, E] and experts [G, E, D]; ids -1: h unchanged."""
    t = h2d.shape[0]
    groups, num_experts, dim = experts.shape[1:]
    cd = reference.compute_dtype(h2d.dtype)
    valid = ids >= 0
    idx = ids.clamp(min=0)
    h = h2d.to(cd).view(t, groups, dim)
    experts_t = experts[idx].to(cd)  # [T, G, E, D]
    if router is None:
        s = experts_t[:, :, 0, :]
    else:
        router_t = router[idx]  # [T, D or R, E]
        if ri is None:  # logits[t, g, e] = Σ_d h[t, g, d] router_t[t, d, e]
            p = _router.select(torch.softmax(torch.bmm(h, router_t.to(cd)), dim=-1), top_k, renormalize, dim=-1)
        else:
            p = _gathered_probs(ri, router_t, top_k, renormalize, cd).unsqueeze(1).expand(t, groups, num_experts)
        s = torch.einsum("tge,tged->tgd", p, experts_t)
    s = torch.where(valid.view(t, 1, 1), s, torch.ones((), dtype=cd, device=s.device))
    return (h * s).reshape(t, groups * dim).to(h2d.dtype)


def _output_from_base(like: torch.Tensor, base: torch.Tensor | None, n: int, owned: bool, pad_row: bool = False):
    """The [T, n] output the inference forms write the adapters into, starting as the base: ``base`` itself where
    the caller owns it (``owned``), else :func:`pemoe.ops.molora._adapter_output` (a contiguous copy; zeros like
    ``like`` without a base); with ``pad_row``, a new tensor with one more zero row, where the batched forms' pad
    rows land."""
    if pad_row:
        return like.new_zeros(like.shape[0] + 1, n) if base is None else F.pad(base, (0, 0, 0, 1))
    return base if owned and base is not None else _adapter_output(like, base, n)


def _batched_mov(h2d, groups, router, experts, ri, top_k, renormalize, owned):
    """mov over the adapters present when autograd records nothing, for the batches the gathered strategy takes,
    in a fixed number of ops: the rows naming an adapter laid out [P, L, G, D] as :meth:`AdapterGroups.padded`
    (each adapter present padded with zero rows to the longest count L), then, as the gathered strategy does
    and in the compute dtype, logits = h_p @ router_p per adapter (``bmm``; sentence routing: the router-input
    rows), p = top-k(softmax(logits)), s = p @ experts_p per adapter and group (``bmm``; (IA)3: the one expert
    vector), y = h·s, copied back into the tokens' rows of the output (``h2d`` itself when the caller owns it,
    ``owned``; else a copy; rows of id -1 keep h). Each adapter's parameters are read in place (an
    ``index_select`` of the adapters present when some are absent), not gathered per token."""
    rows, slots, present, length = groups.padded()
    num_adapters, groups_, num_experts, dim = experts.shape
    adapters, tokens = present.shape[0], h2d.shape[0]
    cd = reference.compute_dtype(h2d.dtype)
    out = _output_from_base(h2d, h2d, h2d.shape[1], owned, slots is not None)
    h = out.index_select(0, rows).to(cd).view(adapters, length * groups_, dim)
    ex = experts if adapters == num_adapters else experts.index_select(0, present)
    if router is None:  # (IA)3: s is the one expert vector per group
        s = ex[:, :, 0, :].to(cd).unsqueeze(1).expand(adapters, length, groups_, dim)
    else:
        routers = router if adapters == num_adapters else router.index_select(0, present)
        if ri is None:  # logits[p, l·G + g, e] = Σ_d h[p, l, g, d] router_p[d, e]
            p = torch.softmax(torch.bmm(h, routers.to(cd)), dim=-1).view(adapters, length, groups_, num_experts)
        else:
            rp = (F.pad(ri, (0, 0, 0, 1)) if slots is not None else ri).index_select(0, rows)
            logits = torch.bmm(rp.to(cd).view(adapters, length, -1), routers.to(cd))
            p = torch.softmax(logits, dim=-1).unsqueeze(2).expand(adapters, length, groups_, num_experts)
        p = _router.select(p, top_k, renormalize, dim=-1)
        # s[p, g, l, d] = Σ_e p[p, l, g, e] experts_p[g, e, d]: one bmm over the (adapter, group) pairs
        pg = p.permute(0, 2, 1, 3).reshape(adapters * groups_, length, num_experts)
        s = torch.bmm(pg, ex.to(cd).reshape(adapters * groups_, num_experts, dim))
        s = s.view(adapters, groups_, length, dim).transpose(1, 2)
    y = (h.view(adapters, length, groups_, dim) * s).to(h2d.dtype)
    out.index_copy_(0, rows, y.reshape(adapters * length, groups_ * dim))
    return out if slots is None else out[:tokens]


# ------------------------------------------------------------------------------------------
# "torch": MoLoRA segments without autograd (inference)
# ------------------------------------------------------------------------------------------


def _records_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


#: id(lora_a) (a bank's stacked parameter) -> (weak reference to it, {(x dtype, with router): (stamp, per-adapter
#: shrink operands)}); an entry goes when its lora_a does (keyed by id: tensors compare elementwise)
_SHRINK_OPERANDS: dict[int, tuple[weakref.ref, dict]] = {}


def _site_entry(lora_a: torch.Tensor) -> dict:
    key = id(lora_a)
    entry = _SHRINK_OPERANDS.get(key)
    if entry is None or entry[0]() is not lora_a:

        def forget(ref: weakref.ref, key: int = key) -> None:
            if _SHRINK_OPERANDS.get(key, (None,))[0] is ref:
                del _SHRINK_OPERANDS[key]

        entry = _SHRINK_OPERANDS[key] = (weakref.ref(lora_a, forget), {})
    return entry[1]


def _stamp(t: torch.Tensor) -> tuple:
    """What identifies a tensor's current values without reading them: storage address, version counter
    (bumped by every in-place change: optimizer steps, ``copy_``), dtype, device, shape and strides."""
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), t.stride())


def _shrink_operands(lora_a, router, dtype) -> torch.Tensor | None:
    """Every adapter's :func:`pemoe.ops.molora.shrink_operand` for x of ``dtype``, stacked [A, K, W] (a re-laid,
    padded copy of lora_a (| router)), built once per bank site and kept while lora_a (and the router) keep
    their values; adapter a's is ``[a]``, the tensor the single-adapter forward builds at every call (each
    starts 64-byte aligned: W is a multiple of 16), so the same GEMM operand. Only for calls where autograd
    records nothing (the operands are detached). None where nothing is worth keeping (16-bit LoRA: A_cat is
    a view of lora_a[a]) or the parameters carry no version counter (inference tensors)."""
    if router is None and lora_a.shape[1] == 1 and lora_a.dtype == dtype and dtype != reference.compute_dtype(dtype):
        return None
    if lora_a.is_inference() or (router is not None and router.is_inference()):
        return None
    stamp = (_stamp(lora_a), None if router is None else (weakref.ref(router), _stamp(router)))
    per_site = _site_entry(lora_a)
    key = (dtype, router is not None)
    hit = per_site.get(key)
    if hit is not None and _same_stamp(hit[0], stamp, router):
        return hit[1]
    operands = torch.stack([shrink_operand(lora_a[a], _pick(router, a), dtype) for a in range(lora_a.shape[0])])
    per_site[key] = (stamp, operands)
    return operands


def _same_stamp(old: tuple, new: tuple, router: torch.Tensor | None) -> bool:
    if old[0] != new[0] or (old[1] is None) != (new[1] is None):
        return False
    return old[1] is None or (old[1][0]() is router and old[1][1] == new[1][1])


def _molora_rows(a, x_rows, out_rows, ri_rows, lora_a, lora_b, router, operands, scale, top_k, renormalize):
    """Adapter a's single-adapter forward steps on its rows: shrink and router GEMM on ``x_rows``, routing
    weights, then ``addmm_`` of scale·U′ @ B_cat onto ``out_rows`` (in place). ``operands``: the kept shrink
    operands (:func:`_shrink_operands`) or None."""
    r = _pick(router, a)
    probs = _probs(ri_rows, r, top_k, renormalize)
    operand = None if operands is None else operands[a]
    u, logits = _shrink_and_logits(x_rows, lora_a[a], r if probs is None else None, operand)
    expand_into(out_rows, u, logits, probs, lora_b[a], scale, top_k, renormalize)


def _segments_molora(x2d, base2d, groups, lora_a, lora_b, router, ri, scale, top_k, renormalize):
    """MoLoRA grouped by adapter when autograd records nothing: the single-adapter forward's steps
    (:class:`pemoe.ops.molora.MoLoRAFunction`: shrink and router logits, routing weights, U·p, then
    ``addmm_`` of scale·U′ @ B_cat onto the base rows) on each adapter's rows, written into one buffer of the
    adapter tokens sorted by adapter (no autograd Function, no per-segment copies), then put back in token
    order. Every GEMM has the grouped form's operands and shape, so the outputs are the same bits."""
    n = lora_b.shape[-1]
    counts = groups.counts
    perm = groups.perm[counts[0] :]  # the tokens naming an adapter, grouped by adapter
    xs = x2d.index_select(0, perm)
    ys = x2d.new_zeros(perm.shape[0], n) if base2d is None else base2d.index_select(0, perm)
    ris = None if ri is None else ri.index_select(0, perm)
    operands = _shrink_operands(lora_a, router if ri is None else None, x2d.dtype)
    start = 0
    for a, count in enumerate(counts[1:]):
        if count == 0:
            continue
        rows = slice(start, start + count)
        start += count
        ri_rows = None if ris is None else ris[rows]
        _molora_rows(a, xs[rows], ys[rows], ri_rows, lora_a, lora_b, router, operands, scale, top_k, renormalize)
    if counts[0] == 0:  # every token names an adapter: ys back in token order
        return ys.index_select(0, groups.inverse)
    out = x2d.new_zeros(x2d.shape[0], n) if base2d is None else base2d.clone()
    return out.index_copy_(0, perm, ys)


# ------------------------------------------------------------------------------------------
# "torch": MoLoRA batched over the adapters without autograd (inference, decoding)
# ------------------------------------------------------------------------------------------

#: MoLoRA inference batches of at most this many tokens that name several ids run batched over the adapters
#: present (:func:`_batched_molora`: one shrink GEMM per adapter, every other step once for all adapters)
#: instead of the sorted form's seven small ops per adapter (decoding a batch of sequences over many adapters:
#: there the per-adapter ops' fixed costs, not their arithmetic, dominate). Larger batches spend most of a
#: site's time in arithmetic, where the sorted (or runs) form's GEMMs are the single-adapter op's own (one
#: thread, CPU, E = 8, r = 4 over 8 adapters, 512 -> 512: 0.5x the sorted form's time at 32 tokens, 0.7x at
#: 128, 0.8x at 256; 1408 -> 512 at 256 tokens: 1.0x).
BATCHED_MAX_TOKENS = 128

#: ... and only where padding every adapter present to the longest one's rows at most multiplies the rows
#: by this much (P·L <= this · T): pad rows cost batched products and copies without output (MoLoRA: the
#: routing and the expand; MoV, :func:`_batched_mov`: the router and the expert merge).
BATCHED_MAX_PADDING = 2


def _use_batched(groups: AdapterGroups) -> bool:
    if groups.ids.numel() > BATCHED_MAX_TOKENS or groups.present < 2:
        return False
    return _padding_ok(groups)


def _padding_ok(groups: AdapterGroups) -> bool:
    """Whether padding every adapter present to the longest one's rows stays within BATCHED_MAX_PADDING."""
    return groups.adapters_present * groups.longest <= BATCHED_MAX_PADDING * groups.ids.numel()


def _padded_shrink(x2d, groups, lora_a, router):
    """[U | logits | 0] = x_p @ [A_cat | router | 0] per adapter present, laid out [P, L, W] as
    :meth:`AdapterGroups.padded` (pad rows zero; float32 where a router reads 16-bit x): one ``bmm`` over the
    kept operands where every adapter of the bank is present with the same count (:func:`_bmm_shrink`),
    else :func:`_shrink_each`."""
    cd = reference.compute_dtype(x2d.dtype)
    xs = x2d.index_select(0, groups.adapter_rows)
    if router is not None and xs.dtype != cd:
        xs = xs.to(cd)  # the float32 router reads float32 x, and U comes from the same GEMM
    operands = _shrink_operands(lora_a, router, x2d.dtype)
    if _bmm_shrink(groups, operands, xs.dtype, cd):
        return torch.bmm(xs.view(groups.adapters_present, groups.longest, -1), operands)
    return _shrink_each(xs, groups, lora_a, router, operands, x2d.dtype)


def _bmm_shrink(groups: AdapterGroups, operands: torch.Tensor | None, dtype: torch.dtype, cd: torch.dtype) -> bool:
    """Whether the batched shrink runs as one ``bmm``: the sorted x (``dtype``) and the kept operands in the compute
    dtype ``cd`` (float32 or float64; 16-bit x read by a router converted), every adapter present with the same
    count (no pad rows). There each adapter's block of the ``bmm`` sums as its own GEMM does (MKL: the operands'
    rows of 64 bytes or more); a padded adapter with fewer than 4 rows would not, nor need a 16-bit GEMM."""
    return operands is not None and operands.dtype == dtype == cd and groups.even


def _shrink_each(xs, groups, lora_a, router, operands, dtype):
    """The batched shrink one GEMM per adapter present, each on its own rows of ``xs`` (the adapter tokens
    sorted by adapter) into its own output, as the single-adapter op runs it; concatenated, padded, [P, L, W].
    ``operands``: the kept ones, or None (built here: 16-bit LoRA's views of lora_a[a], inference tensors)."""
    counts = groups.counts
    rows, slots, present, length = groups.padded()
    ids = [a for a in range(lora_a.shape[0]) if counts[a + 1]]
    if operands is None:
        operands = {a: shrink_operand(lora_a[a], _pick(router, a), dtype) for a in ids}
    sizes = [counts[a + 1] for a in ids]
    ul = torch.cat([x_a @ operands[a] for a, x_a in zip(ids, xs.split(sizes), strict=True)])
    if slots is not None:
        ul = F.pad(ul, (0, 0, 0, 1)).index_select(0, slots)
    return ul.view(len(ids), length, -1)


def _batched_molora(x2d, base2d, groups, lora_a, lora_b, router, ri, scale, top_k, renormalize, base_owned):
    """MoLoRA over the adapters present when autograd records nothing, batched: the single-adapter forward's steps
    with one op each for every adapter together.

    The shrink and router GEMM [U | logits | 0] = x_p @ [A_cat | router | 0] runs on the tokens naming an
    adapter, sorted by adapter and laid out [P, L, ·], each adapter present padded with zero rows to the
    longest count L (:func:`_padded_shrink`: one ``bmm`` where every adapter is present with L rows, else one
    GEMM per adapter, each with the single-adapter op's bits). The rest runs once for all adapters: routing
    weights p = top-k(softmax(logits)) over the experts of logits laid out [P, E, L] (the single-adapter op's
    [E, T]; sentence routing: each token's router-input row and its adapter's router), U′ = U·p rounded to
    the output's dtype, and y_p = base_p + scale · U′ @ B_cat per adapter (``baddbmm_`` on the base rows laid
    out alike: addmm_'s arithmetic), back in token order (where a token names no adapter or an adapter is
    padded: copied into the tokens' rows of the output, the base itself where the caller owns it; rows of id
    -1 keep the base). Pad rows are exact zeros through every step and land in one extra row, dropped."""
    n = lora_b.shape[-1]
    num_adapters, num_experts, _, rank = lora_a.shape
    rows, slots, present, length = groups.padded()
    adapters, tokens, er = groups.adapters_present, x2d.shape[0], num_experts * rank
    reads = router if ri is None else None  # the router the shrink GEMM also runs (none: sentence routing)
    ul = _padded_shrink(x2d, groups, lora_a, reads)
    u = ul.narrow(2, 0, er)
    if reads is not None:
        logits = ul.narrow(2, er, num_experts).transpose(1, 2)
        p = _router.select(torch.softmax(logits, dim=1), top_k, renormalize, dim=1).transpose(1, 2)
    elif ri is not None:
        rp = (F.pad(ri, (0, 0, 0, 1)) if slots is not None else ri).index_select(0, rows)
        routers = router if adapters == num_adapters else router.index_select(0, present)
        p = reference.router_probs(rp.view(adapters, length, -1), routers, top_k=top_k, renormalize=renormalize)
    else:
        p = None
    if p is not None:
        p = p.unsqueeze(-1) if p.dtype == u.dtype else p.unsqueeze(-1).to(u.dtype)
        u = torch.mul(u.view(adapters, length, num_experts, rank), p).view(adapters, length, er)
    dtype = x2d.dtype if base2d is None else base2d.dtype
    if u.dtype != dtype:
        u = u.to(dtype)
    b_cat = (lora_b if lora_b.dtype == dtype else lora_b.to(dtype)).reshape(num_adapters, er, n)
    if adapters < num_adapters:
        b_cat = b_cat.index_select(0, present)
    if groups.counts[0] == 0 and slots is None:  # the sorted rows are every token's: expand onto them, unsort
        base_p = x2d.new_zeros(tokens, n) if base2d is None else base2d.index_select(0, rows)
        y = base_p.view(adapters, length, n).baddbmm_(u, b_cat, alpha=scale)
        return y.view(tokens, n).index_select(0, groups.inverse)
    out = _output_from_base(x2d, base2d, n, base_owned, slots is not None)
    base_p = out.index_select(0, rows).view(adapters, length, n)
    y = base_p.baddbmm_(u, b_cat, alpha=scale)
    out.index_copy_(0, rows, y.view(adapters * length, n))
    return out if slots is None else out[:tokens]


# ------------------------------------------------------------------------------------------
# "torch": runs of consecutive rows without autograd (inference, prefill)
# ------------------------------------------------------------------------------------------

#: Inference calls whose groups come as runs of consecutive rows (:attr:`AdapterGroups.runs`: one id per
#: sequence) at least this long on average work on row views of the activations, in place in the output,
#: with no permutation copies; shorter runs (decoding: one row per sequence) keep the sorted form, whose one
#: GEMM per adapter beats many tiny ones.
RUN_MIN_MEAN_ROWS = 16

#: ... and only where the row copies the runs form saves come to at least this many elements per run on
#: average (rows times ``copied``, the elements per row the sorted form copies and the runs form does not:
#: MoLoRA K + 2N, MoV 2·W on the frozen GEMM's or the activation's fresh output, W on a caller's h): each run
#: costs its own handful of small ops (routing weights, merge, scaling), which the saved copies pay for only
#: on wide enough rows (one thread, CPU: MoV on 64-row runs of a caller's h of width 256 runs at 0.9x the
#: sorted form's speed, of width 1408 at 1.8x; MoLoRA 512 -> 256 on 64-row runs at 1.4x).
RUN_MIN_MEAN_ELEMENTS = 32768


def _use_runs(groups: AdapterGroups, copied: int) -> bool:
    runs = groups.runs
    if not runs:
        return False
    rows = sum(groups.counts)
    return rows >= RUN_MIN_MEAN_ROWS * len(runs) and rows * copied >= RUN_MIN_MEAN_ELEMENTS * len(runs)


def _runs_molora(x2d, base2d, groups, lora_a, lora_b, router, ri, scale, top_k, renormalize, base_owned):
    """MoLoRA over runs of consecutive rows when autograd records nothing: the output starts as the base
    (``base2d`` itself when the caller owns it, ``base_owned``; else one contiguous copy; zeros for None) and
    each run of adapter a gets the single-adapter forward's steps on its row views: shrink and router GEMM
    on x[run], routing weights, ``addmm_`` of scale·U′ @ B_cat onto out[run]. Rows of id -1 keep the base.
    The per-run GEMMs have the sorted form's operands on fewer rows where an adapter has several runs (the
    same bits where each adapter has one run, else within float32 GEMM rounding)."""
    out = _output_from_base(x2d, base2d, lora_b.shape[-1], base_owned)
    operands = _shrink_operands(lora_a, router if ri is None else None, x2d.dtype)
    for start, stop, a in groups.runs:
        if a < 0:
            continue
        rows = slice(start, stop)
        ri_rows = None if ri is None else ri[rows]
        _molora_rows(a, x2d[rows], out[rows], ri_rows, lora_a, lora_b, router, operands, scale, top_k, renormalize)
    return out


def _mov_scaling_rows(a, h, ri_rows, router, experts, top_k, renormalize):
    """Adapter a's scaling s [rows, G, D] for its rows h [rows, G, D]: the single-adapter forward's router
    softmax, routing weights and expert merge."""
    r, e = _pick(router, a), experts[a]
    probs = _probs(ri_rows, r, top_k, renormalize)
    p = _routing_weights(h, r, e, probs, router_softmax(h, r, e, probs), top_k, renormalize)
    return _scaling(p, e, h.dtype)


def _runs_mov(h2d, groups, router, experts, ri, top_k, renormalize, activation, owned):
    """MoV over runs of consecutive rows when autograd records nothing: y = act(h2d) (fresh) for the FFN
    site, else h2d itself when the caller owns it (``owned``: the frozen GEMM's fresh output) or one copy;
    then each run of adapter a scales its rows of y in place by the single-adapter forward's steps (router
    softmax, routing weights, the expert merge s, y[run] *= s). Rows of id -1 keep h (act(h)). The same
    elementwise products as the sorted form; the router and merge products run per run."""
    groups_, _, dim = experts.shape[1:]
    if activation is not None:
        y = reference.ACTIVATIONS[activation](h2d)
    else:
        y = _output_from_base(h2d, h2d, h2d.shape[1], owned)
    for start, stop, a in groups.runs:
        if a < 0:
            continue
        rows = slice(start, stop)
        h = y[rows].view(stop - start, groups_, dim)
        h.mul_(_mov_scaling_rows(a, h, None if ri is None else ri[rows], router, experts, top_k, renormalize))
    return y


# ------------------------------------------------------------------------------------------
# "torch": grouped by adapter (or gathered per token, see above)
# ------------------------------------------------------------------------------------------


def _segments_mov(h2d, groups, router, experts, ri, top_k, renormalize, activation):
    """MoV grouped by adapter when autograd records nothing: the single-adapter forward's steps
    (:func:`pemoe.ops.mov.mov_forward`: router softmax, routing weights, the expert merge s, then h·s, with h =
    act(z) per segment for the FFN site) on each adapter's rows of h sorted by adapter once, each product
    written into its rows of one output buffer in the same order (no autograd Function, no per-segment copies),
    then put back in token order. The same ops on the same rows as the grouped Functions: the same bits."""
    groups_, _, dim = experts.shape[1:]
    act = None if activation is None else reference.ACTIVATIONS[activation]
    hs = h2d.index_select(0, groups.perm)
    ris = None if ri is None else ri.index_select(0, groups.perm)
    ys = torch.empty_like(hs)
    counts = groups.counts
    if counts[0]:  # the base rows: h unchanged, act(z) for the FFN site
        ys[: counts[0]] = hs[: counts[0]] if act is None else act(hs[: counts[0]])
    start = counts[0]
    for a, count in enumerate(counts[1:]):
        if count == 0:
            continue
        rows = slice(start, start + count)
        start += count
        h = (hs[rows] if act is None else act(hs[rows])).view(count, groups_, dim)
        s = _mov_scaling_rows(a, h, None if ris is None else ris[rows], router, experts, top_k, renormalize)
        torch.mul(h, s, out=ys[rows].view(count, groups_, dim))
    return ys.index_select(0, groups.inverse)


def _mov_segments(h2d, groups, router, experts, ri, top_k, renormalize, activation=None, owned=False):
    """MoV per adapter segment on h2d [T, G·D] (or on act(z) for the FFN site, ``activation`` given);
    ``owned``: h2d is the caller's fresh intermediate, which inference may overwrite."""
    if _use_gather(groups):
        h = h2d if activation is None else reference.ACTIVATIONS[activation](h2d)
        if not _records_grad(h2d, router, experts, ri) and _padding_ok(groups):
            return _batched_mov(h, groups, router, experts, ri, top_k, renormalize, owned or activation is not None)
        return _gathered_mov(h, groups.ids, router, experts, ri, top_k, renormalize)
    if groups.present > 1 and not _records_grad(h2d, router, experts, ri):
        if _use_runs(groups, h2d.shape[1] * (1 if activation is None and not owned else 2)):
            return _runs_mov(h2d, groups, router, experts, ri, top_k, renormalize, activation, owned)
        return _segments_mov(h2d, groups, router, experts, ri, top_k, renormalize, activation)

    def adapter(a, h_s, ri_s):
        r = _pick(router, a)
        probs = _probs(ri_s, r, top_k, renormalize)
        if activation is None:
            return MoVFunction.apply(h_s, None, None, r, experts[a], probs, top_k, renormalize)
        return MoVActFunction.apply(h_s, r, experts[a], probs, top_k, renormalize, activation)

    def base(h_s, ri_s):
        return h_s if activation is None else reference.ACTIVATIONS[activation](h_s)

    return run_grouped(groups, [h2d, ri], base, adapter)


def grouped_mov(h2d, groups, router, experts, ri, top_k, renormalize):
    """mov with per-token adapters on flattened h [T, G·D]; returns [T, G·D]."""
    return _mov_segments(h2d, groups, router, experts, ri, top_k, renormalize)


def grouped_mov_linear(x2d, weight, bias, groups, router, experts, ri, top_k, renormalize):
    """mov(x Wᵀ + b) with per-token adapters; the GEMM runs once over all tokens."""
    return _mov_segments(F.linear(x2d, weight, bias), groups, router, experts, ri, top_k, renormalize, owned=True)


def grouped_mov_ffn(x2d, wi_0, wi_1, wo, groups, router, experts, ri, activation, top_k, renormalize):
    """(mov(act(x wi_0ᵀ)) [* x wi_1ᵀ]) woᵀ with per-token adapters; the three GEMMs run once over all tokens."""
    a = _mov_segments(F.linear(x2d, wi_0), groups, router, experts, ri, top_k, renormalize, activation)
    if wi_1 is not None:
        a = a * F.linear(x2d, wi_1)
    return F.linear(a, wo)


def grouped_molora(x2d, base2d, groups, lora_a, lora_b, router, ri, scale, top_k, renormalize, base_owned=False):
    """base + scale·Σ_e p_e (x A_e) B_e with per-token adapters; ``base2d`` [T, N] (None: zeros);
    ``base_owned``: base2d is the caller's fresh frozen output, which inference may write into."""
    n = lora_b.shape[-1]
    if groups.present > 1 and not _records_grad(x2d, base2d, lora_a, lora_b, router, ri):
        args = (x2d, base2d, groups, lora_a, lora_b, router, ri, scale, top_k, renormalize)
        if _use_runs(groups, x2d.shape[1] + 2 * n):
            return _runs_molora(*args, base_owned)
        if _use_batched(groups):
            return _batched_molora(*args, base_owned)
        return _segments_molora(*args)

    def adapter(a, x_s, base_s, ri_s):
        r = _pick(router, a)
        probs = _probs(ri_s, r, top_k, renormalize)
        return MoLoRAFunction.apply(x_s, None, None, base_s, lora_a[a], lora_b[a], r, probs, scale, top_k, renormalize)

    def base(x_s, base_s, ri_s):
        return x_s.new_zeros(x_s.shape[0], n) if base_s is None else base_s

    return run_grouped(groups, [x2d, base2d, ri], base, adapter)


# ------------------------------------------------------------------------------------------
# "reference": a loop over adapters through the single-adapter reference
# ------------------------------------------------------------------------------------------


def reference_mov(h2d, ids, router, experts, ri, top_k, renormalize):
    def adapter(a, h_s, ri_s):
        return reference.mov(h_s, _pick(router, a), experts[a], top_k=top_k, renormalize=renormalize, router_input=ri_s)

    return run_reference_loop(ids, experts.shape[0], [h2d, ri], h2d, adapter)


def reference_mov_linear(x2d, weight, bias, ids, router, experts, ri, top_k, renormalize):
    def adapter(a, x_s, ri_s):
        return reference.mov_linear(
            x_s, weight, _pick(router, a), experts[a], bias=bias, top_k=top_k, renormalize=renormalize,
            router_input=ri_s,
        )  # fmt: skip

    return run_reference_loop(ids, experts.shape[0], [x2d, ri], F.linear(x2d, weight, bias), adapter)


def reference_mov_ffn(x2d, wi_0, wi_1, wo, ids, router, experts, ri, activation, top_k, renormalize):
    def adapter(a, x_s, ri_s):
        return reference.mov_ffn(
            x_s, wi_0, wo, _pick(router, a), experts[a], wi_1=wi_1, activation=activation, top_k=top_k,
            renormalize=renormalize, router_input=ri_s,
        )  # fmt: skip

    h = reference.ACTIVATIONS[activation](F.linear(x2d, wi_0))
    if wi_1 is not None:
        h = h * F.linear(x2d, wi_1)
    return run_reference_loop(ids, experts.shape[0], [x2d, ri], F.linear(h, wo), adapter)


def reference_molora_linear(x2d, weight, bias, ids, lora_a, lora_b, router, ri, scale, top_k, renormalize):
    def adapter(a, x_s, ri_s):
        return reference.molora_linear(
            x_s, weight, lora_a[a], lora_b[a], _pick(router, a), scale=scale, bias=bias, top_k=top_k,
            renormalize=renormalize, router_input=ri_s,
        )  # fmt: skip

    return run_reference_loop(ids, lora_a.shape[0], [x2d, ri], F.linear(x2d, weight, bias), adapter)


def reference_molora_adapter(x2d, base2d, ids, lora_a, lora_b, router, ri, scale, top_k, renormalize):
    def adapter(a, x_s, base_s, ri_s):
        return reference.molora_adapter(
            x_s, lora_a[a], lora_b[a], _pick(router, a), scale=scale, base=base_s, top_k=top_k,
            renormalize=renormalize, router_input=ri_s,
        )  # fmt: skip

    start = x2d.new_zeros(x2d.shape[0], lora_b.shape[-1]) if base2d is None else base2d
    return run_reference_loop(ids, lora_a.shape[0], [x2d, base2d, ri], start, adapter)
