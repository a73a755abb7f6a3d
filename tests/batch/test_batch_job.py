"""The batch job on a fake engine: every bad-line kind, one record per line, resume, ordering, bounds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from batch_helpers import key_of, read_jsonl, write_lines
from fake_engine import FakeLLM, expected_text

from lorax.errors import UsageError
from lorax.inference.batch_job import JobConfig, run_job

CHAT = "{{ bos_token }}{% for m in messages if m.role == 'user' %}{% if loop.last %}{{ m.content }}{% endif %}" \
       "{% else %}{{ raise_exception('need a user message') }}{% endfor %}{% if add_generation_prompt %}|{% endif %}"


def oai(cid: str | None, url: str, **body: Any) -> dict[str, Any]:
    line: dict[str, Any] = {"method": "POST", "url": url, "body": body}
    if cid is not None:
        line["custom_id"] = cid
    return line


# (line, expected): expected is ("ok", adapter, prompt-for-the-task) or ("error", code).
CASES: list[tuple[Any, tuple[Any, ...]]] = [
    ({"id": "s1", "prompt": "abc|", "adapter": "reverse"}, ("ok", "reverse", "abc|")),
    ({"prompt": "Hello|"}, ("ok", None, "Hello|")),  # no id: keyed line-2
    (oai("o1", "/v1/completions", model="upper", prompt="xyz|", max_tokens=8), ("ok", "upper", "xyz|")),
    (oai("o2", "/v1/chat/completions", model="fake-model", messages=[{"role": "user", "content": "Chat"}]),
     ("ok", None, "Chat|")),
    ({"id": 7, "prompt_token_ids": [1, 100, 101, 127], "adapter": "swapcase"}, ("ok", "swapcase", "ab|")),
    ("this is not json", ("error", "invalid_json")),
    ("[1, 2]", ("error", "invalid_request")),
    ({"id": "s1", "prompt": "dup|"}, ("error", "duplicate_id")),
    ({"id": "s3", "prompt": "q|", "adapter": "nope"}, ("error", "unknown_adapter")),
    (oai("o3", "/v1/completions", model="other-model", prompt="q|"), ("error", "unknown_adapter")),
    ({"id": "s4", "adapter": "upper"}, ("error", "missing_prompt")),
    ({"id": "s5", "prompt": ""}, ("error", "missing_prompt")),
    ({"id": "s6", "prompt": "q|", "temperature": -1}, ("error", "invalid_parameter")),
    ({"id": "s7", "prompt": "q|", "max_tokens": "5"}, ("error", "invalid_parameter")),
    ({"id": "s8", "prompt": "q|", "top_k": True}, ("error", "invalid_parameter")),
    ({"id": "s9", "prompt": "q|", "temprature": 0.5}, ("error", "invalid_parameter")),
    ({"id": "s10", "prompt": "x" * 80 + "|"}, ("error", "prompt_too_long")),  # the engine says so
    ({"id": "s11", "prompt_token_ids": [5] * 80}, ("error", "prompt_too_long")),  # checked before the engine
    (oai(None, "/v1/completions", model="upper", prompt="q|"), ("error", "missing_id")),
    (oai("o4", "/v1/embeddings", model="upper", input="q"), ("error", "invalid_request")),
    (oai("o5", "/v1/completions", model="upper", prompt="q|", n=2), ("error", "unsupported_parameter")),
    (oai("o6", "/v1/chat/completions", model="upper", prompt="q|"), ("error", "invalid_parameter")),
    ({"id": "s12", "messages": [{"content": "no role"}]}, ("error", "invalid_parameter")),
    (oai("o7", "/v1/chat/completions", model="upper", messages=[{"role": "user", "content": "q"}],
         chat_template_kwargs={"add_generation_prompt": False}), ("error", "invalid_parameter")),
    (oai("o8", "/v1/chat/completions", model="upper", messages=[{"role": "user", "content": "Kw"}],
         chat_template_kwargs={"eos_token": "unused"}), ("ok", "upper", "Kw|")),
    ({"id": "s13", "messages": [{"role": "system", "content": "only system"}]}, ("error", "chat_template_error")),
    ({"id": "s14", "prompt": "abcdef|", "stop": "d"}, ("ok", None, "abc|")),
    ({"id": "s15", "prompt": "Ab|", "adapter": "rot13", "logprobs": 2}, ("ok", "rot13", "Ab|")),
    ("", ("blank",)),
    ({"id": "s16", "prompt": "kl|", "adapter": "upper", "max_tokens": 1}, ("ok", "upper", "k|")),
]


def make_cfg(tmp: Path, lines: list[Any], **kw: Any) -> JobConfig:
    inp = write_lines(tmp / "in.jsonl", lines)
    kw.setdefault("progress", False)
    kw.setdefault("chat_template", CHAT)
    return JobConfig(input_path=inp, output_path=tmp / "out.jsonl", errors_path=tmp / "err.jsonl", **kw)


def records_by_line(cfg: JobConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return read_jsonl(cfg.output_path), read_jsonl(cfg.errors_path)


def check_exactly_once(cfg: JobConfig) -> None:
    """Every non-blank input line is in exactly one file, once (outputs by id, errors by line)."""
    outs, errs = records_by_line(cfg)
    out_keys = [key_of(r) for r in outs]
    assert len(out_keys) == len(set(out_keys)), "an id was written twice to the output"
    err_lines = [r["line"] for r in errs]
    assert len(err_lines) == len(set(err_lines)), "a line was written twice to the errors file"
    seen: set[str] = set()
    for n, raw in enumerate(cfg.input_path.read_text().splitlines(), start=1):
        if not raw.strip():
            assert n not in err_lines
            continue
        try:
            obj = json.loads(raw)
            key = key_of(obj) if isinstance(obj, dict) and ("custom_id" in obj or "id" in obj) else f"line-{n}"
        except json.JSONDecodeError:
            key = None
        first = key is not None and key not in seen
        in_out = first and key in out_keys
        assert in_out + (n in err_lines) == 1, f"line {n}: in output {in_out}, in errors {n in err_lines}"
        if key is not None:
            seen.add(key)


def test_mixed_input_every_bad_line_kind(tmp_path: Path, fake: FakeLLM) -> None:
    cfg = make_cfg(tmp_path, [line for line, _ in CASES])
    summary = run_job(fake, cfg)
    outs, errs = records_by_line(cfg)
    err_by_line = {r["line"]: r for r in errs}
    n_ok = n_err = 0
    for n, (line, want) in enumerate(CASES, start=1):
        if want[0] == "blank":
            continue
        if want[0] == "error":
            n_err += 1
            assert n in err_by_line, f"line {n} should fail with {want[1]}"
            rec = err_by_line[n]
            assert rec["error"]["code"] == want[1], (n, rec)
            assert rec["error"]["message"]
            if isinstance(line, dict) and ("custom_id" in line or "url" in line):
                assert rec["response"] is None and rec["custom_id"] == line.get("custom_id")
            continue
        n_ok += 1
        key = key_of(line) if "custom_id" in line or "id" in line else f"line-{n}"
        [rec] = [r for r in outs if key_of(r) == key]
        text = expected_text(want[2], want[1])
        if "custom_id" in line:
            body = rec["response"]["body"]
            assert rec["response"]["status_code"] == 200 and rec["error"] is None
            choice = body["choices"][0]
            got = choice["message"]["content"] if body["object"] == "chat.completion" else choice["text"]
            assert got == text
            assert body["model"] == line["body"]["model"]
            usage = body["usage"]
        else:
            assert rec["text"] == text and rec["adapter"] == want[1]
            assert rec["id"] == line.get("id", key)
            usage = rec["usage"]
            assert usage["completion_tokens"] == len(rec["token_ids"])
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert (summary.done, summary.errors, summary.skipped) == (n_ok, n_err, 0)
    assert len(outs) == n_ok and len(errs) == n_err
    check_exactly_once(cfg)
    # Running the same job again writes nothing: every line already ended somewhere.
    again = run_job(FakeLLM("fake-model", adapters={"reverse": "r", "upper": "u", "rot13": "x", "swapcase": "s"}), cfg)
    assert (again.done, again.errors, again.skipped) == (0, 0, n_ok + n_err)
    assert records_by_line(cfg) == (outs, errs)
    lp = next(r for r in outs if r.get("id") == "s15")["logprobs"]
    assert len(lp) == len(next(r for r in outs if r.get("id") == "s15")["token_ids"])
    assert all(len(t["top"]) == 2 for t in lp)
    assert next(r for r in outs if r.get("id") == "s16")["finish_reason"] == "length"


def test_resume_skips_done_and_cuts_torn_line(tmp_path: Path) -> None:
    lines = [{"id": f"r{i}", "prompt": f"s{i}|", "adapter": ["reverse", None, "upper"][i % 3]} for i in range(30)]
    lines.insert(10, "garbage")
    cfg = make_cfg(tmp_path, lines)
    run_job(FakeLLM("m", adapters={"reverse": "", "upper": ""}), cfg)
    full_out = cfg.output_path.read_text().splitlines(keepends=True)
    # Simulate a crash: keep the first 12 records and half of the 13th; errors file intact.
    cfg.output_path.write_text("".join(full_out[:12]) + full_out[12][: len(full_out[12]) // 2])
    engine = FakeLLM("m", adapters={"reverse": "", "upper": ""})
    summary = run_job(engine, cfg)
    assert summary.truncated_bytes == len(full_out[12]) // 2
    assert summary.skipped == 12 + 1 and summary.done == 30 - 12 and summary.errors == 0
    assert engine.added == 30 - 12  # nothing that was done ran again
    check_exactly_once(cfg)
    again = run_job(FakeLLM("m", adapters={"reverse": "", "upper": ""}), cfg)
    assert (again.done, again.errors, again.skipped) == (0, 0, 31)
    check_exactly_once(cfg)


def test_resume_after_crash_before_duplicate_error_was_written(tmp_path: Path, fake: FakeLLM) -> None:
    # The first occurrence reached the output; the duplicate's error record did not: resume writes it.
    cfg = make_cfg(tmp_path, [{"id": "a", "prompt": "x|"}, {"id": "a", "prompt": "y|"}])
    cfg.output_path.write_text(json.dumps({"id": "a", "text": "x"}) + "\n")
    run_job(fake, cfg)
    [err] = read_jsonl(cfg.errors_path)
    assert err["line"] == 2 and err["error"]["code"] == "duplicate_id"
    check_exactly_once(cfg)


def test_retry_errors_moves_fixed_lines_to_output(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, [{"id": "a", "prompt": "ab|", "adapter": "upper"}, {"id": "b", "prompt": "cd|"}, "bad"])
    run_job(FakeLLM("m"), cfg)  # no adapters: line 1 fails
    assert [r["error"]["code"] for r in read_jsonl(cfg.errors_path)] == ["unknown_adapter", "invalid_json"]
    plain = run_job(FakeLLM("m", adapters={"upper": ""}), cfg)
    assert (plain.done, plain.skipped) == (0, 3)  # errors are "done" without --retry-errors
    cfg.retry_errors = True
    summary = run_job(FakeLLM("m", adapters={"upper": ""}), cfg)
    assert (summary.done, summary.errors) == (1, 1)
    assert {key_of(r): r["text"] for r in read_jsonl(cfg.output_path)} == {"b": "cd", "a": "AB"}
    assert [r["line"] for r in read_jsonl(cfg.errors_path)] == [3]
    check_exactly_once(cfg)


def test_ordered_rewrites_in_input_order(tmp_path: Path) -> None:
    # Longer answers finish later, so the append order differs from the input order.
    lines = [{"id": f"o{i}", "prompt": "x" * (12 - i % 12) + "|"} for i in range(40)]
    lines[5] = oai("oa", "/v1/completions", model="m", prompt="zz|")
    cfg = make_cfg(tmp_path, lines, ordered=False)
    run_job(FakeLLM("m", max_num_seqs=8), cfg)
    unordered = [key_of(r) for r in read_jsonl(cfg.output_path)]
    want = [key_of(line) for line in lines]
    assert sorted(unordered) == sorted(want) and unordered != want  # the test can fail: order differs
    cfg.output_path.unlink()
    cfg.ordered = True
    run_job(FakeLLM("m", max_num_seqs=8), cfg)
    assert [key_of(r) for r in read_jsonl(cfg.output_path)] == want
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("which", ["output", "errors", "symlink"])
def test_refuses_to_overwrite_input(tmp_path: Path, fake: FakeLLM, which: str) -> None:
    cfg = make_cfg(tmp_path, [{"id": "a", "prompt": "x|"}])
    before = cfg.input_path.read_bytes()
    if which == "output":
        cfg.output_path = cfg.input_path
    elif which == "errors":
        cfg.errors_path = cfg.output_path
    else:
        link = tmp_path / "link.jsonl"
        link.symlink_to(cfg.input_path)
        cfg.output_path = link
    with pytest.raises(UsageError):
        run_job(fake, cfg)
    assert cfg.input_path.read_bytes() == before


class CountingLLM(FakeLLM):
    """Records the most requests the engine ever held at once."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.held = self.max_held = 0

    def add_request(self, req: Any) -> None:
        super().add_request(req)
        self.held += 1
        self.max_held = max(self.max_held, self.held)

    def step(self) -> list[Any]:
        done = super().step()
        self.held -= len(done)
        return done


def test_lookahead_window_bounds_requests_in_engine(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, [{"id": f"w{i}", "prompt": "abcdef|"} for i in range(500)], max_in_flight=24)
    engine = CountingLLM("m", max_num_seqs=8)
    summary = run_job(engine, cfg)
    assert summary.done == 500
    assert engine.max_held == 24 and summary.max_in_flight_seen == 24


def test_openai_output_shapes(tmp_path: Path, fake: FakeLLM) -> None:
    """Lines of the shape in vLLM's run-batch docs (our own content) give OpenAI batch output records."""
    lines = [
        oai("request-1", "/v1/chat/completions", model="fake-model",
            messages=[{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "Hello"}], max_completion_tokens=100),
        oai("request-2", "/v1/chat/completions", model="reverse",
            messages=[{"role": "user", "content": [{"type": "text", "text": "World"}]}], max_tokens=100,
            logprobs=True, top_logprobs=1),
        oai("request-3", "/v1/completions", model="upper", prompt=["abc|"], max_tokens=100, logprobs=1,
            user="u1", stream=False),
    ]
    cfg = make_cfg(tmp_path, lines)
    run_job(fake, cfg)
    assert read_jsonl(cfg.errors_path) == []
    recs = {r["custom_id"]: r for r in read_jsonl(cfg.output_path)}
    for cid, obj, text in [("request-1", "chat.completion", "Hello"), ("request-2", "chat.completion", "dlroW"),
                           ("request-3", "text_completion", "ABC")]:
        rec = recs[cid]
        assert set(rec) == {"id", "custom_id", "response", "error"} and rec["id"].startswith("batch_req_")
        resp = rec["response"]
        assert set(resp) == {"status_code", "request_id", "body"} and resp["status_code"] == 200
        body = resp["body"]
        assert body["object"] == obj and set(body) == {"id", "object", "created", "model", "choices", "usage"}
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["index"] == 0
        if obj == "chat.completion":
            assert choice["message"] == {"role": "assistant", "content": text}
        else:
            assert choice["text"] == text
    chat_lp = recs["request-2"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in chat_lp] == list("dlroW") + ["<eos>"] and len(chat_lp[0]["top_logprobs"]) == 1
    cmpl_lp = recs["request-3"]["response"]["body"]["choices"][0]["logprobs"]
    assert cmpl_lp["tokens"][:3] == ["A", "B", "C"] and cmpl_lp["text_offset"][:3] == [0, 1, 2]
    assert recs["request-1"]["response"]["body"]["choices"][0]["logprobs"] is None


@pytest.mark.slow
def test_100k_lines_with_flat_memory(tmp_path: Path) -> None:
    """Peak RSS growth of a 100k-line job (in a fresh process) against loading the same file whole."""
    import subprocess
    import sys

    probe = Path(__file__).resolve().parent / "memory_probe.py"
    res = subprocess.run([sys.executable, str(probe), str(tmp_path), "100000"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    fig = json.loads(res.stdout)
    print(f"100k lines: job peak RSS +{fig['job_mb']:.1f} MB, whole-file load +{fig['load_mb']:.1f} MB")
    assert fig["done"] == 100_000 and fig["errors"] == 0 and fig["correct"] == 100_000
    assert fig["max_in_flight"] == 1024  # the lookahead window, never the file
    # The id tables cost ~16-64 bytes per id (~6 MB here); a reader that holds the file costs ~10x that.
    assert fig["job_mb"] < 0.5 * fig["load_mb"], fig


@pytest.mark.parametrize(("override", "want_base", "want_upper"), [
    (None, "M:hi|", "A:hi|"),  # the model's template; the adapter's own for its lines
    ("O:{{ messages[0].content }}|", "O:hi|", "O:hi|"),  # --chat-template wins everywhere
])
def test_chat_template_precedence(tmp_path: Path, override: str | None, want_base: str, want_upper: str) -> None:
    engine = FakeLLM("m", adapters={"upper": ""}, chat_template="M:{{ messages[0].content }}|")
    msgs = [{"role": "user", "content": "hi"}]
    cfg = make_cfg(tmp_path, [{"id": "b", "messages": msgs}, {"id": "u", "messages": msgs, "adapter": "upper"}],
                   chat_template=override, adapter_templates={"upper": "A:{{ messages[0].content }}|"})
    run_job(engine, cfg)
    got = {r["id"]: r["text"] for r in read_jsonl(cfg.output_path)}
    assert got == {"b": expected_text(want_base, None), "u": expected_text(want_upper, "upper")}
    # chat prompts are tokenized without adding BOS again (the template decides)
    assert all(r["usage"]["prompt_tokens"] == len(want_base) for r in read_jsonl(cfg.output_path))


def test_sampled_lines_get_seeds_stable_across_resume(tmp_path: Path) -> None:
    class SeedLLM(FakeLLM):
        def __init__(self) -> None:
            super().__init__("m")
            self.seeds: dict[str, int | None] = {}

        def add_request(self, req: Any) -> None:
            self.seeds[req.prompt] = req.sampling.seed
            super().add_request(req)

    lines = [{"id": f"t{i}", "prompt": f"p{i}|", "temperature": 0.7} for i in range(6)]
    lines += [{"id": "own", "prompt": "own|", "temperature": 0.7, "seed": 11}, {"id": "greedy", "prompt": "g|"}]
    first, second = SeedLLM(), SeedLLM()
    cfg = make_cfg(tmp_path, lines)
    run_job(first, cfg)
    cfg.output_path.write_text("".join(cfg.output_path.read_text().splitlines(keepends=True)[:3]))  # "crash"
    run_job(second, cfg)
    assert second.seeds and all(second.seeds[p] == first.seeds[p] for p in second.seeds)
    assert len({first.seeds[f"p{i}|"] for i in range(6)}) == 6  # distinct per line
    assert first.seeds["own|"] == 11 and first.seeds["g|"] is None  # own seed kept; greedy untouched
    cfg.seed = 1
    third = SeedLLM()
    cfg.output_path.unlink()
    run_job(third, cfg)
    assert third.seeds["p0|"] != first.seeds["p0|"]  # the job seed matters
