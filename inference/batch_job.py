"""The batch job: stream a JSONL file through an engine, append results, resume after any crash.

`run_job(engine, cfg)` drives any object with the engine API (add_request / step / has_unfinished /
tokenizer / adapter_names / model_name / max_model_len), so tests run it on a fake engine.

Invariants:
- every non-blank input line ends in exactly one of the output and errors files, once;
- at most `cfg.max_in_flight` requests are read ahead of the engine: memory does not grow with the file
  (apart from the id tables, 16-64 bytes per id);
- records are appended and flushed after every engine step, so a SIGKILL loses only unfinished
  requests (they rerun on resume) and leaves at most one torn line, cut off on the next start;
- resume keys are `id` / `custom_id`: ids in the output are skipped, ids in the errors file too unless
  `retry_errors` (which empties the errors file first); error records of lines without a usable id
  (bad JSON, duplicates) are keyed by line number.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax.errors import LoraxError, UsageError
from lorax.inference.batch_io import (
    IdTable,
    JsonlAppender,
    count_lines,
    iter_lines,
    record_key,
    rewrite_in_input_order,
    same_file,
    scan_jsonl,
)
from lorax.inference.batch_requests import (
    LineFailure,
    PendingLine,
    RequestBuilder,
    classify_engine_error,
    error_record,
    is_openai,
    line_key,
    result_record,
)
from lorax.inference.types import RequestOutput

# Error codes keyed by line number on resume: the line has no id of its own that could be skipped.
_LINE_KEYED = frozenset(("invalid_json", "invalid_request", "missing_id", "duplicate_id"))


@dataclass
class JobConfig:
    input_path: Path
    output_path: Path
    errors_path: Path
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None  # overrides the model's and the adapters' templates
    adapter_templates: dict[str, str] = field(default_factory=dict)  # adapter name -> its own template
    base_names: tuple[str, ...] = ()  # extra names meaning "the base model" in OpenAI body.model
    seed: int | None = 0  # sampled lines without a seed get one from (seed, id); None: the engine's RNG
    max_in_flight: int = 1024
    ordered: bool = False
    retry_errors: bool = False
    fsync_interval_s: float = 5.0
    progress: bool = True


@dataclass
class JobSummary:
    lines: int = 0  # non-blank input lines seen
    done: int = 0  # written to the output in this run
    errors: int = 0  # written to the errors file in this run
    skipped: int = 0  # already in the output / errors from an earlier run
    unfinished: int = 0  # in flight when interrupted (they rerun on resume)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    signal: int = 0  # the signal that stopped the job (SIGINT or SIGTERM), 0 if none
    truncated_bytes: int = 0  # torn tail cut from earlier files
    max_in_flight_seen: int = 0

    def line(self) -> str:
        rate = self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0
        req_rate = self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        head = "interrupted" if self.interrupted else "done"
        parts = [f"{head}: {self.done} ok, {self.errors} errors, {self.skipped} skipped (already done)"]
        if self.unfinished:
            parts.append(f"{self.unfinished} unfinished (rerun to resume)")
        parts.append(f"{self.completion_tokens} tokens generated in {self.elapsed_s:.1f} s "
                     f"({rate:.1f} tok/s, {req_rate:.2f} req/s)")
        return "; ".join(parts)


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps; a second signal raises at once."""

    def __init__(self) -> None:
        self.set = False
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        self.signum = signum
        print("\nstopping: finishing writes (press Ctrl-C again to abort at once)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_paths(cfg: JobConfig) -> None:
    if not cfg.input_path.is_file():
        raise UsageError(f"input file {cfg.input_path} does not exist")
    if same_file(cfg.input_path, cfg.output_path):
        raise UsageError(f"the output file may not be the input file ({cfg.output_path})")
    if same_file(cfg.input_path, cfg.errors_path) or same_file(cfg.output_path, cfg.errors_path):
        raise UsageError(f"the errors file {cfg.errors_path} must differ from the input and output files")


def run_job(engine: Any, cfg: JobConfig) -> JobSummary:
    """Run (or resume) the job; return its summary. Exceptions from the engine propagate after the
    files are flushed and closed (everything written so far stays valid for resume)."""
    check_paths(cfg)
    return _Job(engine, cfg).run()


class _Job:
    """One pass over the input: resume state, the lookahead window, and the two appenders."""

    def __init__(self, engine: Any, cfg: JobConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self.t0 = time.monotonic()
        self.summary = JobSummary()
        self.done_ids, self.err_ids, self.err_lines = (IdTable(values=False) for _ in range(3))
        self.seen = IdTable()  # ids met in this pass over the input (duplicates)
        self.inflight: dict[str, PendingLine] = {}  # engine request id -> line
        self.eof = False

    # ---- resume ------------------------------------------------------------------------------------
    def _on_output(self, n: int, rec: dict[str, Any]) -> None:
        key = record_key(rec)
        if key is not None:
            self.done_ids.add(key)

    def _on_error(self, n: int, rec: dict[str, Any]) -> None:
        code = rec["error"].get("code") if isinstance(rec.get("error"), dict) else None
        key = record_key(rec)
        if key is None or code in _LINE_KEYED:
            if isinstance(rec.get("line"), int):
                self.err_lines.add(str(rec["line"]))
        else:
            self.err_ids.add(key)

    def _load_resume_state(self) -> None:
        cfg = self.cfg
        self.summary.truncated_bytes += scan_jsonl(cfg.output_path, self._on_output)
        if cfg.retry_errors and cfg.errors_path.exists():
            cfg.errors_path.write_bytes(b"")  # every earlier error line reruns, and is written again if it fails
        self.summary.truncated_bytes += scan_jsonl(cfg.errors_path, self._on_error)

    # ---- per line ----------------------------------------------------------------------------------
    def _resolve(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def _fail(self, line_no: int, key: str | None, id_value: Any, openai: bool, code: str, message: str) -> None:
        self.err_f.write(error_record(line_no, key, id_value, openai, code, message))
        self.summary.errors += 1
        self._resolve()

    def _skip(self) -> None:
        self.summary.skipped += 1
        self._resolve()

    def _read_one(self) -> None:
        """Read one input line: write its error record, skip it (resume), or hand it to the engine."""
        try:
            line_no, _, raw = next(self.lines)
        except StopIteration:
            self.eof = True
            if self.bar is not None:  # the first total counted blank lines too
                self.bar.total = self.summary.lines
                self.bar.refresh()
            return
        if not raw.strip():
            return
        self.summary.lines += 1
        # Errors of lines without a usable id are keyed by line number in the errors file.
        line_done = str(line_no) in self.err_lines
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if line_done:
                self._skip()
            else:
                self._fail(line_no, None, None, False, "invalid_json", f"not valid JSON: {err}")
            return
        openai = isinstance(obj, dict) and is_openai(obj)
        try:
            key, id_value = line_key(line_no, obj)
        except LineFailure as err:
            if line_done:
                self._skip()
            else:
                self._fail(line_no, None, None, openai, err.code, err.message)
            return
        if not self.seen.add(key, line_no):
            if line_done:
                self._skip()
            else:
                self._fail(line_no, key, id_value, openai, "duplicate_id",
                           f"id {key!r} already used on line {self.seen.get(key)}; ids must be unique")
            return
        if line_done or key in self.done_ids or key in self.err_ids:
            self._skip()
            return
        try:
            pending = self.builder.build(line_no, obj, key, id_value)
        except LineFailure as err:
            self._fail(line_no, key, id_value, openai, err.code, err.message)
            return
        try:
            self.engine.add_request(pending.request)
        except (ValueError, TypeError, LoraxError) as err:  # an engine that refuses at once, not via step()
            self._fail(line_no, key, id_value, openai, classify_engine_error(str(err)), str(err))
            return
        self.inflight[pending.request.request_id] = pending
        self.summary.max_in_flight_seen = max(self.summary.max_in_flight_seen, len(self.inflight))

    def _collect(self, finished: list[RequestOutput]) -> None:
        s = self.summary
        for out in finished:
            p = self.inflight.pop(out.request_id, None)
            if p is None:
                continue  # not ours (an engine shared with other callers)
            if out.error is not None:
                self._fail(p.line, p.key, p.id_value, p.kind != "simple", classify_engine_error(out.error), out.error)
                continue
            self.out_f.write(result_record(p, out, self.builder.tokenizer))
            s.done += 1
            s.prompt_tokens += len(out.prompt_token_ids)
            s.completion_tokens += len(out.token_ids)
            self._resolve()
        if not finished and self.inflight and not self.engine.has_unfinished():
            for p in self.inflight.values():  # the engine lost them: say so rather than spin forever
                self._fail(p.line, p.key, p.id_value, p.kind != "simple", "request_failed",
                           "the engine dropped this request without a result")
            self.inflight.clear()

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self) -> JobSummary:
        cfg, s = self.cfg, self.summary
        self._load_resume_state()
        self.builder = RequestBuilder(self.engine, cfg.sampling_defaults, cfg.chat_template, cfg.adapter_templates,
                                      cfg.base_names, cfg.seed)
        self.out_f = JsonlAppender(cfg.output_path, cfg.fsync_interval_s)
        self.err_f = JsonlAppender(cfg.errors_path, cfg.fsync_interval_s)
        n_lines = count_lines(cfg.input_path)
        self.seen = IdTable(max(1024, n_lines))  # sized once from a cheap newline count
        self.bar = _progress(cfg, n_lines)
        self.lines = iter_lines(cfg.input_path)
        try:
            with _StopFlag() as stop:
                while not stop.set:
                    while not self.eof and len(self.inflight) < cfg.max_in_flight and not stop.set:
                        self._read_one()
                    if not self.inflight:
                        if self.eof:
                            break
                        continue
                    self._collect(self.engine.step())
                    # Flushed after every step: a SIGKILL loses only what is still in the engine.
                    self.out_f.flush()
                    self.err_f.flush()
                    if self.bar is not None:
                        rate = s.completion_tokens / max(time.monotonic() - self.t0, 1e-9)
                        self.bar.set_postfix_str(f"{rate:.0f} tok/s, {s.errors} errors", refresh=False)
                s.interrupted, s.signal = stop.set, stop.signum
        finally:
            s.unfinished = len(self.inflight)
            self.out_f.close()
            self.err_f.close()
            if self.bar is not None:
                self.bar.close()
            s.elapsed_s = time.monotonic() - self.t0
        if cfg.ordered and not s.interrupted:
            # The id tables are no longer needed: free them before the rewrite builds its own.
            self.seen = self.done_ids = self.err_ids = self.err_lines = IdTable(1)
            rewrite_in_input_order(cfg.output_path, _input_keys(cfg.input_path))
        return s


def _input_keys(path: Path) -> Iterator[str]:
    for n, _, raw in iter_lines(path):
        try:
            yield line_key(n, json.loads(raw))[0]
        except (json.JSONDecodeError, UnicodeDecodeError, LineFailure):
            continue


def _progress(cfg: JobConfig, total: int) -> Any:
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True, smoothing=0.1, mininterval=0.5)
