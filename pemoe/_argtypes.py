"""argparse value types shared by the command line and the benchmark runner."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence


def csv_list(valid: Sequence[str], what: str, convert: Callable[[str], object] = str) -> Callable[[str], list]:
    """argparse type: a comma list whose items must be in ``valid`` (empty ``valid``: any, via ``convert``)."""

    def parse(text: str) -> list:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {what} list")
        out = []
        for s in items:
            if valid and s not in valid:
                raise argparse.ArgumentTypeError(f"unknown {what} {s!r}; valid {what}s: {', '.join(valid)}")
            try:
                out.append(convert(s))
            except ValueError:
                raise argparse.ArgumentTypeError(f"invalid {what} {s!r}") from None
        return out

    return parse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    v = int(text)
    if v < 1:
        raise ValueError(text)
    return v
