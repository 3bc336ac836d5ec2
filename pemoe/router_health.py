"""Router health: per-site routing statistics, a load-balancing loss and the per-task routing plot.

The paper reports that MoV/MoLoRA routers can collapse onto one expert with large batches. A
:class:`RouterMonitor` watches every routed adapter site of an injected model (MoV and MoLoRA, token and
sentence routing, T5 and decoder-only models) during the model's own forward and reports, per site:

* ``load`` [E]: the mean routing probability of each expert, P̄_e = (1/T) Σ_t p_{t,e} over the tokens the
  site saw (MoV sites average over their G heads too; padding tokens are left out, see below);
* ``max_prob``: max_e P̄_e, the largest mean expert probability (1/E when balanced, 1 when collapsed);
* ``entropy``: the mean per-token routing entropy (1/T) Σ_t H(p_t), H(p) = -Σ_e p_e log p_e, in nats
  (log E for a uniform router, 0 for one-hot routing). A low entropy with a balanced load means confident,
  specialised routing; a low entropy with ``max_prob`` near 1 means collapse.

No second forward: forward (pre-)hooks on the sites recompute the router softmax from the site's input,
a [T, E] product per site (sentence routing: [B, E]). Where the router reads an activation the site does
not receive, the hook derives it: a MoV k/v projection reads x·Wᵀ + b per head, so the logits are computed
as x·(W_gᵀ·router) + b_g·router, a [T, G·E] product instead of the [T, N] projection (the same numbers up to
float32 rounding); a fused gated-FFN site (pemoe's T5 FFN, :class:`~pemoe.placements.FusedGatedMLP`) reads
act(x·wi_0ᵀ), which the hook recomputes (one extra [T, F] product per FFN site; the cost of watching it).
Adapter parameters and the ops are read, never changed.

Padding: the monitor reads ``attention_mask`` (and ``decoder_attention_mask``, else ``labels != -100`` for
the decoder of an encoder-decoder model) from the model's forward arguments and weights each token by it
when the mask matches the site's [B, S] token shape (T5 cross-attention k/v read the encoder's tokens).

Load-balancing loss (:meth:`RouterMonitor.balance_loss`, off unless asked for): per site the KL divergence
of the mean routing distribution from uniform, KL(P̄ ‖ U) = Σ_e P̄_e log(E·P̄_e) = log E − H(P̄), averaged
over the sites. It is zero exactly when the load is uniform and gives every router a gradient. Chosen over
Switch Transformer's E·Σ_e f_e·P̄_e because that loss counts f_e, the fraction of tokens *dispatched* to
expert e (an argmax, no gradient): under soft merging every expert sees every token, so f_e is only a hard
proxy of P̄_e; the KL form penalises exactly what ``max_prob`` reports and leaves each token free to route
confidently (a low per-token entropy costs nothing as long as the mean load is balanced).

:func:`routing_by_task` and :func:`plot_routing` give the paper's Figure 5 for any model: mean expert
probability per task (rows) per expert (columns), one heat-map panel per site.
"""

from __future__ import annotations

import inspect
import math
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "SiteStats",
    "RouterMonitor",
    "routed_sites",
    "routing_by_task",
    "plot_routing",
    "RoutingPlot",
    "stats_to_logs",
    "uniform_entropy",
]


_CROSS_KV = re.compile(r"(EncDecAttention\.[kv]|encoder_attn\.[kv]_proj)$")


@dataclass(frozen=True)
class SiteStats:
    """Routing statistics of one site over the tokens seen since the last reset (see the module docstring)."""

    load: tuple[float, ...]  # [E] mean probability per expert; sums to 1 (to 1 − dropped mass under top-k)
    max_prob: float
    entropy: float  # mean per-token entropy, nats
    tokens: float  # tokens (times heads for MoV) weighted in

    def to_dict(self) -> dict:
        return {"entropy": self.entropy, "max_prob": self.max_prob, "load": list(self.load)}


def _routing_options(adapter: nn.Module) -> tuple[int | None, bool]:
    from pemoe.layers import MoVLinear

    holder = adapter.site if isinstance(adapter, MoVLinear) else adapter
    return holder.top_k, holder.renormalize


def _probs(logits: torch.Tensor, top_k: int | None, renormalize: bool) -> torch.Tensor:
    p = torch.softmax(logits.float(), dim=-1)
    if top_k is not None:
        p = p * torch.zeros_like(p).scatter_(-1, p.topk(top_k, dim=-1).indices, 1.0)
        if renormalize:
            p = p / p.sum(dim=-1, keepdim=True)
    return p


def _router_in(adapter: nn.Module, explicit: torch.Tensor | None) -> torch.Tensor | None:
    """The sentence-routing vectors [B, R] the adapter will read, or None for token routing."""
    if adapter.router_input_features is None:
        return None
    return adapter._resolve_router_input(explicit)


def _sentence(p_seq: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """[B, E] probabilities broadcast over tokens of shape ``lead`` = [B, S, ...]."""
    return p_seq.reshape(p_seq.shape[:1] + (1,) * (len(lead) - 1) + p_seq.shape[1:]).expand(*lead, p_seq.shape[-1])


@dataclass
class _Watch:
    """How to get one site's probabilities: ``fn(args, kwargs) -> p`` [B, S, (G,) E] at the module ``module``."""

    key: str
    module: nn.Module
    fn: object
    num_experts: int


def _watch(model: nn.Module, key: str, site) -> _Watch | None:
    from pemoe.injection import _adapter_module
    from pemoe.layers import MoLoRALinear, MoV, MoVLinear, runs_own_forward
    from pemoe.placements import FusedGatedMLP

    adapter = _adapter_module(model, site)
    router = getattr(adapter, "router", None)
    if router is None:
        return None  # one expert: nothing is routed
    current = getattr(site.parent, site.attr)
    top_k, renorm = _routing_options(adapter)
    E = router.shape[1]

    def arg(args, kwargs, i, name):
        return args[i] if len(args) > i else kwargs.get(name)

    if isinstance(current, MoLoRALinear):

        def fn(args, kwargs):
            x = args[0]
            r = _router_in(current, arg(args, kwargs, 1, "router_input"))
            if r is not None:
                return _sentence(_probs(r.float() @ current.router.float(), top_k, renorm), x.shape[:-1])
            return _probs(x.float() @ current.router.float(), top_k, renorm)

        return _Watch(key, current, fn, E)
    if isinstance(current, MoVLinear):
        s = current.site

        def fn(args, kwargs):
            x = args[0]
            lead = x.shape[:-1] + (s.num_groups,)
            r = _router_in(current, arg(args, kwargs, 1, "router_input"))
            if r is not None:
                return _sentence(_probs(r.float() @ s.router.float(), top_k, renorm), lead)
            if runs_own_forward(current.base):  # quantized base: its own output is the only way to h
                h = current.base(x).float().unflatten(-1, (s.num_groups, s.dim))
                return _probs(h @ s.router.float(), top_k, renorm)
            # logits[t, g] = (x W_gᵀ + b_g) router = x (W_gᵀ router) + b_g router: [T, G·E], no [T, N]
            w = current.base.weight.float().view(s.num_groups, s.dim, -1)  # [G, D, K]
            fold = torch.einsum("gdk,de->kge", w, s.router.float()).flatten(1)  # [K, G·E]
            logits = x.float() @ fold
            b = current.base.bias
            if b is not None:
                logits = logits + (b.float().view(s.num_groups, s.dim) @ s.router.float()).flatten()
            return _probs(logits.unflatten(-1, (s.num_groups, E)), top_k, renorm)

        return _Watch(key, current, fn, E)
    if isinstance(current, FusedGatedMLP) or (isinstance(current, MoV) and site.attr == "mov"):
        # the site reads act(x·wi_0ᵀ), computed inside the fused op: recompute it from the FFN's input
        ffn, mov = (current, current.mov) if isinstance(current, FusedGatedMLP) else (site.parent, current)

        def act_in(x):
            if isinstance(ffn, FusedGatedMLP):
                return ffn.act_fn(ffn.gate_proj(x))
            return ffn._act(ffn.input_projection(x))

        def fn(args, kwargs):
            x = args[0]
            r = _router_in(mov, None)
            if r is not None:
                return _sentence(_probs(r.float() @ mov.router.float(), top_k, renorm), x.shape[:-1])
            return _probs(act_in(x).float() @ mov.router.float(), top_k, renorm)

        return _Watch(key, ffn, fn, E)
    if isinstance(adapter, MoV):  # a MoV module called on the activation itself (MoVActivation, PackedMoV)

        def fn(args, kwargs):
            h = args[0]
            lead = h.shape[:-1] + (adapter.num_groups,)
            r = _router_in(adapter, arg(args, kwargs, 1, "router_input"))
            if r is not None:
                return _sentence(_probs(r.float() @ adapter.router.float(), top_k, renorm), lead)
            h = h.float().unflatten(-1, (adapter.num_groups, adapter.dim))
            return _probs(h @ adapter.router.float(), top_k, renorm)

        return _Watch(key, adapter, fn, E)
    raise TypeError(f"router health: site {key!r} has an unsupported module {type(current).__name__}")


def routed_sites(model: nn.Module) -> list[str]:
    """The keys of the model's sites that have a router (E > 1), in site order."""
    from pemoe.injection import _require_injected

    sites = _require_injected(model)["sites"]
    return [k for k, s in sites.items() if _watch(model, k, s) is not None]


class _Acc:
    def __init__(self, num_experts: int) -> None:
        self.psum = torch.zeros(num_experts, dtype=torch.float64)
        self.hsum = 0.0
        self.n = 0.0


class RouterMonitor:
    """Watches every routed site of an injected model (see the module docstring).

        monitor = RouterMonitor(model)            # hooks installed; remove() (or ``with``) takes them off
        loss = model(**batch).loss + 0.01 * monitor.balance_loss()
        stats = monitor.stats(reset=True)         # {site: SiteStats}

    ``balance=True`` keeps each forward's per-site mean probabilities with their autograd graph (while grad
    is enabled) for :meth:`balance_loss`; ``enabled`` may be switched off to skip the hooks' work (e.g. on
    steps that log nothing and use no balancing loss).
    """

    def __init__(self, model: nn.Module, *, balance: bool = False, sites: Sequence[str] | None = None) -> None:
        from pemoe.injection import _require_injected

        all_sites = _require_injected(model)["sites"]
        wanted = list(all_sites) if sites is None else list(sites)
        unknown = [k for k in wanted if k not in all_sites]
        if unknown:
            raise ValueError(f"RouterMonitor: no adapter site(s) {unknown[:3]}; sites are e.g. {list(all_sites)[:3]}")
        self.model, self.balance, self.enabled = model, balance, True
        self._watches = [w for k in wanted if (w := _watch(model, k, all_sites[k])) is not None]
        if not self._watches:
            raise ValueError("RouterMonitor: the model has no routed site (every site has one expert: no router)")
        self._acc = {w.key: _Acc(w.num_experts) for w in self._watches}
        self._means: list[torch.Tensor] = []  # per-forward P̄ of each site, with graph (balance)
        self._masks: dict[str, torch.Tensor | None] = {}
        self._handles = []
        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):
            sig = None
        self._signature = sig
        self._handles.append(model.register_forward_pre_hook(self._top_hook, with_kwargs=True))
        for w in self._watches:
            self._handles.append(w.module.register_forward_pre_hook(self._site_hook(w), with_kwargs=True))

    # -- hooks

    def _top_hook(self, module, args, kwargs):
        if not self.enabled:
            return
        bound = dict(kwargs)
        if self._signature is not None and args:
            try:
                bound = dict(self._signature.bind_partial(*args, **kwargs).arguments)
            except TypeError:
                pass
        masks = {"encoder": bound.get("attention_mask"), "decoder": bound.get("decoder_attention_mask")}
        labels = bound.get("labels")
        if masks["decoder"] is None and isinstance(labels, torch.Tensor) and hasattr(module, "encoder"):
            masks["decoder"] = labels != -100  # encoder-decoder: decoder position t predicts labels[t]
        self._masks = {k: v for k, v in masks.items() if isinstance(v, torch.Tensor)}

    def _mask_for(self, key: str, lead: torch.Size) -> torch.Tensor | None:
        # encoder sites and cross-attention k/v (they project the encoder output) take the encoder's mask first;
        # other sites of a "decoder." stack the decoder's; a mask is used only where its shape is [B, S]
        order = ["encoder", "decoder"]
        if key.startswith("decoder.") and not _CROSS_KV.search(key):
            order.reverse()
        for name in order:
            m = self._masks.get(name)
            if m is not None and tuple(m.shape) == tuple(lead[:2]):
                return m
        return None

    def _site_hook(self, w: _Watch):
        def hook(module, args, kwargs):
            if not self.enabled:
                return
            keep_graph = self.balance and torch.is_grad_enabled()
            with torch.set_grad_enabled(keep_graph):
                p = w.fn(args, kwargs)  # [B, S, (G,) E] or [T, (G,) E]
                self._record(w, p, keep_graph)

        return hook

    def _record(self, w: _Watch, p: torch.Tensor, keep_graph: bool) -> None:
        lead = p.shape[:-1]
        weight = torch.ones(lead, dtype=p.dtype, device=p.device)
        if p.dim() >= 3:
            m = self._mask_for(w.key, lead)
            if m is not None:
                weight = weight * m.to(p.dtype).reshape(tuple(m.shape) + (1,) * (len(lead) - 2))
        n = weight.sum()
        psum = (p * weight[..., None]).reshape(-1, p.shape[-1]).sum(0)
        if keep_graph:
            self._means.append(psum / n.clamp(min=1e-12))
        with torch.no_grad():
            ent = -(p * torch.log(p.clamp(min=1e-30))).sum(-1)
            acc = self._acc[w.key]
            acc.psum += psum.detach().double().cpu()
            acc.hsum += float((ent * weight).sum())
            acc.n += float(n)

    # -- results

    def stats(self, *, reset: bool = False) -> dict[str, SiteStats]:
        """{site: SiteStats} over the tokens seen since the last reset (sites that saw none are left out)."""
        out = {}
        for key, acc in self._acc.items():
            if acc.n > 0:
                load = (acc.psum / acc.n).tolist()
                out[key] = SiteStats(tuple(load), max(load), acc.hsum / acc.n, acc.n)
        if reset:
            self.reset()
        return out

    def reset(self) -> None:
        """Forget the statistics (and any kept means for the balancing loss)."""
        for key, acc in self._acc.items():
            self._acc[key] = _Acc(acc.psum.numel())
        self._means.clear()

    def balance_loss(self, *, clear: bool = True) -> torch.Tensor:
        """Mean over the site calls since the last clear of KL(P̄ ‖ U) = Σ_e P̄_e log(E·P̄_e) (zero when every
        site's mean load is uniform; differentiable in the routers). Needs ``balance=True``; 0 with no call."""
        if not self.balance:
            raise ValueError("RouterMonitor.balance_loss needs RouterMonitor(model, balance=True)")
        if not self._means:
            return torch.zeros(())
        terms = [(m * torch.log(m.clamp(min=1e-30) * m.numel())).sum() for m in self._means]
        if clear:
            self._means.clear()
        return torch.stack([t.to(terms[0].device) for t in terms]).mean()

    def remove(self) -> None:
        """Take the hooks off the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> RouterMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def stats_to_logs(stats: Mapping[str, SiteStats], *, per_site: bool = True, prefix: str = "router") -> dict:
    """Flat float logs: ``{prefix}/entropy_mean``, ``/entropy_min``, ``/max_prob_max`` (the worst site) and, with
    ``per_site``, ``{prefix}/{site}/entropy``, ``/max_prob`` and ``/load_{e}`` for every expert e."""
    if not stats:
        return {}
    ent = [s.entropy for s in stats.values()]
    logs = {
        f"{prefix}/entropy_mean": sum(ent) / len(ent),
        f"{prefix}/entropy_min": min(ent),
        f"{prefix}/max_prob_max": max(s.max_prob for s in stats.values()),
    }
    if per_site:
        for key, s in stats.items():
            logs[f"{prefix}/{key}/entropy"] = s.entropy
            logs[f"{prefix}/{key}/max_prob"] = s.max_prob
            logs.update({f"{prefix}/{key}/load_{e}": v for e, v in enumerate(s.load)})
    return logs


# ---------------------------------------------------------------------------------------------
# Figure 5: mean expert probability per task per site


@torch.no_grad()
def routing_by_task(
    model: nn.Module,
    batches: Mapping[str, Iterable[Mapping[str, torch.Tensor]]],
    *,
    sites: Sequence[str] | None = None,
    router_inputs: Mapping[str, Iterable[torch.Tensor]] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """{site: {task: mean probability per expert}} from running ``model(**batch)`` (eval mode, no grad) over
    each task's batches; tokens weighted equally, padding excluded (see the module docstring). For a
    sentence-routed model give ``router_inputs[task]``, one [B, R] tensor per batch."""
    from pemoe.injection import sentence_routing

    out: dict[str, dict[str, list[float]]] = {}
    was_training = model.training
    model.eval()
    monitor = RouterMonitor(model, sites=sites)
    try:
        for task, task_batches in batches.items():
            vectors = iter(router_inputs[task]) if router_inputs is not None else None
            for batch in task_batches:
                if vectors is not None:
                    with sentence_routing(model, next(vectors)):
                        model(**batch)
                else:
                    model(**batch)
            for key, s in monitor.stats(reset=True).items():
                out.setdefault(key, {})[task] = list(s.load)
    finally:
        monitor.remove()
        model.train(was_training)
    return out


@dataclass(frozen=True)
class RoutingPlot:
    """What :func:`plot_routing` drew: per panel its site, row labels (tasks) and the [tasks, E] matrix."""

    path: pathlib.Path
    panels: tuple[tuple[str, tuple[str, ...], torch.Tensor], ...]


def plot_routing(
    stats: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | pathlib.Path,
    *,
    held_out: Iterable[str] = (),
    title: str = "mean routing probability per task",
    max_panels: int | None = None,
) -> RoutingPlot:
    """The paper's Figure 5 as heat maps: one panel per site (all, or the first ``max_panels``), rows = tasks
    (training tasks, then held-out ones marked ``*``), columns = experts, colour = mean expert probability
    (one shared colour scale). Writes a PNG to ``path``; returns what it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not stats:
        raise ValueError("plot_routing: no routed site in the statistics")
    held = set(held_out)
    keys = list(stats)[:max_panels] if max_panels is not None else list(stats)
    panels = []
    for key in keys:
        rows = sorted(t for t in stats[key] if t not in held) + sorted(t for t in stats[key] if t in held)
        panels.append((key, tuple(rows), torch.tensor([list(stats[key][t]) for t in rows], dtype=torch.float64)))
    vmax = max(float(m.max()) for _, _, m in panels)
    n_rows = max(len(r) for _, r, _ in panels)
    n_exp = max(m.shape[1] for _, _, m in panels)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(1.6 + (1.2 + 0.35 * n_exp) * len(panels), 1.4 + 0.3 * n_rows), squeeze=False
    )
    im = None
    for ax, (key, rows, m) in zip(axes[0], panels, strict=True):
        im = ax.imshow(m.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_xticks(range(m.shape[1]), [str(e) for e in range(m.shape[1])], fontsize=6)
        ax.set_yticks(range(len(rows)), [t + (" *" if t in held else "") for t in rows], fontsize=6)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_title(key if len(key) < 40 else "…" + key[-39:], fontsize=6)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.02, pad=0.01, label="mean expert probability")
    fig.suptitle(title, fontsize=8)
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return RoutingPlot(path, tuple(panels))


def uniform_entropy(num_experts: int) -> float:
    """log E: the routing entropy of a uniform router (nats), the reference for ``SiteStats.entropy``."""
    return math.log(num_experts)
