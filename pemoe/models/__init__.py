"""Reference models whose adapter sites run pemoe's fused ops (see :mod:`pemoe.models.t5`)."""

from pemoe.models.t5 import T5, T5Config

__all__ = ["T5", "T5Config"]
