"""Tokenizer over the `tokenizers` library (tokenizer.json + tokenizer_config.json), and incremental
detokenization for stop strings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from lorax.errors import ConfigError


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, config: dict[str, Any], chat_template: str | None = None) -> None:
        self._tok = tok
        self.config = config
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.pad_token = _token_str(config.get("pad_token"))
        self.unk_token = _token_str(config.get("unk_token"))
        self.bos_token_id = self._id(self.bos_token)
        self.eos_token_id = self._id(self.eos_token)
        self.pad_token_id = self._id(self.pad_token)
        self.chat_template: str | None = chat_template or config.get("chat_template")
        # add_bos_token (Llama-style configs) is honoured even when the post-processor does not add it.
        self.add_bos_token = bool(config.get("add_bos_token", False))

    def _id(self, token: str | None) -> int | None:
        return self._tok.token_to_id(token) if token is not None else None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise ConfigError(f"{path}: no tokenizer.json (lorax needs a fast tokenizer file)")
        try:
            tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust library raises a bare Exception
            raise ConfigError(f"{tok_file}: cannot be read: {exc}") from exc
        config: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.exists():
            config = json.loads(cfg_file.read_text())
        template = None
        jinja = path / "chat_template.jinja"
        if jinja.exists():
            template = jinja.read_text()
        return cls(tok, config, template)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._tok.id_to_token(i) for i in ids]


class IncrementalDetokenizer:
    """Text of a growing token list, decoded over a short window so each step costs O(new tokens).

    A multi-byte character split over tokens decodes to U+FFFD until its last byte arrives, so text is
    only emitted once the window's decode stops ending in U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-6:])  # a little prompt context for leading-space rules
        self.prefix = 0  # window start in self.ids
        self.read = len(self.ids)  # ids before this are already turned into text
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the newly final text (possibly empty)."""
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix :], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            new = after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += new
            return new
        return ""
