"""Package layout: pemoe/ and kernels/ (installed as pemoe.kernels, so no top-level
``kernels`` module is created). Metadata lives in pyproject.toml."""

from setuptools import find_packages, setup

kernel_packages = ["pemoe.kernels"] + [f"pemoe.kernels.{p}" for p in find_packages("kernels")]

setup(
    packages=find_packages(include=["pemoe", "pemoe.*"]) + kernel_packages,
    package_dir={"pemoe.kernels": "kernels"},
)
