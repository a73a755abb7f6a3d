"""Everything about LoRA adapter files. CPU only; never imports lorax.inference or lorax.kernels."""

from lorax.adapters.canonical import CanonicalAdapter, LoraPair, MoELora

__all__ = ["CanonicalAdapter", "LoraPair", "MoELora"]
