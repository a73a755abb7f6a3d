"""Input lines -> engine requests, and engine results -> output / error records.

Two input forms, mixed freely in one file:
- simple: {"id", "prompt" | "prompt_token_ids" | "messages", "adapter", sampling fields...};
- OpenAI Batch API (what `vllm run-batch` reads): {"custom_id", "method": "POST",
  "url": "/v1/completions" | "/v1/chat/completions", "body": {"model", ...}}; `body.model` names an
  adapter or the base model.
A line that cannot run raises LineFailure(code, message); the job writes it as an error record.
Records written back:
- simple:  {"id", "adapter", "text", "token_ids", "finish_reason", "usage"} (+ "logprobs" if asked);
- OpenAI:  {"id": "batch_req_...", "custom_id", "response": {"status_code": 200, "request_id",
           "body": <text_completion | chat.completion object>}, "error": null};
- errors:  simple {"id", "line", "error": {"code", "message"}}; OpenAI {"id", "custom_id", "line",
           "response": null, "error": {"code", "message"}}.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorax.inference.chat import ChatTemplateError, render_chat, validate_messages
from lorax.inference.types import GenerateRequest, RequestOutput, SamplingParams

COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"

_SAMPLING_INT = ("max_tokens", "top_k", "seed", "logprobs")
_SAMPLING_FLOAT = ("temperature", "top_p", "min_p")
_SIMPLE_KEYS = frozenset(
    ("id", "prompt", "prompt_token_ids", "messages", "adapter", "stop", "stop_token_ids", "ignore_eos")
    + _SAMPLING_INT + _SAMPLING_FLOAT
)
# OpenAI/vLLM body fields that lorax honours (besides model/prompt/messages and the sampling ones).
_OPENAI_KEYS = frozenset(
    ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
     "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "logprobs", "top_logprobs",
     "add_generation_prompt", "chat_template_kwargs")
)
# Fields accepted only at the value that changes nothing; anything else would silently differ.
_OPENAI_NEUTRAL: dict[str, Any] = {
    "n": 1, "best_of": 1, "stream": False, "echo": False, "presence_penalty": 0, "frequency_penalty": 0,
    "repetition_penalty": 1, "logit_bias": None, "response_format": None, "tools": None, "tool_choice": None,
    "suffix": None, "skip_special_tokens": True, "include_stop_str_in_output": False,
}
_OPENAI_IGNORED = frozenset(("user", "metadata", "store", "stream_options", "service_tier", "parallel_tool_calls"))


class LineFailure(Exception):
    """A line that cannot run: `code` is a stable machine-readable tag, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class PendingLine:
    """A line handed to the engine, with what its output record needs."""

    line: int
    key: str
    id_value: Any  # the id as written (string or integer), echoed back in simple records
    kind: str  # "simple" | "completions" | "chat"
    model_field: str | None  # OpenAI body.model, echoed back
    chat_logprobs: bool
    request: GenerateRequest


def is_openai(obj: dict[str, Any]) -> bool:
    return "custom_id" in obj or "body" in obj or "url" in obj


def line_key(line_no: int, obj: Any) -> tuple[str, Any]:
    """(resume key, id as written). Simple lines without an id are keyed `line-<n>`."""
    if not isinstance(obj, dict):
        raise LineFailure("invalid_request", f"a line must be a JSON object, got {type(obj).__name__}")
    field = "custom_id" if is_openai(obj) else "id"
    if field not in obj or obj[field] is None:
        if field == "custom_id":
            raise LineFailure("missing_id", "OpenAI batch lines need a string 'custom_id'")
        return f"line-{line_no}", None
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise LineFailure("invalid_request", f"{field!r} must be a non-empty string (or an integer), got {value!r}")
    return str(value), value


def error_record(line_no: int, key: str | None, id_value: Any, openai: bool, code: str, message: str) -> dict[str, Any]:
    err = {"code": code, "message": message}
    if openai:
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": key, "line": line_no, "response": None, "error": err}
    return {"id": id_value if id_value is not None else key, "line": line_no, "error": err}


def classify_engine_error(message: str) -> str:
    """Map the engine's per-request error text onto an error code (the text is kept as the message)."""
    m = message.lower()
    if "too long" in m or "max_model_len" in m or "exceeds" in m:
        return "prompt_too_long"
    if "adapter" in m and ("unknown" in m or "not loaded" in m or "no adapter" in m):
        return "unknown_adapter"
    if "empty" in m:
        return "missing_prompt"
    if "sampling" in m or "must be" in m or "give exactly one" in m:
        return "invalid_parameter"
    return "request_failed"


class RequestBuilder:
    """Turns parsed lines into GenerateRequests against one engine (its adapters, tokenizer, limits)."""

    def __init__(
        self,
        engine: Any,
        sampling_defaults: dict[str, Any] | None = None,
        chat_template: str | None = None,
        adapter_templates: dict[str, str] | None = None,
        base_names: tuple[str, ...] = (),
        seed: int | None = None,
    ) -> None:
        self.engine = engine
        self.seed = seed
        self.tokenizer = engine.tokenizer
        self.adapters = set(engine.adapter_names)
        self.max_model_len: int | None = getattr(engine, "max_model_len", None)
        self.defaults = dict(sampling_defaults or {})
        self.chat_template = chat_template
        self.adapter_templates = dict(adapter_templates or {})
        name = str(getattr(engine, "model_name", "") or "")
        names = {n for n in (name, Path(name).name, *base_names) if n}
        self.base_names = names - self.adapters  # an adapter name always means the adapter

    def build(self, line_no: int, obj: dict[str, Any], key: str, id_value: Any) -> PendingLine:
        rid = f"line-{line_no}"  # engine ids are ours: user ids may repeat or be odd
        if is_openai(obj):
            return self._build_openai(line_no, obj, key, rid)
        for k in obj:
            if k not in _SIMPLE_KEYS:
                raise LineFailure("invalid_parameter", f"unknown field {k!r}")
        adapter = obj.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise LineFailure("invalid_parameter", f"'adapter' must be a string or null, got {adapter!r}")
        adapter = adapter or None
        self._check_adapter(adapter)
        sampling = self._seeded(self._sampling({k: obj[k] for k in obj if k in _SIMPLE_KEYS}), key)
        prompt, ids = self._prompt(obj, adapter, add_generation_prompt=True, template_kwargs={})
        req = GenerateRequest(rid, prompt=prompt, prompt_token_ids=ids, adapter=adapter, sampling=sampling)
        return PendingLine(line_no, key, id_value, "simple", None, False, req)

    def _build_openai(self, line_no: int, obj: dict[str, Any], key: str, rid: str) -> PendingLine:
        for k in obj:
            if k not in ("custom_id", "method", "url", "body"):
                raise LineFailure("invalid_request", f"unknown field {k!r} in an OpenAI batch line")
        method = obj.get("method", "POST")
        if method != "POST":
            raise LineFailure("invalid_request", f"'method' must be \"POST\", got {method!r}")
        url = obj.get("url")
        if url not in (COMPLETIONS_URL, CHAT_URL):
            raise LineFailure("invalid_request", f"'url' must be {COMPLETIONS_URL!r} or {CHAT_URL!r}, got {url!r}")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise LineFailure("invalid_request", "'body' must be a JSON object")
        for k, v in body.items():
            if k in _OPENAI_KEYS or k in _OPENAI_IGNORED:
                continue
            if k in _OPENAI_NEUTRAL:
                if v != _OPENAI_NEUTRAL[k] and v not in (None, {}, []):
                    raise LineFailure("unsupported_parameter", f"body.{k}={v!r} is not supported (only {_OPENAI_NEUTRAL[k]!r})")
                continue
            raise LineFailure("unsupported_parameter", f"body.{k} is not supported")
        chat = url == CHAT_URL
        model = body.get("model")
        adapter = self._adapter_for_model(model)
        params = {k: body[k] for k in ("temperature", "top_p", "top_k", "min_p", "seed", "stop",
                                        "stop_token_ids", "ignore_eos") if k in body}
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens")
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        chat_logprobs = False
        if chat:
            if "prompt" in body:
                raise LineFailure("invalid_parameter", f"{CHAT_URL} takes 'messages', not 'prompt'")
            lp, top = body.get("logprobs"), body.get("top_logprobs")
            if lp is not None and not isinstance(lp, bool):
                raise LineFailure("invalid_parameter", f"body.logprobs must be true/false for chat, got {lp!r}")
            if top is not None and not lp:
                raise LineFailure("invalid_parameter", "body.top_logprobs needs body.logprobs=true")
            if lp:
                chat_logprobs = True
                params["logprobs"] = 0 if top is None else top
        else:
            if "messages" in body:
                raise LineFailure("invalid_parameter", f"{COMPLETIONS_URL} takes 'prompt', not 'messages'")
            if body.get("logprobs") is not None:
                params["logprobs"] = body["logprobs"]
        sampling = self._seeded(self._sampling(params), key)
        gen_prompt = body.get("add_generation_prompt", True)
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(gen_prompt, bool) or not isinstance(kwargs, dict):
            raise LineFailure("invalid_parameter", "add_generation_prompt must be a bool, chat_template_kwargs an object")
        if "messages" in kwargs or "add_generation_prompt" in kwargs:
            raise LineFailure("invalid_parameter", "chat_template_kwargs may not set messages or add_generation_prompt")
        src = dict(body)
        if not chat and isinstance(src.get("prompt"), list) and src["prompt"] and not isinstance(src["prompt"][0], int):
            # OpenAI allows a list of prompts; one line is one request here.
            if len(src["prompt"]) != 1:
                raise LineFailure("unsupported_parameter", "body.prompt lists of several prompts are not supported: one prompt per line")
            src["prompt"] = src["prompt"][0]
        if not chat and isinstance(src.get("prompt"), list):
            src["prompt_token_ids"] = src.pop("prompt")
        prompt, ids = self._prompt(src, adapter, add_generation_prompt=gen_prompt, template_kwargs=kwargs)
        req = GenerateRequest(rid, prompt=prompt, prompt_token_ids=ids, adapter=adapter, sampling=sampling)
        return PendingLine(line_no, key, key, "chat" if chat else "completions", model, chat_logprobs, req)

    def _seeded(self, params: SamplingParams, key: str) -> SamplingParams:
        """Give a sampled line without its own seed one derived from (job seed, id): a line resumed after
        a crash then draws the same tokens as in an uninterrupted run, whatever its batch neighbours."""
        if self.seed is not None and params.seed is None and params.temperature > 0:
            digest = hashlib.blake2b(f"{self.seed}:{key}".encode("utf-8", "surrogatepass"), digest_size=4).digest()
            params.seed = int.from_bytes(digest, "little")
        return params

    def _adapter_for_model(self, model: Any) -> str | None:
        if model is None:
            return None
        if not isinstance(model, str):
            raise LineFailure("invalid_parameter", f"body.model must be a string, got {model!r}")
        if model in self.adapters:
            return model
        if model in self.base_names:
            return None
        known = sorted(self.base_names) + sorted(self.adapters)
        raise LineFailure("unknown_adapter", f"body.model {model!r} is neither the base model nor a loaded adapter "
                                             f"(known: {', '.join(known)})")

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none loaded"
            raise LineFailure("unknown_adapter", f"unknown adapter {adapter!r} (loaded: {known})")

    def _sampling(self, given: dict[str, Any]) -> SamplingParams:
        values = {**self.defaults, **{k: v for k, v in given.items() if k not in ("id", "prompt", "prompt_token_ids",
                                                                               "messages", "adapter")}}
        for k, v in list(values.items()):
            if v is None:
                del values[k]
            elif k in _SAMPLING_INT:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise LineFailure("invalid_parameter", f"{k!r} must be an integer, got {v!r}")
            elif k in _SAMPLING_FLOAT:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise LineFailure("invalid_parameter", f"{k!r} must be a number, got {v!r}")
                values[k] = float(v)
            elif k == "stop":
                if isinstance(v, str):
                    values[k] = [v]
                elif not (isinstance(v, list) and all(isinstance(s, str) and s for s in v)):
                    raise LineFailure("invalid_parameter", f"'stop' must be a string or a list of non-empty strings, got {v!r}")
            elif k == "stop_token_ids":
                if not (isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)):
                    raise LineFailure("invalid_parameter", f"'stop_token_ids' must be a list of integers, got {v!r}")
            elif k == "ignore_eos" and not isinstance(v, bool):
                raise LineFailure("invalid_parameter", f"'ignore_eos' must be true or false, got {v!r}")
        params = SamplingParams(**values)
        try:
            params.validate()
        except ValueError as err:
            raise LineFailure("invalid_parameter", str(err)) from err
        return params

    def _prompt(self, src: dict[str, Any], adapter: str | None, add_generation_prompt: bool,
                template_kwargs: dict[str, Any]) -> tuple[str | None, list[int] | None]:
        given = [k for k in ("prompt", "prompt_token_ids", "messages") if src.get(k) is not None]
        if not given:
            raise LineFailure("missing_prompt", "no prompt: give one of 'prompt', 'prompt_token_ids' or 'messages'")
        if len(given) > 1:
            raise LineFailure("invalid_request", f"give only one of {', '.join(repr(g) for g in given)}")
        kind = given[0]
        if kind == "prompt":
            text = src["prompt"]
            if not isinstance(text, str):
                raise LineFailure("invalid_parameter", f"'prompt' must be a string, got {type(text).__name__}")
            if not text:
                raise LineFailure("missing_prompt", "'prompt' is empty")
            return text, None
        if kind == "prompt_token_ids":
            ids = src["prompt_token_ids"]
            if not (isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
                raise LineFailure("invalid_parameter", "'prompt_token_ids' must be a non-empty list of integers")
            return None, self._check_len(ids)
        try:
            messages = validate_messages(src["messages"])
        except ValueError as err:
            raise LineFailure("invalid_parameter", str(err)) from err
        # --chat-template wins, then the adapter's own template, then the model's.
        template = (self.chat_template or self.adapter_templates.get(adapter or "")
                    or getattr(self.tokenizer, "chat_template", None))
        if not template:
            raise LineFailure("chat_template_error", "'messages' need a chat template, and the model's tokenizer has "
                                                     "none: pass --chat-template (a file or a Jinja string)")
        try:
            # Like transformers: the special-token strings are template variables, and kwargs win.
            specials = {f"{w}_token": _special(self.tokenizer, w) for w in ("bos", "eos", "pad", "unk")}
            text = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                               **{**specials, **template_kwargs})
        except ChatTemplateError as err:
            raise LineFailure("chat_template_error", str(err)) from err
        # The template wrote the special tokens it wants: do not add BOS again.
        return None, self._check_len(self.tokenizer.encode(text, add_special_tokens=False))

    def _check_len(self, ids: list[int]) -> list[int]:
        if not ids:
            raise LineFailure("missing_prompt", "the prompt is empty after tokenization")
        if self.max_model_len is not None and len(ids) >= self.max_model_len:
            raise LineFailure("prompt_too_long", f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} "
                                                 "(the prompt and at least one generated token must fit)")
        return ids


def _special(tokenizer: Any, which: str) -> str:
    value = getattr(tokenizer, f"{which}_token", None)
    if isinstance(value, str):
        return value
    tid = getattr(tokenizer, f"{which}_token_id", None)
    return tokenizer.decode([tid], skip_special_tokens=False) if isinstance(tid, int) else ""


def result_record(p: PendingLine, out: RequestOutput, tokenizer: Any) -> dict[str, Any]:
    """The output record of a finished request (out.error is None)."""
    n_prompt, n_gen = len(out.prompt_token_ids), len(out.token_ids)
    usage = {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}
    want_lp = p.request.sampling.logprobs is not None and out.logprobs is not None
    if p.kind == "simple":
        rec: dict[str, Any] = {
            "id": p.id_value if p.id_value is not None else p.key, "adapter": out.adapter, "text": out.text,
            "token_ids": list(out.token_ids), "finish_reason": out.finish_reason, "usage": usage,
        }
        if want_lp:
            rec["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
                               for lp in out.logprobs or []]
        return rec
    created = int(time.time())
    if p.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": out.text},
                                  "logprobs": _chat_logprobs(out, tokenizer) if want_lp and p.chat_logprobs else None,
                                  "finish_reason": out.finish_reason}
        body = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                "model": p.model_field, "choices": [choice], "usage": usage}
    else:
        choice = {"index": 0, "text": out.text, "logprobs": _completion_logprobs(out, tokenizer) if want_lp else None,
                  "finish_reason": out.finish_reason}
        body = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created,
                "model": p.model_field, "choices": [choice], "usage": usage}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": p.key,
            "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body}, "error": None}


def _tok(tokenizer: Any, tid: int) -> str:
    return str(tokenizer.decode([tid], skip_special_tokens=False))


def _completion_logprobs(out: RequestOutput, tokenizer: Any) -> dict[str, Any]:
    tokens = [_tok(tokenizer, lp.token_id) for lp in out.logprobs or []]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in out.logprobs or []],
            "top_logprobs": [{_tok(tokenizer, t): v for t, v in lp.top} for lp in out.logprobs or []],
            "text_offset": offsets}


def _chat_logprobs(out: RequestOutput, tokenizer: Any) -> dict[str, Any]:
    def entry(tid: int, value: float) -> dict[str, Any]:
        s = _tok(tokenizer, tid)
        return {"token": s, "logprob": value, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in out.logprobs or []]}
