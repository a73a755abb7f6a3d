"""Small helpers every kernel launcher shares."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels then cast tl.dot operands to fp32: bf16 dot is wrong there)."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # pragma: no cover - older triton
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact products for fp32 (TF32 misses fp32 tolerances), default otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------------
# Programmatic dependent launch (PDL, sm_90+). A kernel launched with `launch_pdl=True` may start while
# the kernel before it in the stream is still running: its programs are scheduled once every program of
# the previous kernel has called `pdl_trigger` (or exited). Rules every kernel here keeps:
#   - before `pdl_wait` a program reads only data written by kernels *two or more* launches back, and
#     writes nothing the previous kernel reads;
#   - `pdl_trigger` comes after the program's own `pdl_wait`, or the kernel waits unconditionally
#     before it exits, so that "launch N finished" still implies "launch N-1 finished";
# so the kernel before is complete (and its writes visible) at `pdl_wait`, and the one before that is
# complete when the program starts. Off on the CPU, under the interpreter, before sm_90, and with
# LORAX_PDL=0.
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _pdl_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def use_pdl(device: torch.device) -> bool:
    """Whether launches on this device use programmatic dependent launch."""
    if device.type != "cuda" or interpreting() or os.environ.get("LORAX_PDL", "1") == "0":
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Block until the previous launch has finished and its writes are visible (no-op without PDL)."""
    if USE_PDL:
        tl_cuda.gdc_wait()


@triton.jit
def pdl_trigger(USE_PDL: tl.constexpr):
    """Let the next launch's programs be scheduled (no-op without PDL)."""
    if USE_PDL:
        tl_cuda.gdc_launch_dependents()
