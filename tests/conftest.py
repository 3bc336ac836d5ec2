import os
import pathlib

# Keep tool caches inside the checkout (never $HOME); set before torch/triton are imported.
_cache = pathlib.Path(__file__).resolve().parent.parent / ".cache"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_cache / "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", str(_cache / "triton"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
