"""Checks shared by the Pallas kernels' block-size dataclasses (the TPU tiling rules are in ``_tpu.py``)."""

from __future__ import annotations

import dataclasses


def check_positive_ints(blocks: object) -> None:
    """Every field of the dataclass ``blocks`` is a positive int (a bool is not), else ValueError naming it."""
    for field in dataclasses.fields(blocks):
        value = getattr(blocks, field.name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field.name} must be a positive int, got {value!r}")


def is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def check_triton_tile(name: str, value: int) -> None:
    """A block dimension of a kernel lowered through Pallas' Triton backend: a power of two ≥ 16."""
    if not is_pow2(value) or value < 16:
        raise ValueError(f"{name} must be a power of two >= 16 (Triton tiles; tl.dot's 16x16x16 minimum), got {value}")
