"""Small helpers every kernel launcher shares."""

from __future__ import annotations

import functools
import json
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


@functools.lru_cache(maxsize=16)
def _config_file(name: str) -> dict:
    path = os.path.join(os.path.dirname(__file__), "configs", name)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=16)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def tuned_buckets(file: str, device: torch.device, shape_key: str) -> dict[str, dict] | None:
    """Measured block configs from kernels/configs/<file> ({device name: {shape key: {bucket: cfg}}}) for
    this GPU and shape; None on the CPU / interpreter or when not measured. File and name are read once."""
    if device.type != "cuda" or interpreting():
        return None
    return _config_file(file).get(_device_name(device), {}).get(shape_key) or None


# ----------------------------------------------------------------------------------------------------
# Programmatic dependent launch (PDL, sm_90+). A kernel launched with `launch_pdl=True` may start while
# the kernel before it in the stream is still running: its programs are scheduled once every program of
# the previous kernel has called `pdl_trigger` (or exited). Rules every kernel here keeps:
#   - before `pdl_wait` a program reads only data written by kernels *two or more* launches back, and
#     writes nothing the previous kernel reads;
#   - `pdl_trigger` comes after the program's own `pdl_wait`, or the kernel waits unconditionally
#     before it exits, so that "launch N finished" still implies "launch N-1 finished";
# so the kernel before is complete (and its writes visible) at `pdl_wait`, and the one before that is
# complete when the program starts. One exception, counted: in fused_moe's LoRA K step mode the down shrink
# and the down kernel read the gate_up kernel's act (and the down kernel the down shrink's z_d) per block
# before their waits, once a per-block counter the writer releases after its stores says the block is
# complete (an acquire load spins on it). That cannot hang: a launch is scheduled only when every program
# of the launch before has started, so every writer is running or done. Both kernels then wait at their
# end, so the rule "launch N finished implies launch N-1 finished" still holds. Off on the CPU, under the
# interpreter, before sm_90, and with LORAX_PDL=0.
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def use_pdl(device: torch.device) -> bool:
    """Whether launches on this device use programmatic dependent launch (decided once per device)."""
    if device.type != "cuda" or interpreting() or os.environ.get("LORAX_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


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


@triton.jit
def wait_count(ptr, target):
    """Spin until the int32 counter at ptr (release-incremented by other programs) reaches target. Each poll
    is an acquire load, so what the program reads next was written before those increments. (Volatile
    polls with one acquire at the end measured the same on an H100: fused_moe's K step mode, 512 and 2048
    tokens.)"""
    while tl.atomic_add(ptr, 0, sem="acquire", scope="gpu") < target:  # (lowered to an acquire load)
        pass


@triton.jit
def here(x, ON: tl.constexpr):
    """x unchanged, through a register move that the compiler keeps where it is written (off: x itself;
    the interpreter runs no inline asm). A tile loaded before a loop and fed to a tl.dot after it is
    copied to shared memory right at its load, which waits for the load there; passed through this
    after the loop, the copy (and the wait) happen after the loop instead."""
    if ON:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False,
                                         pack=32 // x.dtype.primitive_bitwidth)
    else:
        return x
