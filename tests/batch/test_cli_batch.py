"""`lorax batch-run` from the command line, on the fake engine: flags, recipes, exit codes, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from batch_helpers import HERE, key_of, read_jsonl, write_lines
from fake_engine import FakeLLM, expected_text

import lorax.inference
from lorax.cli.main import main

ADAPTERS = ["reverse", "upper", "rot13", "swapcase", None]


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace LLM with the fake; record how the command built it."""
    calls: list[dict[str, Any]] = []

    def factory(model: str, adapters: dict[str, str] | None = None, **options: Any) -> FakeLLM:
        calls.append({"model": model, "adapters": adapters, **options})
        return FakeLLM(model, adapters, **{k: v for k, v in options.items() if k in ("max_num_seqs", "max_model_len")})

    monkeypatch.setitem(lorax.inference.__dict__, "LLM", factory)
    return calls


def lines_for(n: int) -> list[dict[str, Any]]:
    return [{"id": f"q{i}", "prompt": f"Ab{i}|", "adapter": ADAPTERS[i % 5]} for i in range(n)]


def test_flags_override_the_recipe(tmp_path: Path, engine_calls: list[dict[str, Any]],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: mine\nmodel: ./m\nadapters: {reverse: ./a}\n"
                      "engine: {max_num_seqs: 2, dtype: float32}\nsampling: {max_tokens: 16}\n")
    inp = write_lines(tmp_path / "in.jsonl", lines_for(10))
    out = tmp_path / "o" / "out.jsonl"
    rc = main(["batch-run", str(inp), "-o", str(out), "--recipe", str(recipe), "--adapter", "upper=/u",
               "--adapter", "rot13=/r", "--adapter", "swapcase=/s", "--max-num-seqs", "3", "--max-tokens", "2",
               "--seed", "5", "--max-num-batched-tokens", "512", "--gpu-memory-utilization", "0.5"])
    assert rc == 0
    [call] = engine_calls
    assert call["model"] == str(tmp_path / "m")
    assert call["adapters"] == {"reverse": str(tmp_path / "a"), "upper": "/u", "rot13": "/r", "swapcase": "/s"}
    assert (call["max_num_seqs"], call["dtype"], call["seed"]) == (3, "float32", 5)
    assert (call["max_num_batched_tokens"], call["gpu_memory_utilization"]) == (512, 0.5)
    assert "max_loras" not in call  # flags not given are not passed: the engine's defaults apply
    recs = read_jsonl(out)
    assert len(recs) == 10 and all(r["finish_reason"] == "length" and len(r["token_ids"]) == 2 for r in recs)
    assert (tmp_path / "o" / "out.errors.jsonl").exists()
    err = capsys.readouterr()
    assert err.out == ""  # stdout stays free for pipes
    assert "10 ok, 0 errors" in err.err


def test_default_is_the_builtin_demo_recipe(tmp_path: Path, engine_calls: list[dict[str, Any]],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    inp = write_lines(tmp_path / "prompts.jsonl", lines_for(5))
    assert main(["batch-run", str(inp), "--quiet"]) == 0
    assert "built-in 'demo' recipe" not in capsys.readouterr().err  # --quiet
    assert main(["batch-run", str(inp), "-o", str(tmp_path / "b.jsonl")]) == 0
    assert "built-in 'demo' recipe" in capsys.readouterr().err
    assert engine_calls[0]["model"].endswith("recipes/demo/model")
    assert set(engine_calls[0]["adapters"]) == {"reverse", "upper", "rot13", "swapcase"}
    recs = read_jsonl(tmp_path / "prompts.out.jsonl")
    assert [r["text"] for r in recs] == [expected_text(f"Ab{i}|", ADAPTERS[i % 5]) for i in range(5)]


def test_examples_file_runs_clean_on_the_demo_recipe(tmp_path: Path, engine_calls: list[dict[str, Any]]) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples" / "prompts.jsonl"
    out = tmp_path / "demo.jsonl"
    assert main(["batch-run", str(examples), "-o", str(out), "--ordered"]) == 0
    assert read_jsonl(tmp_path / "demo.errors.jsonl") == []
    n = sum(1 for line in examples.read_text().splitlines() if line.strip())
    assert [key_of(r) for r in read_jsonl(out)] == [key_of(json.loads(x)) for x in examples.read_text().splitlines()]
    assert len(read_jsonl(out)) == n >= 20


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["--adapter", "noequals"], 2, "NAME=SOURCE"),
    (["--recipe", "no-such-recipe"], 1, "no built-in recipe"),
    (["--model", "m", "-o", "IN"], 2, "may not be the input"),
    (["--model", "m", "--chat-template", "missing.jinja"], 1, "neither a file"),
])
def test_usage_errors(tmp_path: Path, engine_calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str],
                      args: list[str], code: int, needle: str) -> None:
    inp = write_lines(tmp_path / "in.jsonl", lines_for(2))
    args = [str(inp) if a == "IN" else a for a in args]
    assert main(["batch-run", str(inp), *args]) == code
    assert needle in capsys.readouterr().err
    assert engine_calls == []  # failed before loading anything


def _run_fake(args: list[str], delay: float) -> subprocess.Popen[str]:
    env = {**os.environ, "FAKE_STEP_DELAY": str(delay)}
    return subprocess.Popen([sys.executable, str(HERE / "fake_run.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_records(path: Path, n: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {n} records")


def _check_one_record_per_line(out: Path, err: Path, n_lines: int, n_bad: int) -> None:
    outs, errs = read_jsonl(out), read_jsonl(err)
    keys = [key_of(r) for r in outs]
    assert len(keys) == len(set(keys)) and len(outs) == n_lines - n_bad
    assert len(errs) == n_bad and len({r["line"] for r in errs}) == n_bad
    for r in outs:
        i = int(r["id"][1:])
        assert r["text"] == expected_text(f"Ab{i}|", ADAPTERS[i % 5])


def test_kill_9_then_resume_gives_one_record_per_line(tmp_path: Path) -> None:
    lines: list[Any] = lines_for(300)
    for i in (50, 150, 250):
        lines[i] = "{broken json"
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out, err = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    args = [str(inp), "-o", str(out), "--model", "m", "--quiet", "--max-num-seqs", "4",
            *[f"--adapter={a}=x" for a in ADAPTERS if a]]
    for target in (40, 160):  # two kills at different depths, each while requests are in flight
        proc = _run_fake(args, delay=0.004)
        _wait_for_records(out, target, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert out.read_bytes().count(b"\n") < 297  # killed before the end, not after
    proc = _run_fake(args, delay=0.0)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    _check_one_record_per_line(out, err, 300, 3)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_stops_cleanly(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    inp = write_lines(tmp_path / "in.jsonl", lines_for(300))
    out, err = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    args = [str(inp), "-o", str(out), "--model", "m", "--max-num-seqs", "4", *[f"--adapter={a}=x" for a in ADAPTERS if a]]
    proc = _run_fake(args, delay=0.004)
    _wait_for_records(out, 30, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "interrupted:" in stderr and "rerun to resume" in stderr
    assert out.read_bytes().endswith(b"\n")  # finished writing: no torn line
    n_first = len(read_jsonl(out))
    assert 30 <= n_first < 300
    proc = _run_fake(args, delay=0.0)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert f"{n_first} skipped" in stderr
    _check_one_record_per_line(out, err, 300, 0)


def test_served_model_name_lets_vllm_files_run_unchanged(tmp_path: Path, engine_calls: list[dict[str, Any]]) -> None:
    line = {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "messages": [{"role": "user", "content": "Hi"}],
                     "max_completion_tokens": 100}}
    inp = write_lines(tmp_path / "in.jsonl", [line])
    common = ["batch-run", str(inp), "-o", str(tmp_path / "out.jsonl"), "--model", "/models/llama", "-q",
              "--chat-template", "{{ messages[-1].content }}|"]
    assert main(common) == 0
    [err] = read_jsonl(tmp_path / "out.errors.jsonl")
    assert err["error"]["code"] == "unknown_adapter" and "meta-llama/Meta-Llama-3-8B-Instruct" in err["error"]["message"]
    assert main([*common, "--retry-errors", "--served-model-name", "meta-llama/Meta-Llama-3-8B-Instruct"]) == 0
    assert read_jsonl(tmp_path / "out.errors.jsonl") == []
    [rec] = read_jsonl(tmp_path / "out.jsonl")
    assert rec["response"]["body"]["choices"][0]["message"]["content"] == "Hi"
