import os
import pathlib
import sys

# Keep tool caches inside the checkout (never $HOME); set before torch/triton are imported.
_cache = pathlib.Path(__file__).resolve().parent.parent / ".cache"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_cache / "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", str(_cache / "triton"))

# jax-triton and jaxlib's CUDA plugin (for jax.export to CUDA without a GPU) live outside site-packages, in
# .venv/cuda-export (scripts/setup.sh says why); they must be importable before jax is first imported, here and
# in the tests' child processes.
_cuda_export = pathlib.Path(__file__).resolve().parent.parent / ".venv" / "cuda-export"
if _cuda_export.is_dir():
    sys.path.insert(0, str(_cuda_export))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(_cuda_export), os.environ.get("PYTHONPATH")) if p)

import pytest  # noqa: E402
import torch  # noqa: E402

# No GPU: the Triton kernels run in the Triton interpreter, which must be switched on before
# any kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
