"""The MoE-LoRA inference engine."""
