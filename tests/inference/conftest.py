"""Shared tiny checkpoints for the engine tests (built once per session)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .tiny_models import build_hf, save

CHARS = "".join(chr(c) for c in range(32, 127))  # 95 printable characters, ids 0..94; <eos> is 95


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny shapes: intra-op threads only add contention on a busy 2-core machine (40x slower seen)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_char_tokenizer(path: Path) -> None:
    """A one-character-per-token tokenizer over printable ASCII plus <eos> (id 95): vocab 96."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab["<eos>"] = len(CHARS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.add_special_tokens(["<eos>"])
    tok.decoder = decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "tokenizer_class": "PreTrainedTokenizerFast"}))


@pytest.fixture(scope="session")
def qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """(HF model, checkpoint dir with a character tokenizer) of the tiny Qwen3-MoE."""
    hf = build_hf("qwen3_moe")
    path = save(hf, tmp_path_factory.mktemp("qwen3_moe") / "m")
    write_char_tokenizer(path)
    return hf, path
