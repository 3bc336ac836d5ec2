"""Package layout. Metadata lives in pyproject.toml.

- ``pemoe/``: the package.
- ``kernels/triton``, ``kernels/pallas``: installed as ``pemoe.kernels.triton`` / ``pemoe.kernels.pallas``
  (their parent ``pemoe.kernels`` is ``pemoe/kernels/__init__.py``). The top-level ``kernels/`` folder has no
  ``__init__.py`` on purpose: run from a checkout, a top-level package named ``kernels`` would shadow the
  Hugging Face ``kernels`` package that transformers imports.
- ``bench/``: installed as ``pemoe.bench`` (so ``pemoe bench`` works from a wheel).
"""

from setuptools import find_packages, setup

package_dir = {"pemoe.bench": "bench"}
package_dir |= {f"pemoe.kernels.{p}": f"kernels/{p.replace('.', '/')}" for p in find_packages("kernels")}

setup(
    packages=find_packages(include=["pemoe", "pemoe.*"]) + list(package_dir),
    package_dir=package_dir,
)
