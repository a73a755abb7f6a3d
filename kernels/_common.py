"""Small helpers every kernel launcher shares."""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels then cast tl.dot operands to fp32: bf16 dot is wrong there)."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # pragma: no cover - older triton
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact products for fp32 (TF32 misses fp32 tolerances), default otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"
