"""pytest-benchmark options for ``pytest bench/ --benchmark-only``."""

from __future__ import annotations

import os
import pathlib

# Keep tool caches inside the checkout (never $HOME); set before torch/triton are imported.
_cache = pathlib.Path(__file__).resolve().parent.parent / ".cache"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_cache / "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", str(_cache / "triton"))


def pytest_addoption(parser):
    group = parser.getgroup("pemoe-bench")
    group.addoption("--bench-tokens", type=int, default=256, help="tokens T of the benchmarked shapes")
    group.addoption("--bench-dtypes", default="float32", help="comma list of dtypes (float32,bfloat16)")
    group.addoption("--bench-device", default=None, help="device (default: cuda if available, else cpu)")


def pytest_generate_tests(metafunc):
    if "dtype_name" in metafunc.fixturenames:
        names = [s.strip() for s in metafunc.config.getoption("--bench-dtypes").split(",") if s.strip()]
        metafunc.parametrize("dtype_name", names)
