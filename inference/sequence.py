"""A request's state inside the engine."""

from __future__ import annotations

import enum
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
