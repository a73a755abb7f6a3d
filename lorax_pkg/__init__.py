"""lorax: many LoRA adapters on Mixture-of-Experts LLMs.

The top-level package is tiny on purpose: importing ``lorax`` never imports torch. Subpackages live in
the repository's top-level folders (``cli/``, ``adapters/``, ``inference/``, ``kernels/``, ``recipes/``)
and are mapped onto ``lorax.*`` by pyproject.toml.
"""

__version__ = "0.1.0"
