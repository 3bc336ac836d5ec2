"""Ops over an adapter bank (``adapter_ids``): every op, output and every gradient, per implementation.

Two kinds of checks:

* the ground truth: the banked op equals running each adapter on its own rows with the single-adapter op
  (``implementation="reference"``) and that adapter's slice of the stacked parameters, assembled here
  (rows of id -1 through the same op with parameters that are exactly the identity: MoV experts of ones
  and no router, MoLoRA lora_b of zeros), in float64, outputs and gradients of every input, the stacked
  parameters included;
* the tolerance rule of tests/helpers.py for ``"torch"`` (both strategies for MoV: grouped by adapter,
  gathered per token) in float32/bfloat16/float16: ``ref`` is the banked
  ``"reference"`` in the same dtype, ``truth`` the banked ``"reference"`` in float64 from the same inputs.

Token ids: a cycle over adapters 0 and 1 and -1 (the base alone); adapter 2 of the 3 in the bank names no
token, so its gradients must be zero.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pemoe import ops
from pemoe.ops import banked
from tests.helpers import assert_within_rule, run_with_grads

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTIVATIONS = ("x", "h", "weight", "bias", "base", "wi_0", "wi_1", "wo", "router_input")
K, G, D, A = 40, 3, 24, 3
PATTERN = (0, 1, -1, 1, 0, 0, 1)


def _ids(shape) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return torch.tensor([PATTERN[(i * 5 + 1) % len(PATTERN)] for i in range(n)]).reshape(shape)


def _cast(inputs: dict, dtype: torch.dtype, adapter_dtype: torch.dtype) -> dict:
    """Floating tensors to dtype (activations, frozen weights) or adapter_dtype; integer ids unchanged."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = v.detach().to(dtype if k in ACTIVATIONS else adapter_dtype).requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def _rand(*shape, std=1.0, grad=True):
    return (torch.randn(*shape) * std).requires_grad_(grad)


class _Bank:
    """Subclasses set ``op_name``, ``stacked`` (the stacked parameter names), ``identity(inputs)`` (single-adapter
    parameters that leave the base unchanged) and ``inputs(t, e, ...)``."""

    implementation: str
    op_name: str
    stacked: tuple[str, ...]
    token_inputs: tuple[str, ...] = ("x",)  # per-token tensors [..., width]
    out_source = "x"

    def call(self, implementation, **kw):
        return getattr(ops, self.op_name)(**kw, implementation=implementation)

    def _per_adapter(self, **leaves) -> torch.Tensor:
        """The expected output: each adapter's rows through the single-adapter reference, in token order."""
        ids = leaves["adapter_ids"].reshape(-1)
        lead = leaves[self.out_source].shape[:-1]
        flat = {k: leaves[k].reshape(-1, leaves[k].shape[-1]) for k in self.token_inputs if leaves.get(k) is not None}
        ri = leaves.get("router_input")
        if ri is not None:  # one row per token: sequence b's vector for each of its tokens
            ri = ri[:, None, :].expand(lead + (ri.shape[-1],)).reshape(-1, ri.shape[-1])
        rest = {k: v for k, v in leaves.items() if k not in (*self.token_inputs, "adapter_ids", "router_input")}
        rows, outs = [], []
        for a in range(-1, A):
            idx = (ids == a).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            kw = dict(rest)
            kw.update({k: v[idx] for k, v in flat.items()})
            if a < 0:
                kw.update(self.identity(leaves))
            else:
                kw.update({k: (None if leaves[k] is None else leaves[k][a]) for k in self.stacked})
                if ri is not None:
                    kw["router_input"] = ri[idx]
            rows.append(idx)
            outs.append(getattr(ops, self.op_name)(**kw, implementation="reference"))
        y = torch.cat(outs)
        full = y.new_zeros((ids.numel(),) + y.shape[1:])
        full = full.index_put((torch.cat(rows),), y)
        return full.reshape(lead + y.shape[1:])

    def check_per_adapter(self, inputs: dict) -> None:
        args = _cast(inputs, torch.float64, torch.float64)
        probe, _ = run_with_grads(lambda **kw: self.call("reference", **kw), args)
        grad_out = torch.randn(probe.shape, dtype=torch.float64)
        out, grads = run_with_grads(lambda **kw: self.call(self.implementation, **kw), args, grad_out)
        want, want_grads = run_with_grads(self._per_adapter, args, grad_out)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        assert set(grads) == set(want_grads)
        for name in want_grads:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-9, atol=1e-10, msg=f"d{name}")
        unused = sorted(set(range(A)) - set(inputs["adapter_ids"].reshape(-1).tolist()))
        for name in self.stacked:  # an adapter that names no token gets no gradient
            for a in unused:
                if name in grads:
                    assert torch.count_nonzero(grads[name][a]) == 0, (name, a)

    @pytest.mark.parametrize("t", [1, 7, 60])
    @pytest.mark.parametrize("e", [1, 4])
    def test_equals_each_adapter_on_its_own_rows(self, t, e):
        self.check_per_adapter(self.inputs(t, e))

    @pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, True)])
    def test_top_k_equals_each_adapter(self, top_k, renormalize):
        self.check_per_adapter(self.inputs(23, 4, top_k=top_k, renormalize=renormalize))

    def test_sentence_routing_equals_each_adapter(self):
        self.check_per_adapter(self.inputs(5, 4, sentence=True))

    @pytest.mark.parametrize("fill", [0, 2, -1])
    def test_one_id_for_every_token(self, fill):
        inputs = self.inputs(9, 3)
        inputs["adapter_ids"] = torch.full_like(inputs["adapter_ids"], fill)
        self.check_per_adapter(inputs)


class _BankVsReference(_Bank):
    """The tolerance rule against the banked reference, in every dtype."""

    def check(self, inputs: dict, dtype: torch.dtype) -> None:
        args = _cast(inputs, dtype, torch.float32)
        args64 = _cast(inputs, torch.float64, torch.float64)
        probe, _ = run_with_grads(lambda **kw: self.call("reference", **kw), args64)
        grad_out = torch.randn(probe.shape, dtype=torch.float64)
        out, grads = run_with_grads(lambda **kw: self.call(self.implementation, **kw), args, grad_out)
        ref, ref_grads = run_with_grads(lambda **kw: self.call("reference", **kw), args, grad_out)
        truth, truth_grads = run_with_grads(lambda **kw: self.call("reference", **kw), args64, grad_out)
        assert out.dtype == args[self.out_source].dtype
        assert_within_rule(out, ref, truth, dtype, f"{self.op_name} output")
        assert set(grads) == set(truth_grads)
        for name in truth_grads:
            assert grads[name].dtype == args[name].dtype, f"d{name} dtype"
            assert_within_rule(grads[name], ref_grads[name], truth_grads[name], dtype, f"{self.op_name} d{name}")

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("t", [1, 7, 123])
    @pytest.mark.parametrize("e", [1, 4])
    def test_matches_reference(self, dtype, t, e):
        self.check(self.inputs(t, e), dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_top_k_matches_reference(self, dtype):
        self.check(self.inputs(33, 4, top_k=2), dtype)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_sentence_routing_matches_reference(self, dtype):
        self.check(self.inputs(5, 4, sentence=True), dtype)

    def test_gradcheck_float64(self):
        args = _cast(self.inputs(5, 3, top_k=2), torch.float64, torch.float64)
        names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        rest = {k: v for k, v in args.items() if k not in names}

        def f(*tensors):
            return self.call(self.implementation, **rest, **dict(zip(names, tensors, strict=True)))

        # fast mode (a random projection of the Jacobian): the full one takes a minute for the gathered
        # strategy, and test_equals_each_adapter_on_its_own_rows checks every gradient exactly already
        assert torch.autograd.gradcheck(f, tuple(args[n] for n in names), eps=1e-6, atol=1e-6, fast_mode=True)


# ------------------------------------------------------------------------------------------
# per-op inputs
# ------------------------------------------------------------------------------------------


def _mov_params(e, width, groups, sentence, router_std=0.5):
    experts = (1.0 + 0.3 * torch.randn(A, groups, e, width)).requires_grad_()
    router = None if e == 1 else _rand(A, 9 if sentence else width, e, std=router_std)
    return dict(experts=experts, router=router)


def _lead(t, sentence):
    return (2, t) if sentence else (t,)


class MoVBank(_Bank):
    op_name, stacked, token_inputs, out_source = "mov", ("experts", "router"), ("h",), "h"

    def identity(self, leaves):
        return dict(router=None, experts=torch.ones(G, 1, D, dtype=leaves["h"].dtype), top_k=None, renormalize=False)

    def inputs(self, t, e, *, top_k=None, renormalize=False, sentence=False):
        lead = _lead(t, sentence)
        args = dict(h=_rand(*lead, G * D), top_k=top_k, renormalize=renormalize, adapter_ids=_ids(lead))
        args.update(_mov_params(e, D, G, sentence))
        if sentence:
            args["router_input"] = _rand(2, 9)
        return args


class MoVLinearBank(_Bank):
    op_name, stacked = "mov_linear", ("experts", "router")

    def identity(self, leaves):
        return dict(router=None, experts=torch.ones(G, 1, D, dtype=leaves["x"].dtype), top_k=None, renormalize=False)

    def inputs(self, t, e, *, top_k=None, renormalize=False, sentence=False):
        lead = _lead(t, sentence)
        args = dict(
            x=_rand(*lead, K),
            weight=torch.randn(G * D, K) * K**-0.5,
            bias=_rand(G * D),
            top_k=top_k,
            renormalize=renormalize,
            adapter_ids=_ids(lead),
        )
        args.update(_mov_params(e, D, G, sentence))
        if sentence:
            args["router_input"] = _rand(2, 9)
        return args


class MoVFFNBank(_Bank):
    op_name, stacked = "mov_ffn", ("experts", "router")
    f = 56

    def identity(self, leaves):
        ones = torch.ones(1, 1, self.f, dtype=leaves["x"].dtype)
        return dict(router=None, experts=ones, top_k=None, renormalize=False)

    def inputs(self, t, e, *, top_k=None, renormalize=False, sentence=False):
        lead = _lead(t, sentence)
        args = dict(
            x=_rand(*lead, K),
            wi_0=torch.randn(self.f, K) * K**-0.5,
            wi_1=torch.randn(self.f, K) * K**-0.5,
            wo=torch.randn(K, self.f) * self.f**-0.5,
            activation="gelu_new",
            top_k=top_k,
            renormalize=renormalize,
            adapter_ids=_ids(lead),
        )
        args.update(_mov_params(e, self.f, 1, sentence, router_std=0.2))
        if sentence:
            args["router_input"] = _rand(2, 9)
        return args


class _MoLoRABank(_Bank):
    stacked = ("lora_a", "lora_b", "router")
    n, r = 72, 4

    def identity(self, leaves):
        dt = leaves["x"].dtype
        return dict(lora_a=torch.zeros(1, K, 1, dtype=dt), lora_b=torch.zeros(1, 1, self.n, dtype=dt), router=None,
                    top_k=None, renormalize=False)  # fmt: skip

    def _lora(self, t, e, top_k, renormalize, sentence):
        lead = _lead(t, sentence)
        args = dict(
            x=_rand(*lead, K),
            lora_a=_rand(A, e, K, self.r, std=0.3),
            lora_b=_rand(A, e, self.r, self.n, std=0.3),
            router=None if e == 1 else _rand(A, 9 if sentence else K, e, std=0.5),
            scale=16.0 / self.r,
            top_k=top_k,
            renormalize=renormalize,
            adapter_ids=_ids(lead),
        )
        if sentence:
            args["router_input"] = _rand(2, 9)
        return args, lead


class MoLoRALinearBank(_MoLoRABank):
    op_name = "molora_linear"

    def inputs(self, t, e, *, top_k=None, renormalize=False, sentence=False):
        args, _ = self._lora(t, e, top_k, renormalize, sentence)
        args.update(weight=torch.randn(self.n, K) * K**-0.5, bias=_rand(self.n))
        return args


class MoLoRAAdapterBank(_MoLoRABank):
    op_name = "molora_adapter"
    token_inputs = ("x", "base")

    def inputs(self, t, e, *, top_k=None, renormalize=False, sentence=False):
        args, lead = self._lora(t, e, top_k, renormalize, sentence)
        args["base"] = _rand(*lead, self.n)
        return args

    def test_without_base_equals_each_adapter(self):
        inputs = self.inputs(11, 3)
        inputs["base"] = None
        self.check_per_adapter(inputs)


class _Grouped:
    """``"torch"`` grouped by adapter: one single-adapter call per adapter on its rows, at every batch size."""

    @pytest.fixture(autouse=True)
    def _strategy(self, monkeypatch):
        monkeypatch.setattr(banked, "GATHER_MAX_TOKENS", 0)


class _Gathered:
    """``"torch"`` gathering each token's parameters, at every batch size that names several adapters."""

    @pytest.fixture(autouse=True)
    def _strategy(self, monkeypatch):
        monkeypatch.setattr(banked, "GATHER_MAX_TOKENS", 10**6)


class TestMoVBankReference(MoVBank):
    implementation = "reference"


class TestMoVBankTorchGrouped(MoVBank, _BankVsReference, _Grouped):
    implementation = "torch"


class TestMoVBankTorchGathered(MoVBank, _BankVsReference, _Gathered):
    implementation = "torch"


class TestMoVLinearBankReference(MoVLinearBank):
    implementation = "reference"


class TestMoVLinearBankTorchGrouped(MoVLinearBank, _BankVsReference, _Grouped):
    implementation = "torch"


class TestMoVLinearBankTorchGathered(MoVLinearBank, _BankVsReference, _Gathered):
    implementation = "torch"


class TestMoVFFNBankReference(MoVFFNBank):
    implementation = "reference"


class TestMoVFFNBankTorchGrouped(MoVFFNBank, _BankVsReference, _Grouped):
    implementation = "torch"


class TestMoVFFNBankTorchGathered(MoVFFNBank, _BankVsReference, _Gathered):
    implementation = "torch"


class TestMoLoRALinearBankReference(MoLoRALinearBank):
    implementation = "reference"


class TestMoLoRALinearBankTorchGrouped(MoLoRALinearBank, _BankVsReference, _Grouped):
    implementation = "torch"


class TestMoLoRAAdapterBankReference(MoLoRAAdapterBank):
    implementation = "reference"


class TestMoLoRAAdapterBankTorchGrouped(MoLoRAAdapterBank, _BankVsReference, _Grouped):
    implementation = "torch"


class _Inference:
    """``"torch"`` when autograd records nothing (``torch.no_grad``, inference): each adapter's rows go through the
    single-adapter forward's steps without its autograd Function (``segments``: the path under test). The same
    ops on the same rows as the grouped Function: bitwise its output; and within the rule against the banked
    reference."""

    segments: str

    def _no_grad(self, inputs: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        args = _cast(inputs, dtype, torch.float32)
        calls, segments = [], getattr(banked, self.segments)
        setattr(banked, self.segments, lambda *a, **k: calls.append(1) or segments(*a, **k))
        try:
            with torch.no_grad():
                out = self.call("torch", **args)
        finally:
            setattr(banked, self.segments, segments)
        assert len(calls) == (len(set(inputs["adapter_ids"].reshape(-1).tolist())) > 1)  # the path under test
        with torch.no_grad():
            ref = self.call("reference", **args)
            truth = self.call("reference", **_cast(inputs, torch.float64, torch.float64))
        with_grad, _ = run_with_grads(lambda **kw: self.call("torch", **kw), args)  # the grouped Function
        assert torch.equal(out, with_grad.detach()), "not the grouped form's bits"
        with torch.inference_mode():  # again, the parameters' shrink operands kept from the first call
            assert torch.equal(self.call("torch", **args), out), "inference mode: not the same bits"
        return out, ref, truth

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("t", [1, 7, 123])
    @pytest.mark.parametrize("e", [1, 4])
    def test_no_grad_matches_grouped_and_reference(self, dtype, t, e):
        out, ref, truth = self._no_grad(self.inputs(t, e), dtype)
        assert_within_rule(out, ref, truth, dtype, f"{self.op_name} output (no grad)")

    @pytest.mark.parametrize("case", ["top_k", "sentence", "every token an adapter", "one adapter"])
    def test_no_grad_routing_and_ids(self, case):
        inputs = {
            "top_k": lambda: self.inputs(33, 4, top_k=2, renormalize=True),
            "sentence": lambda: self.inputs(5, 4, sentence=True),
            "every token an adapter": lambda: self.inputs(9, 3),
            "one adapter": lambda: self.inputs(9, 3),
        }[case]()
        if case == "every token an adapter":
            inputs["adapter_ids"] = inputs["adapter_ids"].clamp(min=0)
        if case == "one adapter":
            inputs["adapter_ids"] = torch.full_like(inputs["adapter_ids"], 1)
        out, ref, truth = self._no_grad(inputs, torch.float32)
        assert_within_rule(out, ref, truth, torch.float32, f"{self.op_name} output (no grad, {case})")


class _MoLoRAInference(_Inference):
    """The sorted form (the batched one, which other tests cover, disabled)."""

    segments = "_segments_molora"

    @pytest.fixture(autouse=True)
    def _sorted(self, monkeypatch):
        monkeypatch.setattr(banked, "BATCHED_MAX_TOKENS", 0)


class _MoVInference(_Inference, _Grouped):
    segments = "_segments_mov"


class TestMoVBankTorchInference(MoVBank, _MoVInference):
    implementation = "torch"


class TestMoVLinearBankTorchInference(MoVLinearBank, _MoVInference):
    implementation = "torch"


class TestMoVFFNBankTorchInference(MoVFFNBank, _MoVInference):
    implementation = "torch"


class TestMoLoRALinearBankTorchInference(MoLoRALinearBank, _MoLoRAInference):
    implementation = "torch"


class TestMoLoRAAdapterBankTorchInference(MoLoRAAdapterBank, _MoLoRAInference):
    implementation = "torch"

    def test_no_grad_without_base(self):
        inputs = self.inputs(11, 3)
        inputs["base"] = None
        self._no_grad(inputs, torch.float32)


#: adapter 2 absent (a prefix of the bank present), padded rows, every adapter once per row, adapter 0 absent
BATCHED_IDS = [[1, 0, -1, 1, 0, 0, 1], [2, 2, 0, 2, -1, 2, 1], [0, 1, 2, 2, 1, 0], [2, -1, 1, 2, 1, 2]]


class _Batched:
    """``"torch"`` when autograd records nothing on small batches naming several ids: batched over the adapters
    present (``batched``, spied: the strategies in ``refused`` must not run), within the rule against the banked
    reference, rows of id -1 exactly the base; in float64 equal to each adapter run alone (a wrong adapter's
    block, a dropped base or a wrong scale would show there). ``bound``: the token bound, lifted here;
    ``fallback``: the strategy taken past the padding bound."""

    batched: str
    refused: tuple[str, ...]
    bound: str
    fallback: str

    @pytest.fixture(autouse=True)
    def _batched_strategy(self, monkeypatch):
        monkeypatch.setattr(banked, self.bound, 10**6)

    def _run(self, args: dict, batched: bool) -> torch.Tensor:
        calls, batched_fn = [], getattr(banked, self.batched)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(banked, self.batched, lambda *a: calls.append(1) or batched_fn(*a))
            for name in self.refused:
                m.setattr(banked, name, lambda *a, _n=name: pytest.fail(f"{_n} called"))
            with torch.no_grad():
                out = self.call("torch", **args)
        assert len(calls) == batched, "not the batched path"
        return out

    def _check(self, inputs: dict, dtype: torch.dtype) -> None:
        args = _cast(inputs, dtype, torch.float32)
        out = self._run(args, len(set(inputs["adapter_ids"].reshape(-1).tolist())) > 1)
        with torch.no_grad():
            ref = self.call("reference", **args)
            truth = self.call("reference", **_cast(inputs, torch.float64, torch.float64))
        assert_within_rule(out, ref, truth, dtype, f"{self.op_name} output (batched)")
        base_rows = inputs["adapter_ids"].reshape(ref.shape[:-1]) < 0
        assert torch.equal(out[base_rows], ref[base_rows]), "rows of id -1 are not the base"

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("t", [1, 7, 123])
    @pytest.mark.parametrize("e", [1, 4])
    def test_batched_matches_reference(self, dtype, t, e):
        self._check(self.inputs(t, e), dtype)

    @pytest.mark.parametrize("case", ["top_k", "sentence", "every token an adapter", "uneven"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_batched_routing_and_ids(self, case, dtype):
        if case == "sentence":
            inputs = self.inputs(5, 4, sentence=True)
        else:  # top-k routing, with the ids below
            inputs = self.inputs(9, 4, top_k=2, renormalize=True)
        if case == "every token an adapter":
            inputs["adapter_ids"] = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1])
        if case == "uneven":  # padded: adapter 2 has 4 rows, adapter 0 one
            inputs["adapter_ids"] = torch.tensor([2, -1, 2, 0, 2, -1, 1, 2, 1])
        self._check(inputs, dtype)

    @pytest.mark.parametrize("ids", BATCHED_IDS)
    @pytest.mark.parametrize("e", [1, 3])
    def test_batched_float64_equals_each_adapter(self, ids, e):
        inputs = _cast(self.inputs(len(ids), e), torch.float64, torch.float64)
        inputs["adapter_ids"] = torch.tensor(ids)
        out = self._run(inputs, True)
        with torch.no_grad():
            want = self._per_adapter(**inputs)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)

    def test_batched_in_inference_mode(self):
        """Parameters made in inference mode (no version counter: nothing kept) give the same bits."""
        inputs = _cast(self.inputs(9, 3), torch.float32, torch.float32)
        kept = self._run(inputs, True)
        with torch.inference_mode():
            fresh = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            assert all(v.is_inference() for v in fresh.values() if isinstance(v, torch.Tensor))
            assert torch.equal(self._run(fresh, True), kept)

    def test_bounds_take_another_form(self, monkeypatch):
        """Padding beyond BATCHED_MAX_PADDING times the rows takes ``fallback``; more tokens than the bound, the
        sorted form."""
        inputs = self.inputs(12, 3)
        inputs["adapter_ids"] = torch.tensor([0] * 10 + [1, 2])  # P·L = 30 rows for 12 tokens
        calls = []
        for name in {self.fallback, self.refused[0]}:
            fn = getattr(banked, name)
            monkeypatch.setattr(banked, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
        monkeypatch.setattr(banked, self.batched, lambda *a: pytest.fail(f"{self.batched} called"))
        with torch.no_grad():
            self.call("torch", **inputs)
            monkeypatch.setattr(banked, "BATCHED_MAX_PADDING", 30 / 12)
            monkeypatch.setattr(banked, self.bound, 11)
            self.call("torch", **inputs)
        assert calls == [self.fallback, self.refused[0]]


class _MoLoRABatched(_Batched):
    batched, refused, bound, fallback = (
        "_batched_molora",
        ("_segments_molora",),
        "BATCHED_MAX_TOKENS",
        "_segments_molora",
    )


#: every adapter present with 3 rows (the batched shrink's one ``bmm``); adapter 0 with one row, 2 with four
EVEN_IDS, UNEVEN_IDS = [2, 0, 1, 1, 0, 2, 2, 0, 1], [2, 1, 2, 0, 2, -1, 1, 2, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("e", [1, 3])
@pytest.mark.parametrize("ids", [EVEN_IDS, UNEVEN_IDS], ids=["even", "uneven"])
def test_batched_shrink_gives_each_adapters_own_gemm_bits(monkeypatch, ids, e, dtype):
    """The batched MoLoRA shrink: one ``bmm`` over the kept operands where every adapter has the same rows, else
    one GEMM per adapter; either way each adapter's block is bitwise its own single-adapter GEMM's (x_a @
    shrink_operand, which the grouped forms and the single-adapter op run), pad rows zero. 16-bit LoRA's GEMM
    (no router: 16-bit x) runs per adapter."""
    torch.manual_seed(0)
    rank = 2
    lora_a = torch.randn(A, e, K, rank).requires_grad_()  # parameters: a version counter, operands kept
    router = torch.randn(A, K, e).requires_grad_() if e > 1 else None
    x = torch.randn(len(ids), K, dtype=dtype)
    groups = ops.AdapterGroups.from_ids(torch.tensor(ids), A)
    each = []
    shrink_each = banked._shrink_each
    monkeypatch.setattr(banked, "_shrink_each", lambda *a: each.append(1) or shrink_each(*a))
    with torch.no_grad():
        ul = banked._padded_shrink(x, groups, lora_a, router)
    bmm = ids == EVEN_IDS and not (router is None and dtype == torch.bfloat16)
    assert len(each) == (0 if bmm else 1)
    _, _, present, length = groups.padded()
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    for j, a in enumerate(present.tolist()):
        x_a = x[torch.tensor(ids) == a]
        if router is not None:
            x_a = x_a.to(cd)
        with torch.no_grad():
            want = x_a @ ops.molora.shrink_operand(lora_a[a], None if router is None else router[a], dtype)
        assert torch.equal(ul[j, : x_a.shape[0]], want), f"adapter {a}"
        assert torch.count_nonzero(ul[j, x_a.shape[0] :]) == 0, f"adapter {a}'s pad rows"
    assert ul.shape == (len(present), length, want.shape[1])


class _MoVBatched(_Batched):
    batched, refused, bound, fallback = (
        "_batched_mov",
        ("_segments_mov", "_gathered_mov"),
        "GATHER_MAX_TOKENS",
        "_gathered_mov",
    )


class TestMoLoRALinearBankTorchBatched(MoLoRALinearBank, _MoLoRABatched):
    implementation = "torch"


class TestMoLoRAAdapterBankTorchBatched(MoLoRAAdapterBank, _MoLoRABatched):
    implementation = "torch"

    def test_batched_without_base(self):
        inputs = self.inputs(11, 3)
        inputs["base"] = None
        self._check(inputs, torch.float32)


class TestMoVBankTorchBatched(MoVBank, _MoVBatched):
    implementation = "torch"


class TestMoVLinearBankTorchBatched(MoVLinearBank, _MoVBatched):
    implementation = "torch"


class TestMoVFFNBankTorchBatched(MoVFFNBank, _MoVBatched):
    implementation = "torch"


class TestMoVLinearBankAuto(MoVLinearBank):
    """``"auto"`` with adapter_ids resolves to ``"torch"`` on the CPU and gives the same results."""

    implementation = "auto"


# ------------------------------------------------------------------------------------------
# bad input: clear errors before any computation, naming the argument or the index
# ------------------------------------------------------------------------------------------

BAD_CASES = {
    "float ids": (lambda a: a.update(adapter_ids=a["adapter_ids"].float()), TypeError, r"integer tensor.*float32"),
    "bool ids": (lambda a: a.update(adapter_ids=a["adapter_ids"] > 0), TypeError, r"integer tensor.*torch.bool"),
    "list ids": (lambda a: a.update(adapter_ids=a["adapter_ids"].tolist()), TypeError, r"integer torch.Tensor"),
    "short ids": (lambda a: a.update(adapter_ids=a["adapter_ids"][:-1]), ValueError, r"shape \[T\] = \[7\].*got \[6\]"),
    "index = A": (lambda a: a["adapter_ids"].__setitem__(3, A), ValueError, r"index 3, outside \[-1, 3\)"),
    "index -2": (lambda a: a["adapter_ids"].__setitem__(0, -2), ValueError, r"index -2, outside \[-1, 3\)"),
    "unstacked": (lambda a: a.update(experts=a["experts"][0]), ValueError, r"experts must be stacked.*\[A, G, E, D\]"),
    "A differs": (
        lambda a: a.update(router=a["router"][:2]),
        ValueError,
        r"different numbers of adapters: experts A = 3, router A = 2",
    ),
}


@pytest.mark.parametrize("impl", ["reference", "torch", "auto"])
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_adapter_ids_and_banks(impl, case):
    change, exc, match = BAD_CASES[case]
    args = MoVLinearBank().inputs(7, 4)
    change(args)
    with pytest.raises(exc, match=match):
        ops.mov_linear(**args, implementation=impl)


def test_molora_bank_ranks_must_agree():
    args = MoLoRALinearBank().inputs(7, 4)
    args["lora_b"] = args["lora_b"][:, :, :2]
    with pytest.raises(ValueError, match=r"lora_b must have shape \[E, r, N\] = \[4, 4, 72\]"):
        ops.molora_linear(**args, implementation="torch")


def test_without_adapter_ids_stacked_parameters_are_refused():
    """Stacked parameters without adapter_ids are not silently read as one adapter."""
    args = MoVLinearBank().inputs(7, 4)
    args.pop("adapter_ids")
    with pytest.raises(ValueError, match="experts must have 3 dimensions"):
        ops.mov_linear(**args, implementation="torch")


def test_mov_ffn_base_rows_are_the_plain_ffn():
    """Rows of id -1 get exactly the FFN without an adapter, computed here from its formula."""
    args = MoVFFNBank().inputs(6, 4)
    args["adapter_ids"] = torch.tensor([-1, 0, -1, 1, -1, 0])
    with torch.no_grad():
        y = ops.mov_ffn(**args, implementation="torch")
        x = args["x"][[0, 2, 4]]
        h = F.gelu(F.linear(x, args["wi_0"]), approximate="tanh") * F.linear(x, args["wi_1"])
        want = F.linear(h, args["wo"])
    torch.testing.assert_close(y[[0, 2, 4]], want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# AdapterGroups: the ids with their segments, built once, accepted wherever adapter_ids is
# ------------------------------------------------------------------------------------------

OPS = {"mov": MoVBank, "mov_linear": MoVLinearBank, "mov_ffn": MoVFFNBank, "molora_linear": MoLoRALinearBank,
       "molora_adapter": MoLoRAAdapterBank}  # fmt: skip


def _sequence_groups(args: dict) -> ops.AdapterGroups:
    """The groups of ids [B, S] that are constant along each sequence, from the per-sequence host ids."""
    ids = args["adapter_ids"]
    return ops.AdapterGroups.from_sequences(ids[:, 0].tolist(), tuple(ids.shape), A)


def _per_sequence_inputs(bank: _Bank, e: int = 4) -> dict:
    """Inputs over 5 sequences of 6 tokens, each sequence one adapter (adapter 2 unused, one sequence the base)."""
    args = bank.inputs(30, e)
    lead = (5, 6)
    for k in ("x", "h", "base"):
        if args.get(k) is not None:
            args[k] = args[k].detach().reshape(lead + args[k].shape[-1:]).requires_grad_()
    args["adapter_ids"] = torch.tensor([1, -1, 0, 1, 0])[:, None].expand(lead)
    return args


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("how", ["from_ids", "from_sequences"])
@pytest.mark.parametrize("op", list(OPS))
def test_groups_give_the_ids_bits_and_gradients(op, how, grad, monkeypatch):
    """An AdapterGroups in place of the ids tensor: the same output bits and gradients (grouped strategy, and the
    gathered one where it exists, at 30 tokens), and no host read of the ids (no bincount, argsort, aminmax)."""
    bank = OPS[op]()
    args = _per_sequence_inputs(bank)
    groups = ops.AdapterGroups.from_ids(args["adapter_ids"], A) if how == "from_ids" else _sequence_groups(args)
    assert groups.counts == (6, 12, 12, 0)
    assert torch.equal(groups.ids, args["adapter_ids"].reshape(-1))
    assert torch.equal(groups.perm, torch.argsort(groups.ids, stable=True))
    for gather in (0, 10**6):
        monkeypatch.setattr(banked, "GATHER_MAX_TOKENS", gather)
        run = run_with_grads if grad else lambda fn, a: (fn(**a).detach(), {})
        want, want_grads = run(lambda **kw: bank.call("torch", **kw), args)
        with monkeypatch.context() as m:
            for name in ("bincount", "argsort", "aminmax"):
                m.setattr(torch, name, lambda *a, _n=name, **k: pytest.fail(f"torch.{_n} called"))
            got, got_grads = run(lambda **kw: bank.call("torch", **kw), dict(args, adapter_ids=groups))
        assert torch.equal(got, want)
        assert set(got_grads) == set(want_grads) - {"adapter_ids"}
        for name in got_grads:
            assert torch.equal(got_grads[name], want_grads[name]), f"d{name}"


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_groups_with_the_reference(impl):
    args = _per_sequence_inputs(MoLoRALinearBank())
    want = ops.molora_linear(**args, implementation="reference")
    got = ops.molora_linear(**dict(args, adapter_ids=_sequence_groups(args)), implementation=impl)
    if impl == "reference":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


GROUP_BAD_CASES = {
    "index = A": (lambda: ops.AdapterGroups.from_sequences([0, 3], (2, 4), 3), r"index 3, outside \[-1, 3\)"),
    "index -2": (lambda: ops.AdapterGroups.from_sequences([-2, 0], (2, 4), 3), r"index -2, outside \[-1, 3\)"),
    "ids index = A": (lambda: ops.AdapterGroups.from_ids(torch.tensor([0, 3]), 3), r"index 3, outside \[-1, 3\)"),
    "sequences": (lambda: ops.AdapterGroups.from_sequences([0, 1], (3, 4), 3), r"names 2 sequence\(s\).*\[3, 4\]"),
}


@pytest.mark.parametrize("case", list(GROUP_BAD_CASES))
def test_groups_refuse_bad_ids_when_built(case):
    build, match = GROUP_BAD_CASES[case]
    with pytest.raises(ValueError, match=match):
        build()


def test_groups_from_ids_refuse_non_integer_ids():
    with pytest.raises(TypeError, match=r"integer tensor.*float32"):
        ops.AdapterGroups.from_ids(torch.zeros(3), 3)
    with pytest.raises(TypeError, match=r"integer torch.Tensor"):
        ops.AdapterGroups.from_ids([0, 1], 3)


@pytest.mark.parametrize("impl", ["reference", "torch", "auto"])
def test_groups_must_fit_the_tokens_and_the_bank(impl):
    args = MoVLinearBank().inputs(7, 4)
    short = ops.AdapterGroups.from_ids(args["adapter_ids"][:-1], A)
    with pytest.raises(ValueError, match=r"shape \[T\] = \[7\].*AdapterGroups for tokens of shape \[6\]"):
        ops.mov_linear(**dict(args, adapter_ids=short), implementation=impl)
    other_bank = ops.AdapterGroups.from_ids(args["adapter_ids"], A + 1)
    with pytest.raises(ValueError, match=r"AdapterGroups built for a bank of 4 adapter\(s\).*hold 3"):
        ops.mov_linear(**dict(args, adapter_ids=other_bank), implementation=impl)


# ------------------------------------------------------------------------------------------
# MoLoRA without autograd: each bank site's shrink operands are kept while the parameters keep their values
# ------------------------------------------------------------------------------------------


def test_shrink_operands_are_kept_and_follow_parameter_changes(monkeypatch):
    """The re-laid lora_a ([A_cat | router] per adapter) is built once per parameter state: a second call builds
    nothing, an in-place change of lora_a or of the router (an optimizer step) is seen, and the outputs stay
    the uncached grouped form's bits."""
    monkeypatch.setattr(banked, "BATCHED_MAX_TOKENS", 0)  # the sorted form, bitwise the Function
    bank = MoLoRALinearBank()
    args = bank.inputs(40, 4)
    lora_a = torch.nn.Parameter(args["lora_a"].detach().clone())
    router = torch.nn.Parameter(args["router"].detach().clone())
    args.update(lora_a=lora_a, router=router)
    built = []
    operand = banked.shrink_operand
    monkeypatch.setattr(banked, "shrink_operand", lambda *a: built.append(1) or operand(*a))

    def no_grad_and_with_grad(args):
        with torch.no_grad():
            out = bank.call("torch", **args)
        with_grad = bank.call("torch", **args)  # records: the Function, which builds its own operands
        assert with_grad.requires_grad and torch.equal(out, with_grad.detach())
        return out

    first = no_grad_and_with_grad(args)
    assert len(built) == A
    assert torch.equal(no_grad_and_with_grad(args), first) and len(built) == A  # kept
    for p in (lora_a, router):
        with torch.no_grad():
            p.mul_(1.5)
        changed = no_grad_and_with_grad(args)
        assert not torch.equal(changed, first)
        first = changed
    assert len(built) == 3 * A
    key = id(lora_a)
    assert key in banked._SHRINK_OPERANDS
    del args, lora_a
    assert key not in banked._SHRINK_OPERANDS  # kept no longer than the parameter


def test_gradients_reach_lora_a_after_cached_inference():
    """A no_grad call (which keeps the operands) does not detach training: gradients still reach lora_a."""
    bank = MoLoRALinearBank()
    args = bank.inputs(20, 4)
    with torch.no_grad():
        bank.call("torch", **args)
    out = bank.call("torch", **args)
    out.sum().backward()
    assert args["lora_a"].grad is not None and torch.count_nonzero(args["lora_a"].grad[:2]) > 0


# ------------------------------------------------------------------------------------------
# Runs of consecutive rows (inference over sequences): row views of the inputs, no permutation copies
# ------------------------------------------------------------------------------------------

#: sequence ids and prompt length S (odd): adjacent sequences of one id merge into one run, ids repeated in
#: non-adjacent runs, runs of -1 (the base alone); "one run per id" has the sorted form's GEMM shapes
RUN_CASES = {
    "repeats and base": ([1, 1, -1, 0, 1, -1, -1, 0], 17),
    "every sequence an adapter": ([0, 1, 2, 0, 1, 2, 0], 19),
    "one run per id": ([-1, 1, 1, 0, 2], 21),
}
RUNS = {"mov": "_runs_mov", "mov_linear": "_runs_mov", "mov_ffn": "_runs_mov", "molora_linear": "_runs_molora",
        "molora_adapter": "_runs_molora"}  # fmt: skip
SORTED = {name: ("_segments_molora" if runs == "_runs_molora" else "_segments_mov") for name, runs in RUNS.items()}


def _run_inputs(bank: _Bank, seq: list[int], s: int, e: int, *, top_k=None, renormalize=False, sentence=False):
    """Inputs of len(seq) sequences of s tokens, sequence b all of adapter seq[b] (ids [B, S])."""
    lead = (len(seq), s)
    args = bank.inputs(lead[0] * s, e, top_k=top_k, renormalize=renormalize)
    for k in ("x", "h", "base"):
        if args.get(k) is not None:
            args[k] = args[k].detach().reshape(lead + args[k].shape[-1:]).requires_grad_()
    args["adapter_ids"] = torch.tensor(seq)[:, None].expand(lead)
    if sentence:
        args.update(router=_rand(A, 9, e, std=0.5), router_input=_rand(lead[0], 9))
    return args


def _call_spied(bank: _Bank, op: str, args: dict, taken: str, refused: str, monkeypatch) -> torch.Tensor:
    """The op without autograd, failing unless the strategy ``taken`` runs (once) and ``refused`` does not; the
    caller's tensors must come back unchanged (the runs form writes in place into its own output only)."""
    calls = []
    fn = getattr(banked, taken)
    before = {k: v.detach().clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    with monkeypatch.context() as m:
        m.setattr(banked, taken, lambda *a, **k: calls.append(1) or fn(*a, **k))
        m.setattr(banked, refused, lambda *a, **k: pytest.fail(f"{refused} called"))
        with torch.no_grad():
            out = bank.call("torch", **args)
    assert len(calls) == 1, f"{taken} not taken"
    for k, v in before.items():
        assert torch.equal(args[k].detach(), v), f"{op}: {k} changed in place"
    return out


def _runs_groups(args: dict) -> ops.AdapterGroups:
    return ops.AdapterGroups.from_sequences(args["adapter_ids"][:, 0].tolist(), tuple(args["adapter_ids"].shape), A)


def test_groups_from_sequences_know_their_runs():
    g = ops.AdapterGroups.from_sequences([1, 1, -1, 0, 1, -1], (6, 3), 3)
    assert g.runs == ((0, 6, 1), (6, 9, -1), (9, 12, 0), (12, 15, 1), (15, 18, -1))
    assert ops.AdapterGroups.from_sequences([2], (1, 5), 3).runs == ((0, 5, 2),)
    assert ops.AdapterGroups.from_ids(torch.tensor([0, 0, 1]), 3).runs is None  # unknown without a host read


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(RUN_CASES))
@pytest.mark.parametrize("op", list(OPS))
def test_runs_match_the_sorted_form_and_reference(op, case, dtype, monkeypatch):
    """Prefill-like groups (runs of >= RUN_MIN_MEAN_ROWS rows): the runs form runs, leaves the inputs alone,
    and is within the rule against the reference; with one run per id (the sorted form's GEMM shapes) it is
    the sorted form's bits, and inference mode gives the same bits. Not mov_ffn's: its activation runs once
    over all rows there and per adapter segment in the sorted form, and torch's elementwise kernels round
    a vector tail (numel not a multiple of the vector width) otherwise than full vectors."""
    monkeypatch.setattr(banked, "RUN_MIN_MEAN_ELEMENTS", 0)  # the tests' rows are narrow
    monkeypatch.setattr(banked, "BATCHED_MAX_TOKENS", 0)  # plain ids: the sorted form
    bank = OPS[op]()
    seq, s = RUN_CASES[case]
    args = _cast(_run_inputs(bank, seq, s, 4), dtype, torch.float32)
    groups = _runs_groups(args)
    assert sum(groups.counts) >= banked.RUN_MIN_MEAN_ROWS * len(groups.runs)
    out = _call_spied(bank, op, dict(args, adapter_ids=groups), RUNS[op], SORTED[op], monkeypatch)
    sorted_form = _call_spied(bank, op, args, SORTED[op], RUNS[op], monkeypatch)  # plain ids: runs unknown
    with torch.no_grad():
        ref = bank.call("reference", **args)
        truth = bank.call("reference", **_cast(args, torch.float64, torch.float64))
    assert_within_rule(out, ref, truth, dtype, f"{op} output (runs, {case})")
    assert_within_rule(sorted_form, ref, truth, dtype, f"{op} output (sorted, {case})")
    if case == "one run per id" and op != "mov_ffn":
        assert torch.equal(out, sorted_form), "not the sorted form's bits"
    with torch.inference_mode():
        assert torch.equal(bank.call("torch", **dict(args, adapter_ids=groups)), out)


@pytest.mark.parametrize("case", ["top_k", "sentence", "lora"])
@pytest.mark.parametrize("op", list(OPS))
def test_runs_routing(op, case, monkeypatch):
    """The runs form with top-k routing, sentence routing (per-sequence router input) and one expert."""
    monkeypatch.setattr(banked, "RUN_MIN_MEAN_ELEMENTS", 0)
    bank = OPS[op]()
    seq, s = RUN_CASES["repeats and base"]
    kw = {"top_k": dict(e=4, top_k=2, renormalize=True), "sentence": dict(e=4, sentence=True), "lora": dict(e=1)}
    args = _run_inputs(bank, seq, s, **kw[case])
    args = _cast(args, torch.float32, torch.float32)
    out = _call_spied(bank, op, dict(args, adapter_ids=_runs_groups(args)), RUNS[op], SORTED[op], monkeypatch)
    with torch.no_grad():
        ref = bank.call("reference", **args)
        truth = bank.call("reference", **_cast(args, torch.float64, torch.float64))
    assert_within_rule(out, ref, truth, torch.float32, f"{op} output (runs, {case})")


@pytest.mark.parametrize("case", ["S = 1", "S = 15", "narrow rows"])
@pytest.mark.parametrize("op", ["mov_linear", "molora_linear"])
def test_short_runs_keep_the_sorted_form(op, case, monkeypatch):
    """Runs shorter than RUN_MIN_MEAN_ROWS on average (decoding: S = 1), or saving fewer than
    RUN_MIN_MEAN_ELEMENTS copied elements on average, take the sorted form (the gathered and batched ones
    disabled here)."""
    bank = OPS[op]()
    s = {"S = 1": 1, "S = 15": 15, "narrow rows": banked.RUN_MIN_MEAN_ROWS}[case]
    args = _cast(_run_inputs(bank, [1, 0, 1, -1, 0] * 16, s, 4), torch.float32, torch.float32)
    n = bank.call("torch", **args).shape[-1]
    copied = K + 2 * n if op == "molora_linear" else 2 * n  # the row elements the sorted form copies
    elements = 0 if case != "narrow rows" else s * copied + 1  # one more than a run saves
    monkeypatch.setattr(banked, "RUN_MIN_MEAN_ELEMENTS", elements)
    monkeypatch.setattr(banked, "GATHER_MAX_TOKENS", 0)
    monkeypatch.setattr(banked, "BATCHED_MAX_TOKENS", 0)
    _call_spied(bank, op, dict(args, adapter_ids=_runs_groups(args)), SORTED[op], RUNS[op], monkeypatch)
    if case == "narrow rows":  # and exactly at the bound, the runs form
        monkeypatch.setattr(banked, "RUN_MIN_MEAN_ELEMENTS", elements - 1)
        _call_spied(bank, op, dict(args, adapter_ids=_runs_groups(args)), RUNS[op], SORTED[op], monkeypatch)
