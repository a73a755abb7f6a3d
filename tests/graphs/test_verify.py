"""`lorax verify` on the CPU demo: agreement when the engine is right, failure when the LoRA path is
wrong, and the engine's weights restored bit-exactly after the merged-weight reference."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lorax.adapters import load_adapter
from lorax.inference.engine import LLM
from lorax.inference.recipe import load_recipe
from lorax.inference.verify import verify


@pytest.fixture(scope="module")
def demo() -> tuple[LLM, dict]:
    rec = load_recipe("demo")
    adapters = {n: load_adapter(s, name=n) for n, s in rec.adapters.items()}
    llm = LLM(rec.model, adapters=dict(adapters), **{**rec.engine, "device": "cpu", "max_loras": 2})
    return llm, adapters


def _probes(llm: LLM) -> list[list[int]]:
    return [llm.tokenizer.encode(t) for t in ("abc|", "Hello9|", "zZ0|")]


def test_verify_agrees_and_restores_weights(demo: tuple[LLM, dict]) -> None:
    llm, adapters = demo
    before = {n: w.clone() for n, w in llm.model.named_weights().items()}
    report = verify(llm, adapters, _probes(llm), max_tokens=6)
    assert report.ok, report
    assert [c.adapter for c in report.checks] == ["<base>", *adapters]
    for c in report.checks:
        assert c.reference.max_logprob_diff is not None and c.reference.max_logprob_diff < 1e-3
        assert c.reference.first_divergence is None
    for n, w in llm.model.named_weights().items():
        assert torch.equal(w, before[n]), f"{n} not restored after the merged reference"


def test_verify_catches_a_wrong_moe_lora_path(demo: tuple[LLM, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    """Scale every expert down_B the pool writes by 3: the slab path no longer equals the merge."""
    from lorax.inference import lora_pool

    llm, adapters = demo
    original = lora_pool._put_moe

    def wrong(slab, slot, m, R):  # type: ignore[no-untyped-def]
        original(slab, slot, m, R)
        for t in (slab.down_B, slab.shared_down_B):
            if t is not None:
                t[slot] *= 3.0

    monkeypatch.setattr(lora_pool, "_put_moe", wrong)
    for slot in range(llm.pool.S):  # force reloads through the sabotaged writer
        if llm.pool.slot_name[slot] is not None:
            llm.pool.evict(slot)
    report = verify(llm, adapters, _probes(llm), max_tokens=6)
    bad = {c.adapter for c in report.checks if not c.ok}
    assert not report.ok
    assert "<base>" not in bad, "the base model has no LoRA: it must still agree"
    assert bad == set(adapters), f"every adapter has expert LoRA and must be flagged, got {bad}"
    monkeypatch.setattr(lora_pool, "_put_moe", original)
    for slot in range(llm.pool.S):
        if llm.pool.slot_name[slot] is not None:
            llm.pool.evict(slot)


def test_verify_cli_json_on_the_demo() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lorax.cli.main", "verify", "--device", "cpu", "--max-tokens", "4", "--json"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["graphs"] is False
    assert {c["adapter"] for c in report["checks"]} == {"<base>", "reverse", "upper", "rot13", "swapcase"}


def test_bf16_engine_within_default_tolerance_and_dropped_expert_lora_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In bf16 the reference stays fp32: honest rounding passes the 16-bit default; an engine that
    silently drops the expert LoRA (the slab never written) is flagged for every adapter."""
    from lorax.inference import lora_pool

    rec = load_recipe("demo")
    adapters = {n: load_adapter(s, name=n) for n, s in rec.adapters.items()}
    llm = LLM(rec.model, adapters=dict(adapters), **{**rec.engine, "device": "cpu", "dtype": "bfloat16"})
    probes = _probes(llm)
    clean = verify(llm, adapters, probes, max_tokens=6)
    assert clean.ok, clean
    monkeypatch.setattr(lora_pool, "_put_moe", lambda slab, slot, m, R: None)
    for slot in range(llm.pool.S):
        if llm.pool.slot_name[slot] is not None:
            llm.pool.evict(slot)
    report = verify(llm, adapters, probes, max_tokens=6)
    assert {c.adapter for c in report.checks if not c.ok} == set(adapters)
    assert all(c.reference.first_divergence is not None for c in report.checks[1:])


@pytest.mark.parametrize("bad", [["ok", 3], "abc|", [""]])
def test_recipe_probes_must_be_a_list_of_strings(tmp_path, bad) -> None:  # type: ignore[no-untyped-def]
    from lorax.errors import ConfigError
    from lorax.inference.recipe import parse_recipe

    with pytest.raises(ConfigError, match="probes"):
        parse_recipe({"model": "m", "probes": bad}, tmp_path / "r.yaml")
    assert parse_recipe({"model": "m", "probes": ["a|"]}, tmp_path / "r.yaml").probes == ["a|"]
    assert load_recipe("demo").probes, "the demo recipe gives verify prompts in its own format"
