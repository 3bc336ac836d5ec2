"""TPU (Mosaic) tiling rules shared by the Pallas kernels' block-size dataclasses.

A block dimension must equal the array dimension or be a multiple of the hardware tile: 8 sublanes for
the second-to-last axis, 128 lanes for the last. Output (parallel) blocks may leave a partial last block
but must not exceed the dimension; reduction blocks must divide it (no partial reduction block).
"""

from __future__ import annotations

SUBLANES, LANES = 8, 128

_UNIT = {SUBLANES: "TPU sublanes", LANES: "TPU lanes"}


def _check_multiple(name: str, value: int, dim: str, size: int, multiple: int) -> None:
    if value % multiple:
        raise ValueError(
            f"{name} must equal {dim} = {size} or be a multiple of {multiple} ({_UNIT[multiple]}), got {value}"
        )


def check_output_block(name: str, value: int, dim: str, size: int, multiple: int) -> None:
    """``value`` tiles a parallel axis of length ``size``: equal to it, or a multiple of ``multiple`` ≤ it."""
    if value == size:
        return
    _check_multiple(name, value, dim, size, multiple)
    if value > size:
        raise ValueError(f"{name} = {value} is larger than {dim} = {size}; use {name} = {dim}")


def check_reduction_block(name: str, value: int, dim: str, size: int) -> None:
    """``value`` tiles a reduction (lane) axis of length ``size``: equal to it, or a lane multiple dividing it."""
    if value == size:
        return
    _check_multiple(name, value, dim, size, LANES)
    if size % value:
        raise ValueError(f"{name} must divide {dim} = {size} (no partial reduction block), got {value}")
