"""A request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from lorax.inference.tokenizer import IncrementalDetokenizer
from lorax.inference.types import SamplingParams, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """tokens = prompt + generated so far; the first `num_computed` of them are in the KV cache.

    A step feeds tokens[num_computed : num_computed + n]; when that chunk reaches the end of `tokens`
    the step samples the next token. After a preemption num_computed is 0 and the whole list is
    recomputed (outputs included), which the counter-based sampler makes invisible in the results.
    """

    request_id: str
    index: int  # arrival order, for output ordering and fair scheduling
    adapter: str | None
    sampling: SamplingParams
    prompt_ids: list[int]
    seed: int  # per-request sampling seed (the request's, or one drawn from the engine seed)
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    slot: int = -1  # adapter slot while running, -1 = base model
    status: Status = Status.WAITING
    detok: IncrementalDetokenizer | None = None
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[len(self.prompt_ids) :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_uncomputed > 1

    def append(
        self,
        token: int,
        eos_ids: frozenset[int],
        max_model_len: int,
        logprob: float | None = None,
        top: list[tuple[int, float]] | None = None,
    ) -> bool:
        """Record one sampled token and apply the stop rules; True when the sequence is finished.

        Order: stop strings (text trimmed before the match), then eos / stop_token_ids (the token is
        kept in token_ids, as vLLM does), then max_tokens and max_model_len ("length").
        """
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.tokens.append(token)
        sp = self.sampling
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(TokenLogprob(token, logprob, list(top or [])[: sp.logprobs or 0]))
        if self.detok is not None:
            new = self.detok.add(token)
            text = self.detok.text
            if sp.stop and new:
                # only a match that overlaps the new text can be new
                start = max(0, len(text) - len(new) - max(len(s) for s in sp.stop) + 1)
                hits = [i for i in (text.find(s, start) for s in sp.stop) if i >= 0]
                if hits:
                    self.text = text[: min(hits)]
                    self.finish_reason = "stop"
                    return True
            self.text = text
        if (not sp.ignore_eos and token in eos_ids) or token in sp.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) - len(self.prompt_ids) >= sp.max_tokens or len(self.tokens) >= max_model_len:
            self.finish_reason = "length"
        return self.finish_reason is not None
