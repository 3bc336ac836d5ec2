#!/usr/bin/env bash
# Creates .venv in the checkout and installs pemoe with its dev, hf (transformers, peft, accelerate, trl), quant
# (bitsandbytes, torchao) and triton extras (Triton's interpreter and compiler run the kernel tests on the CPU) and the jax extra.
# On a machine with no torch yet it installs the CPU build of torch 2.13.0 first (from a local
# wheel where one lies, else from the PyTorch CPU index), never a multi-GB CUDA build.
# Set PEMOE_TORCH="torch==X" to install another torch (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${PEMOE_TORCH:-}" ]; then
    "${PIP[@]}" "$PEMOE_TORCH"
  elif ! "${PIP[@]}" "torch==2.13.0+cpu" 2>/dev/null; then
    "${PIP[@]}" "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${PIP[@]}" -e ".[dev,hf,triton,jax,quant]"
# Lowering pemoe.jax's kernels for CUDA without a GPU (jax.export tests): jax-triton, and jaxlib's CUDA plugin of
# the installed jaxlib's version without its PJRT runtime and CUDA libraries (--no-deps: ~8 MB instead of GBs).
# They go to .venv/cuda-export, outside site-packages, because the plugin logs "Could not find cuda drivers" at
# every `import jax` on a machine without a GPU; tests/conftest.py puts that folder on sys.path (and PYTHONPATH
# for child processes). A GPU machine installs the full stack instead: pip install -e ".[jax-gpu]".
JAXLIB_VERSION=$(.venv/bin/python -c "import jaxlib; print(jaxlib.__version__)")
"${PIP[@]}" absl-py
"${PIP[@]}" --no-deps --upgrade --target .venv/cuda-export "jax-cuda12-plugin==$JAXLIB_VERSION" "jax-triton==0.3.1"
# What was resolved (pip takes the newest transformers/peft/jax on every fresh install): one look finds the next
# upstream change.
.venv/bin/python - <<'PY'
import importlib.metadata as md

names = [
    "torch", "triton", "jax", "jaxlib", "flax", "transformers", "peft", "accelerate", "trl", "safetensors", "kernels",
    "bitsandbytes", "torchao", "pemoe",
]
found = {name: md.version(name) for name in names if any(True for _ in md.distributions(name=name))}
export = {d.metadata["Name"]: d.version for d in md.distributions(path=[".venv/cuda-export"])}
print("scripts/setup.sh resolved:")
for name in names:
    print(f"  {name:<18} {found.get(name, 'not installed')}")
for name in ("jax-triton", "jax-cuda12-plugin"):
    print(f"  {name:<18} {export.get(name, export.get(name.replace('-', '_'), 'not installed'))} (.venv/cuda-export)")
PY
