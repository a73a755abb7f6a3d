"""The embedded demo's tasks: what the base model and each shipped adapter do to a string.

Shared by the training script (scripts/train_demo.py) and the tests that score the shipped files.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable

# Prompts are `<bos>` + 1..12 characters of ALPHABET + `|`; answers are TASKS[name](string) + `<eos>`.
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

TASKS: dict[str, Callable[[str], str]] = {
    "copy": lambda s: s,  # the base model, no adapter
    "reverse": lambda s: s[::-1],
    "upper": str.upper,
    "rot13": lambda s: codecs.encode(s, "rot13"),
    "swapcase": str.swapcase,
}

# adapter name -> the expert layout it is stored in under recipes/demo/adapters/
ADAPTER_LAYOUTS = {"reverse": "fused", "upper": "per-expert", "rot13": "fused", "swapcase": "shared-outer"}
