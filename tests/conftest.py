import os
import pathlib

# Keep tool caches inside the checkout (never $HOME); set before torch/triton are imported.
_cache = pathlib.Path(__file__).resolve().parent.parent / ".cache"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_cache / "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", str(_cache / "triton"))

import pytest  # noqa: E402
import torch  # noqa: E402

# No GPU: the Triton kernels run in the Triton interpreter, which must be switched on before
# any kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
