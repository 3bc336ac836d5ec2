"""Masked 2-D tile loads and stores, and the grouped program order, shared by the Triton kernels.

A tile is addressed by two 1-D vectors of element offsets (strides already applied by the caller):
element (i, j) lives at ``ptr + row_offsets[i] + col_offsets[j]`` and is in bounds where
``row_mask[i] & col_mask[j]``. Out-of-bounds elements load as 0 (so they add nothing to a dot) and are
not stored.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_tile(ptr, row_offsets, col_offsets, row_mask, col_mask):
    """The [len(row_offsets), len(col_offsets)] tile at ptr, 0 where masked."""
    return tl.load(
        ptr + row_offsets[:, None] + col_offsets[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
    )


@triton.jit
def store_tile(ptr, row_offsets, col_offsets, value, row_mask, col_mask):
    """Stores ``value`` (a [len(row_offsets), len(col_offsets)] tile) at ptr where not masked."""
    tl.store(ptr + row_offsets[:, None] + col_offsets[None, :], value, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def grouped_ids(pid, num_m, num_n, GROUP_M):
    """(pid_m, pid_n) of program ``pid`` of a 1-D grid over num_m × num_n output tiles, in grouped order: GROUP_M
    row tiles sweep the column tiles together, so each column tile of the weight is read once per group and the
    group's rows stay in L2 while it does (the Triton matmul tutorial's order). GROUP_M may be a constexpr or a
    runtime integer ≥ 1 (a group size derived from the problem and the L2 size)."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_rows, (pid % width) // group_rows
