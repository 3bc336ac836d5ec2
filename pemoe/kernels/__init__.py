"""Accelerator kernels: Triton (``pemoe.kernels.triton``) and Pallas (``pemoe.kernels.pallas``).

Their sources live in the checkout's top-level ``kernels/`` folder, which is deliberately not a Python
package of its own (it has no ``__init__.py``): transformers depends on the Hugging Face package named
``kernels``, and a regular package ``kernels`` at the checkout root would shadow it for every command run
from there (``python -m pytest``, ``python -c``). setup.py installs ``kernels/triton`` and
``kernels/pallas`` as subpackages of this one.

The kernels never import the rest of pemoe or transformers: the functional API in :mod:`pemoe.ops`
imports kernels, not the other way round.
"""
