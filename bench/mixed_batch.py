"""Serving many adapters in one batch: prefill and greedy-decode throughput of an adapter bank.

The model is bench/llama_step.py's Llama (hidden 512, 8 layers, 8 attention heads over 4 key/value heads,
gated SiLU MLP 1408 wide, vocabulary 32000, sdpa attention), in inference (``torch.inference_mode``). A batch
of B = 32 sequences of S = 64 prompt tokens is spread round robin over a bank of N = 8 or 32 adapters
(sequence b uses adapter b mod N, so every adapter's sequences are interleaved with the others'), per adapter
method:

* ``mov`` — MoV, E = 10 (pemoe's built-in Llama placement: k_proj, v_proj and the MLP activation);
* ``molora`` — MoLoRA, E = 8, r = 4, alpha 16 on the seven linears q/k/v/o_proj, gate/up/down_proj;
* ``lora`` — pemoe's LoRA (MoLoRA's E = 1 path, no router), r = 4, alpha 16 on the same seven linears.

Every adapter is fresh and random (the injected initialisation plus independent normal noise, std 0.02, on
every adapter parameter: no adapter is the identity), saved with :func:`pemoe.save_pretrained` to a temporary
folder and loaded from there. Providers, per method ``m``:

* ``m-one`` — the ceiling: a model holding one adapter (:func:`pemoe.from_pretrained`, the single-adapter
  ops) runs the whole batch;
* ``m-loop`` — one such model per adapter (all sharing the backbone's weights), each running its own
  sequences as a sub-batch: N separate prefills and N separate decodes;
* ``m-mixed`` — one bank (:func:`pemoe.load_adapters`) runs the whole batch with ``adapter_names=``;

* ``m-matmuls`` (``molora`` and ``lora``) — a yardstick, not the method: the bank with every site running only
  the products a mixed batch cannot avoid, each adapter's shrink (and router) GEMM and expand over its own
  parameters on its own tokens (:func:`matmuls_only`: no softmax, no routing, the experts summed unweighted);
  its throughput against ``m-one`` is what these products alone cost, the floor under ``m-mixed``'s;

and ``peft-lora-mixed``, PEFT's mixed-batch LoRA: a ``PeftModel`` holding the N LoRA adapters (the ``lora``
ones, exported with :func:`pemoe.peft_interop.export_peft` and loaded with ``PeftModel.from_pretrained`` /
``load_adapter``: the same weights), called with ``adapter_names=``; the floor ``llama-frozen`` is the bare
backbone. Every model shares the one random backbone (bench/step_common.py's cache).

Modes:

* ``prefill`` — one forward over the B × S prompt tokens building the KV cache (``use_cache=True``), with
  the last position's logits only (``logits_to_keep=1``), as generation's prefill does;
* ``decode`` — ``new`` = 16 greedy decoding steps (argmax of the last logits, one token per sequence per
  step, the transformers ``DynamicCache``) from a prefilled cache: the prefill runs once, untimed, before
  the rounds; each timed call crops the cache back to the prompt and decodes the same ``new`` tokens again.

Reported per provider and mode (CSV rows, wall clock, or with ``--clock process`` the process CPU time on
one torch thread, steadier on a shared host; medians over interleaved rounds of
:func:`pemoe.bench.harness.time_interleaved`): ``time_ms`` of one call, ``tokens_per_s`` (prefill: B·S prompt
tokens; decode: B·new generated tokens per call), and throughput ratios (higher is better):
``throughput_vs_one`` (``m-mixed`` and ``m-loop`` against ``m-one``: the targets say mixing 8 adapters costs
at most 10 % of it, a ratio ≥ 0.90), ``throughput_vs_loop`` (``m-mixed`` against ``m-loop``) and
``throughput_vs_peft`` (every ``m-mixed`` against ``peft-lora-mixed``; the target: pemoe's LoRA ≥ 2.0 at 32
adapters). Run ``pemoe bench --ops mixed_batch --dtypes float32`` or ``python -m pemoe.bench.mixed_batch``
(not in the default run: it takes minutes). ``--tokens`` replaces S, ``--shape-scale`` shrinks the widths.
"""

from __future__ import annotations

import pathlib
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pemoe.bench import harness, llama_step
from pemoe.bench.harness import OpBench, Provider, op_main

OP = "mixed_batch"
FLOOR = "llama-frozen"
PEFT = "peft-lora-mixed"
MODES = ("prefill", "decode")
#: method -> (pemoe.adapters config class, its arguments)
METHODS = {
    "mov": ("MoVConfig", {"num_experts": 10}),
    "molora": ("MoLoRAConfig", {"num_experts": 8, "rank": 4, "alpha": 16}),
    "lora": ("LoRAConfig", {"rank": 4, "alpha": 16}),
}
STRATEGIES = ("one", "loop", "mixed", "matmuls")
#: the methods with a ``matmuls`` yardstick (MoV's unavoidable products are the router's and the merge's)
YARDSTICK_METHODS = ("molora", "lora")
ADAPTER_COUNTS = (8, 32)
#: batch B sequences of S prompt tokens, ``new`` greedy decoding steps
BATCH = {"B": 32, "S": 64, "new": 16}
#: std of the normal noise added to every adapter parameter's initial value
NOISE_STD = 0.02
#: rounds of the interleaved timing (--rounds replaces them): each call takes about a second
ROUNDS = {"quick": 3, "full": 5}


def shapes(full: bool) -> list[dict[str, int]]:
    """N = 8 and 32 adapters at the batch above and llama_step's widths (--full only adds rounds)."""
    return [{"adapters": n, **BATCH, **llama_step.WIDTHS} for n in ADAPTER_COUNTS]


def make_inputs(shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Prompt token ids [B, S] (seed 0), the adapter count and decoding steps, and the backbone's dtype/widths."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["V"], (shape["B"], shape["S"]), generator=g)
    extra = {"input_ids": ids, "adapters": torch.tensor(shape["adapters"]), "new": torch.tensor(shape["new"])}
    return llama_step.FAMILY.inputs(shape, dtype, device, extra)


def provider_names() -> list[str]:
    names = [f"{m}-{s}" for m in METHODS for s in STRATEGIES if s != "matmuls" or m in YARDSTICK_METHODS]
    return [FLOOR, *names, PEFT]


def adapter_names(num_adapters: int) -> list[str]:
    return [f"adapter-{a}" for a in range(num_adapters)]


def sequence_names(num_adapters: int, batch: int) -> list[str]:
    """Sequence b's adapter: adapter b mod N (round robin)."""
    names = adapter_names(num_adapters)
    return [names[b % num_adapters] for b in range(batch)]


# --------------------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------------------


def _frozen(i: dict[str, torch.Tensor]) -> nn.Module:
    """A bare model in eval mode sharing the cached random backbone's weights."""
    return llama_step.FAMILY.model(i).eval()


def _save_adapters(i: dict[str, torch.Tensor], method: str, folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """N fresh random adapters of ``method`` saved as pemoe.save_pretrained folders; name -> folder."""
    from pemoe import adapters
    from pemoe.serialization import save_pretrained

    config, kwargs = METHODS[method]
    model = _frozen(i)
    adapters.inject(model, getattr(adapters, config)(**kwargs))
    params = adapters.adapter_state_dict(model)
    init = {k: p.detach().clone() for k, p in params.items()}
    g = torch.Generator().manual_seed(1000 + list(METHODS).index(method))
    paths = {}
    for a, name in enumerate(adapter_names(int(i["adapters"]))):
        with torch.no_grad():
            for k, p in params.items():
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * NOISE_STD
                p.copy_(init[k] + noise.to(device=p.device, dtype=p.dtype))
        paths[name] = folder / f"{method}-{a}"
        save_pretrained(model, paths[name])
    return paths


def matmuls_only(bank: nn.Module) -> nn.Module:
    """Makes every MoLoRA bank site of ``bank`` (in place) a yardstick, not MoLoRA: y = base + scale · Σ_e
    (x_a A_e) B_e per token with its adapter a's parameters, the experts summed unweighted.

    The matrix products a mixed batch cannot avoid, issued as pemoe's batched decode issues them: the tokens
    naming an adapter sorted by adapter and laid out [P, L, K] (each adapter present padded to the longest
    count L), the shrink and router GEMM x_p @ [A_cat | router | 0] as one ``bmm`` over each adapter's padded
    operand (:func:`pemoe.ops.molora.shrink_operand`, built once here), the expand as one ``baddbmm_`` onto the
    base rows, back in token order; no softmax, routing or scaling by p, and no argument checks. Its
    throughput against one adapter for the whole batch is what these products alone cost."""
    from pemoe.layers import MoLoRALinear
    from pemoe.ops.molora import shrink_operand

    sites = [m for m in bank.modules() if isinstance(m, MoLoRALinear) and m.banked]
    if not sites:
        raise ValueError("matmuls_only needs a model holding a MoLoRA/LoRA adapter bank (pemoe.load_adapters)")
    for site in sites:
        with torch.no_grad():
            a, e, k, r = site.lora_a.shape
            routers = [None] * a if site.router is None else list(site.router)
            operands = torch.stack([shrink_operand(site.lora_a[j], routers[j], site.lora_a.dtype) for j in range(a)])
            b_cat = site.lora_b.detach().reshape(a, e * r, -1)
        site.forward = _matmuls_forward.__get__(site)
        site._matmuls_operands = (operands, b_cat)
    return bank


def _matmuls_forward(site: nn.Module, x: torch.Tensor, router_input: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`matmuls_only`'s site forward."""
    operands, b_cat = site._matmuls_operands
    groups = site._adapter_ids(x)
    base = site.base(x)
    k, n = x.shape[-1], base.shape[-1]
    x2d, base2d = x.reshape(-1, k), base.reshape(-1, n)
    tokens = x2d.shape[0]
    rows, slots, present, length = groups.padded()
    if present.shape[0] < operands.shape[0]:
        operands, b_cat = operands.index_select(0, present), b_cat.index_select(0, present)
    padded = slots is not None
    xs = (F.pad(x2d, (0, 0, 0, 1)) if padded else x2d).index_select(0, rows).view(-1, length, k)
    u = torch.bmm(xs, operands)[..., : b_cat.shape[1]]
    out = F.pad(base2d, (0, 0, 0, 1)) if padded else base2d
    y = out.index_select(0, rows).view(-1, length, n).baddbmm_(u, b_cat, alpha=site.scale)
    if groups.counts[0] == 0 and not padded:
        return y.view(tokens, n).index_select(0, groups.inverse).view_as(base)
    out = out if padded else out.clone()
    out.index_copy_(0, rows, y.view(-1, n))
    return out[:tokens].view_as(base)


@dataclass
class Part:
    """One model call on some of the batch's sequences: ``rows`` (None: all), ``kwargs`` for every call."""

    model: nn.Module
    rows: torch.Tensor | None
    kwargs: dict


class Served:
    """A provider: the model calls ("parts") that serve the batch, their prefill, and a decode from a cache
    prefilled once (:meth:`prepare_decode`)."""

    def __init__(self, parts: list[Part], prompt: torch.Tensor, new: int) -> None:
        self.parts, self.prompt, self.new = parts, prompt, new
        self.decode_state: list[tuple[object, torch.Tensor]] | None = None

    def _ids(self, part: Part) -> torch.Tensor:
        return self.prompt if part.rows is None else self.prompt.index_select(0, part.rows)

    def _assemble(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """Per-part results (rows of the part's sequences) in batch order."""
        if len(outs) == 1 and self.parts[0].rows is None:
            return outs[0]
        full = outs[0].new_empty((self.prompt.shape[0],) + tuple(outs[0].shape[1:]))
        for part, out in zip(self.parts, outs, strict=True):
            full[part.rows] = out
        return full

    def prefill(self, _i: dict | None = None) -> torch.Tensor:
        """The prompt's last-position logits [B, V] (each part one forward with ``use_cache=True``)."""
        with torch.inference_mode():
            outs = [
                p.model(self._ids(p), use_cache=True, logits_to_keep=1, **p.kwargs).logits[:, -1] for p in self.parts
            ]
        return self._assemble(outs)

    def prepare_decode(self) -> None:
        """Prefill each part once (untimed): its cache and first generated token."""
        state = []
        with torch.inference_mode():
            for p in self.parts:
                out = p.model(self._ids(p), use_cache=True, logits_to_keep=1, **p.kwargs)
                state.append((out.cache, out.logits[:, -1].argmax(-1, keepdim=True)))
        self.decode_state = state

    def decode(self) -> torch.Tensor:
        """The ``new`` greedily generated tokens [B, new]; each part's cache is cropped back to the prompt."""
        if self.decode_state is None:
            self.prepare_decode()
        s = self.prompt.shape[1]
        outs = []
        with torch.inference_mode():
            for p, (cache, first) in zip(self.parts, self.decode_state, strict=True):
                extra = cache.get_seq_length() - s
                if extra:
                    cache.crop(-extra)  # a negative count removes that many of the last tokens
                token, tokens = first, [first]
                for _ in range(self.new - 1):
                    logits = p.model(token, cache=cache, use_cache=True, **p.kwargs).logits
                    token = logits[:, -1].argmax(-1, keepdim=True)
                    tokens.append(token)
                outs.append(torch.cat(tokens, dim=1))
        return self._assemble(outs)


class Setup:
    """Every provider's :class:`Served` for one (shape, dtype, device): the saved adapters (in a temporary
    folder, removed with the setup), the banks, the single-adapter models and PEFT's model."""

    def __init__(self, i: dict[str, torch.Tensor], providers: Sequence[str]) -> None:
        from pemoe.banks import load_adapters
        from pemoe.serialization import from_pretrained

        self.key = _key(i)
        n, prompt, new = int(i["adapters"]), i["input_ids"], int(i["new"])
        batch = prompt.shape[0]
        self.tmp = tempfile.TemporaryDirectory(prefix="pemoe-mixed-batch-")
        folder = pathlib.Path(self.tmp.name)
        self.names = sequence_names(n, batch)
        groups = {
            a: torch.tensor([b for b in range(batch) if b % n == a], device=prompt.device) for a in range(min(n, batch))
        }
        self.served: dict[str, Served] = {}
        if FLOOR in providers:
            self.served[FLOOR] = Served([Part(_frozen(i), None, {})], prompt, new)
        singles_for_peft = None
        for method in METHODS:
            wanted = [s for s in STRATEGIES if f"{method}-{s}" in providers]
            need_peft = method == "lora" and PEFT in providers
            if not wanted and not need_peft:
                continue
            paths = _save_adapters(i, method, folder)
            names = list(paths)
            singles: dict[int, nn.Module] = {}

            def single(a: int, paths=paths, names=names, singles=singles) -> nn.Module:
                if a not in singles:
                    singles[a] = _frozen(i)
                    from_pretrained(singles[a], paths[names[a]])
                return singles[a]

            if "one" in wanted:
                self.served[f"{method}-one"] = Served([Part(single(0), None, {})], prompt, new)
            if "loop" in wanted:
                parts = [Part(single(a), rows, {}) for a, rows in groups.items()]
                self.served[f"{method}-loop"] = Served(parts, prompt, new)
            if "mixed" in wanted:
                bank = _frozen(i)
                load_adapters(bank, paths)
                self.served[f"{method}-mixed"] = Served([Part(bank, None, {"adapter_names": self.names})], prompt, new)
            if "matmuls" in wanted:
                yardstick = _frozen(i)
                load_adapters(yardstick, paths)
                matmuls_only(yardstick)
                self.served[f"{method}-matmuls"] = Served(
                    [Part(yardstick, None, {"adapter_names": self.names})], prompt, new
                )
            if need_peft:
                singles_for_peft = [single(a) for a in range(n)]
        if singles_for_peft is not None:
            peft_model = _peft_bank(i, singles_for_peft, adapter_names(n), folder)
            self.served[PEFT] = Served([Part(peft_model, None, {"adapter_names": self.names})], prompt, new)

    def close(self) -> None:
        self.tmp.cleanup()


def _peft_bank(i: dict[str, torch.Tensor], lora_models: list[nn.Module], names: list[str], folder) -> nn.Module:
    """PEFT's ``PeftModel`` on a fresh frozen model with the pemoe LoRA adapters (exported to PEFT's format)."""
    import peft

    from pemoe.peft_interop import export_peft

    folders = []
    for name, model in zip(names, lora_models, strict=True):
        folders.append(folder / f"peft-{name}")
        export_peft(model, folders[-1])
    model = peft.PeftModel.from_pretrained(_frozen(i), folders[0], adapter_name=names[0])
    for name, path in zip(names[1:], folders[1:], strict=True):
        model.load_adapter(path, adapter_name=name)
    return model.eval()


def _key(i: dict[str, torch.Tensor]) -> tuple:
    return (*llama_step.FAMILY.key(i), int(i["adapters"]), int(i["new"]), tuple(i["input_ids"].shape))


_setup: list[Setup] = []


def setup(i: dict[str, torch.Tensor], providers: Sequence[str] | None = None) -> Setup:
    """The :class:`Setup` for these inputs (one kept at a time; built with ``providers``, default all)."""
    providers = list(providers or provider_names())
    if _setup and (_setup[0].key != _key(i) or not set(providers) <= set(_setup[0].served)):
        _setup.pop().close()
    if not _setup:
        _setup.append(Setup(i, providers))
    return _setup[0]


# --------------------------------------------------------------------------------------------------
# The run: one (shape, dtype) group
# --------------------------------------------------------------------------------------------------


def _baselines(provider: str) -> dict[str, str]:
    """Metric suffix (one, loop, peft) -> the provider whose throughput ``provider``'s is compared with."""
    if provider in (FLOOR, PEFT):
        return {}
    method, strategy = provider.rsplit("-", 1)
    out = {}
    if strategy != "one":
        out["one"] = f"{method}-one"
    if strategy == "mixed":
        out["loop"] = f"{method}-loop"
        out["peft"] = PEFT
    return out


def tokens_per_call(shape: dict[str, int], mode: str) -> int:
    """Prompt tokens a prefill processes, or tokens a decode generates."""
    return shape["B"] * (shape["S"] if mode == "prefill" else shape["new"])


def write_rows(
    shape: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
    mode: str,
    stats: dict[str, tuple[float, float, float]],
    sink: harness.CsvSink,
    log: Callable[[str], None] = print,
) -> None:
    """time_ms, tokens_per_s and throughput_vs_{one,loop,peft} rows of one mode (stats: ms p20/p50/p80)."""
    tokens = tokens_per_call(shape, mode)
    for p, (p20, p50, p80) in stats.items():
        case = harness.Case(OP, p, mode, shape, dtype, device)
        sink.write(case, "time_ms", p50, p20, p80)
        # rates: the p20 column from the p80 time (faster = higher), as harness.write_mode_rows does
        sink.write(case, "tokens_per_s", tokens / p50 * 1e3, tokens / p80 * 1e3, tokens / p20 * 1e3)
        for suffix, base in _baselines(p).items():
            if base in stats:
                b20, b50, b80 = stats[base]
                sink.write(case, f"throughput_vs_{suffix}", b50 / p50, b20 / p20, b80 / p80)
    log(f"  {OP} {harness.shape_str(shape)} {mode}: " + ", ".join(f"{p} {s[1]:.0f} ms" for p, s in stats.items()))


def run_group(
    bench: OpBench,
    providers: Sequence[str],
    shape: dict[str, int],
    dtype: torch.dtype,
    device: torch.device,
    modes: Sequence[str],
    settings: harness.Settings,
    sink: harness.CsvSink,
    log: Callable[[str], None] = print,
) -> None:
    """Build the providers' models, then time each mode round robin (one call per provider per round, one
    warm-up call each; ``settings.min_rounds`` rounds when --rounds was given, else :data:`ROUNDS`)."""
    i = make_inputs(shape, dtype, device)
    built = setup(i, providers)
    for mode in modes:
        if mode not in MODES:
            log(f"  {OP}: mode {mode!r} is not measured here (modes: {', '.join(MODES)})")
            continue
        served = {p: built.served[p] for p in providers}
        if mode == "decode":
            for s in served.values():
                s.prepare_decode()
        fns = {p: (s.prefill if mode == "prefill" else s.decode) for p, s in served.items()}
        rounds = settings.min_rounds if settings.min_rounds == settings.max_rounds else _default_rounds(settings)
        stats = harness.time_interleaved(
            fns, device, warmup=1, reps=1, min_rounds=rounds, max_rounds=rounds, budget_s=0.0, clock=settings.clock
        )
        write_rows(shape, dtype, device, mode, stats, sink, log)


def _default_rounds(settings: harness.Settings) -> int:
    """The --quick / --full rounds (the runner's full settings take more rounds than its quick ones)."""
    return ROUNDS["full"] if settings.min_rounds > 4 else ROUNDS["quick"]


def _providers() -> dict[str, Provider]:
    def prefill(name: str) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        return lambda i: setup(i).served[name].prefill()

    return {name: Provider(name, prefill(name), ()) for name in provider_names()}


PROVIDERS = _providers()
BENCH = OpBench(
    OP,
    shapes,
    make_inputs,
    PROVIDERS,
    tokens_key="S",
    scale_keys=("M", "F", "D", "layers", "V"),
    floor=FLOOR,
    default_modes=MODES,
    run_group=run_group,
    dtypes=("float32",),
)


def main(argv: list[str] | None = None) -> int:
    """``python -m pemoe.bench.mixed_batch [pemoe bench options]``: this benchmark only."""
    return op_main(OP, argv)


if __name__ == "__main__":
    raise SystemExit(main())
