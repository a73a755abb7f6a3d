"""Everything about LoRA adapter files. CPU only; never imports lorax.inference or lorax.kernels.

Public API: ``load_adapter`` (any supported layout -> CanonicalAdapter), ``save_adapter`` (canonical ->
a layout on disk), ``check_against_config`` (adapter vs a model's config.json), and
``lorax.adapters.inspect.inspect_adapter`` (the `lorax inspect --json` object).
"""

from lorax.adapters.canonical import CanonicalAdapter, LoraPair, MoELora
from lorax.adapters.layouts import LAYOUTS, save_adapter
from lorax.adapters.model_config import check_against_config
from lorax.adapters.peft_io import load_adapter

__all__ = [
    "LAYOUTS",
    "CanonicalAdapter",
    "LoraPair",
    "MoELora",
    "check_against_config",
    "load_adapter",
    "save_adapter",
]
