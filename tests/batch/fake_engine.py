"""A fake engine with the lorax.inference.LLM API, for batch-job tests that must not load a model.

Byte tokenizer: 0 <pad>, 1 <bos>, 2 <eos>, byte b -> b + 3. The "model" answers a prompt `abc|` with
the task of its adapter applied to `abc` (base: copy) then <eos>, one token per step for at most
`max_num_seqs` running requests, like a continuous-batching engine. Bad requests come back from
`step()` as RequestOutputs with `.error`, as the real engine's contract says.
"""

from __future__ import annotations

import codecs
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lorax.inference.types import GenerateRequest, RequestOutput, TokenLogprob

PAD, BOS, EOS = 0, 1, 2
TASKS = {
    None: lambda s: s,
    "reverse": lambda s: s[::-1],
    "upper": str.upper,
    "rot13": lambda s: codecs.encode(s, "rot13"),
    "swapcase": str.swapcase,
}


def expected_text(prompt: str, adapter: str | None) -> str:
    """What the fake (and the real demo model) answers to `prompt` with `adapter`."""
    return TASKS[adapter](prompt.split("|", 1)[0])


class FakeTokenizer:
    bos_token, eos_token, pad_token = "<bos>", "<eos>", "<pad>"
    bos_token_id, eos_token_id, pad_token_id = BOS, EOS, PAD
    _specials = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>"}

    def __init__(self, chat_template: str | None = None) -> None:
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        body = list(text.replace("<bos>", "\x01").encode("utf-8"))
        ids = [BOS if b == 1 else b + 3 for b in body]  # "<bos>" written by a template -> the BOS id
        return ([BOS] if add_special_tokens else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i in self._specials:
                if not skip_special_tokens:
                    out.append(buf.decode("utf-8", "replace") + self._specials[i])
                    buf = bytearray()
                continue
            buf.append(i - 3)
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)


@dataclass
class _Seq:
    req: GenerateRequest
    prompt_ids: list[int]
    answer: list[int]
    out: list[int] = field(default_factory=list)


class FakeLLM:
    def __init__(self, model: str, adapters: dict[str, str] | None = None, max_num_seqs: int = 4,
                 max_model_len: int = 64, step_delay: float = 0.0, chat_template: str | None = None,
                 **engine_options: Any) -> None:
        self.model_name = model
        self.adapter_names = list(adapters or {})
        for name in self.adapter_names:
            assert name in TASKS, f"fake engine knows no task {name!r}"
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.step_delay = step_delay
        self.engine_options = engine_options
        self.tokenizer = FakeTokenizer(chat_template)
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._failed: list[RequestOutput] = []
        self.steps = 0
        self.added = 0

    def add_request(self, req: GenerateRequest) -> None:
        self.added += 1
        ids = req.prompt_token_ids if req.prompt_token_ids is not None else self.tokenizer.encode(req.prompt or "")
        err = None
        if req.adapter is not None and req.adapter not in self.adapter_names:
            err = f"unknown adapter {req.adapter!r}"
        elif not ids:
            err = "empty prompt"
        elif len(ids) >= self.max_model_len:
            err = f"prompt is too long: {len(ids)} tokens >= max_model_len {self.max_model_len}"
        if err is not None:
            self._failed.append(RequestOutput(req.request_id, req.adapter, list(ids), error=err))
            return
        text = self.tokenizer.decode(ids)
        answer = [b + 3 for b in expected_text(text, req.adapter).encode("utf-8")] + [EOS]
        self._waiting.append(_Seq(req, list(ids), answer))

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._failed)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.step_delay:
            time.sleep(self.step_delay)
        done, self._failed = self._failed, []
        while self._waiting and len(self._running) < self.max_num_seqs:
            self._running.append(self._waiting.popleft())
        still = []
        for s in self._running:
            sp = s.req.sampling
            tok = s.answer[len(s.out)] if len(s.out) < len(s.answer) else ord(".") + 3
            s.out.append(tok)
            stop_eos = tok == EOS and not sp.ignore_eos
            if stop_eos or len(s.out) >= sp.max_tokens:
                gen = s.out[:-1] if stop_eos else s.out
                text = self.tokenizer.decode(gen)
                reason = "stop" if stop_eos else "length"
                for st in sp.stop:
                    if st in text:
                        text, reason = text[: text.index(st)], "stop"
                lps = None
                if sp.logprobs is not None:
                    lps = [TokenLogprob(t, -0.5, [(t, -0.5)] * sp.logprobs) for t in s.out]
                done.append(RequestOutput(s.req.request_id, s.req.adapter, s.prompt_ids, s.out, text, reason, lps))
            else:
                still.append(s)
        self._running = still
        return done
