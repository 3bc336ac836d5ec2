"""The ops skip their argument checks for a call signature that passed them before
(:func:`pemoe._checks.signature`): a bad call must still be refused after any number of good ones, with the
message the checks give, and a known signature must really skip them."""

from __future__ import annotations

import math

import pytest
import torch

from pemoe import _checks, ops
from tests.test_bad_input import E, K, N, R, T
from tests.test_bad_input import molora_args as single_args

A = 4


@pytest.fixture(autouse=True)
def fresh_table():
    _checks._PASSED.clear()
    yield
    _checks._PASSED.clear()


def bank_args(**over):
    """single_args' call over a bank of A adapters, with an adapter id per token (-1: the base)."""
    bank = dict(
        lora_a=torch.randn(A, E, K, R),
        lora_b=torch.randn(A, E, R, N),
        router=torch.randn(A, K, E),
        adapter_ids=torch.tensor([0, 1, 2, 3, -1, 0]),
    )
    return single_args(**{**bank, **over})


def mov_bank_args(**over):
    args = dict(
        h=torch.randn(T, N),
        router=torch.randn(A, N // 2, E),
        experts=torch.randn(A, 2, E, N // 2),
        adapter_ids=torch.tensor([0, 1, 2, 3, -1, 0]),
    )
    args.update(over)
    return args


# Each bad variant differs from the good call only in what the signature must tell apart: a type with an
# equal value (True == 1), a device, requires_grad of a frozen weight, a non-finite number, ids' values.
BAD_VARIANTS = [
    ("top_k", {"top_k": True}, {"top_k": 1}, TypeError, r"top_k must be an int or None"),
    ("renormalize", {"renormalize": 1}, {"renormalize": True}, TypeError, r"renormalize must be a bool"),
    ("scale", {"scale": True}, {"scale": 1.0}, TypeError, r"scale must be a Python float"),
    ("scale", {"scale": math.inf}, {"scale": 1.0}, ValueError, r"scale must be finite"),
    ("device", {"lora_b": "meta"}, {}, ValueError, r"all tensors must be on one device"),
]


@pytest.mark.parametrize("bank", [False, True], ids=["single", "bank"])
@pytest.mark.parametrize(
    "what,bad,good,exc,match", BAD_VARIANTS, ids=[f"{v[0]}-{i}" for i, v in enumerate(BAD_VARIANTS)]
)
def test_bad_call_after_good_calls_is_refused(bank, what, bad, good, exc, match):
    make = bank_args if bank else single_args
    args = make(**good)
    with torch.no_grad():
        for _ in range(2):
            ops.molora_linear(**args)
        bad_args = dict(args, **bad)
        if what == "device":
            bad_args["lora_b"] = args["lora_b"].to("meta")
        with pytest.raises(exc, match=match):
            ops.molora_linear(**bad_args)


@pytest.mark.parametrize("bank", [False, True], ids=["single", "bank"])
def test_frozen_weight_is_refused_once_autograd_records(bank):
    args = (bank_args if bank else single_args)()
    args["weight"].requires_grad_(True)
    with torch.no_grad():  # nothing recorded: a weight that requires grad is fine
        ops.molora_linear(**args)
    with pytest.raises(ValueError, match=r"weight requires grad, but it is a frozen base weight"):
        ops.molora_linear(**args)


def test_bank_ids_are_checked_at_every_call():
    args = bank_args()
    with torch.no_grad():
        ops.molora_linear(**args)
        with pytest.raises(ValueError, match=r"adapter_ids holds the index 4, outside \[-1, 4\)"):
            ops.molora_linear(**dict(args, adapter_ids=torch.tensor([0, 1, 2, 4, -1, 0])))
        groups = ops.AdapterGroups.from_ids(torch.tensor([0, 1, 2, 3, -1, 0]), A + 1)
        with pytest.raises(ValueError, match=r"AdapterGroups built for a bank of 5 adapter\(s\)"):
            ops.molora_linear(**dict(args, adapter_ids=groups))


def test_mov_bank_device_mismatch_after_good_call():
    args = mov_bank_args()
    ops.mov(**args)
    with pytest.raises(ValueError, match=r"all tensors must be on one device"):
        ops.mov(**dict(args, experts=args["experts"].to("meta")))


@pytest.mark.parametrize("bank", [False, True], ids=["single", "bank"])
def test_known_signature_skips_the_checks(bank, monkeypatch):
    calls = []
    original = _checks.check_molora

    def counting(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    monkeypatch.setattr(_checks, "check_molora", counting)
    args = (bank_args if bank else single_args)()
    with torch.no_grad():
        ops.molora_linear(**args)
        ops.molora_linear(**args)
        assert len(calls) == 1
        other = dict(args, x=torch.randn(T + 1, K))
        if bank:
            other["adapter_ids"] = torch.zeros(T + 1, dtype=torch.long)
        ops.molora_linear(**other)
        assert len(calls) == 2  # another shape: checked again
    ops.molora_linear(**args)  # autograd records now: checked again
    assert len(calls) == 3


def test_signature_remembers_nothing_it_cannot_describe(monkeypatch):
    assert _checks.signature("op", torch.ones(2), 1.0, None) is not None
    assert _checks.signature("op", [1.0]) is None
    assert _checks.signature("op", object()) is None
    _checks.remember(None)
    assert not _checks._PASSED
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _checks.signature("op", torch.ones(2)) is None


def test_table_is_bounded(monkeypatch):
    monkeypatch.setattr(_checks, "PASSED_MAX", 3)
    keys = [_checks.signature("op", torch.ones(n)) for n in range(1, 6)]
    for key in keys:
        _checks.remember(key)
        assert len(_checks._PASSED) <= 3
    assert _checks.passed(keys[-1])
    assert not _checks.passed(keys[0])
