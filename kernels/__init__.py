"""Compute kernels. Each file holds Triton kernel(s), a launcher, and the `*_ref` torch reference.

Kernels take tensors and host-side sizes only; they never import lorax.inference or lorax.adapters.
`lorax.kernels.registry.get_ops(device)` picks the backend once (Triton on CUDA, references on CPU).
"""
