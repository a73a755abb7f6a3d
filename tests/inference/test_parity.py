"""Engine == transformers on tiny random models of every supported family (CPU, fp32, torch backend).

Reference: transformers' own forward / greedy generate on the same weights. Tolerance: prefill logits
within 1e-4 of the reference relative to its largest magnitude; greedy tokens identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorax.errors import ConfigError
from lorax.inference import LLM, GenerateRequest, SamplingParams

from .tiny_models import ARCHS, ENGINE, build_hf, hf_greedy, hf_logits, save

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11] * 6, [42]]
NEW_TOKENS = 8
RTOL = 1e-4

# (architecture, on-disk expert layout) cases; dense families have no fused variant.
CASES = [(a, False) for a in ARCHS] + [("qwen3_moe", True), ("mixtral", True), ("qwen2_moe", True)]


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


@pytest.mark.parametrize(("arch", "fused"), CASES, ids=[f"{a}{'-fused' if f else ''}" for a, f in CASES])
def test_engine_matches_transformers(arch: str, fused: bool, tmp_path: Path) -> None:
    hf = build_hf(arch)
    path = save(hf, tmp_path / arch, fused=fused)
    llm = LLM(str(path), **ENGINE, max_model_len=64)

    for prompt in PROMPTS[:2]:
        ours = llm.prompt_logits(GenerateRequest("p", prompt_token_ids=prompt))
        ref = hf_logits(hf, prompt)
        err = (ours - ref).abs().max().item() / ref.abs().max().item()
        assert err < RTOL, f"{arch}: prefill logits differ by {err:.2e} (relative)"

    reqs = [GenerateRequest(str(i), prompt_token_ids=p, sampling=_greedy(NEW_TOKENS)) for i, p in enumerate(PROMPTS)]
    outs = llm.generate(reqs)  # all prompts in one batch
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.error is None
        assert out.finish_reason == "length"
        assert out.token_ids == hf_greedy(hf, prompt, NEW_TOKENS), f"{arch}: prompt {prompt}"


def test_sharded_checkpoint_loads_the_same(tmp_path: Path) -> None:
    hf = build_hf("qwen3_moe")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    llm = LLM(str(tmp_path / "sharded"), **ENGINE, max_model_len=64)
    prompt = PROMPTS[0]
    out = llm.generate([GenerateRequest("a", prompt_token_ids=prompt, sampling=_greedy(6))])[0]
    assert out.token_ids == hf_greedy(hf, prompt, 6)


def test_dummy_weights_are_random_and_seeded(tmp_path: Path) -> None:
    path = save(build_hf("qwen3_moe_nonorm"), tmp_path / "m")
    a = LLM(str(path), **ENGINE, load_format="dummy", seed=1, max_model_len=32)
    b = LLM(str(path), **ENGINE, load_format="dummy", seed=1, max_model_len=32)
    c = LLM(str(path), **ENGINE, load_format="dummy", seed=2, max_model_len=32)
    wa, wb, wc = (m.model.named_weights() for m in (a, b, c))
    for name, t in wa.items():
        assert t.abs().sum() > 0, f"dummy {name} is all zeros"
        assert torch.equal(t, wb[name]), f"dummy {name} not reproducible from the seed"
    assert any(not torch.equal(t, wc[n]) for n, t in wa.items())


@pytest.mark.parametrize(("dtype", "tol"), [("bfloat16", 3e-2), ("float16", 5e-3)])  # seen: 1.1e-2, 1.4e-3
def test_half_precision_runs_close_to_fp32(dtype: str, tol: float, tmp_path: Path) -> None:
    """bf16/fp16 engine (with an adapter in the batch) stays near the fp32 reference: 16-bit rounding."""
    from .lora_utils import merged, random_adapter

    hf = build_hf("qwen2_moe")
    path = save(hf, tmp_path / "m")
    ad = random_adapter(hf, "a", rank=4, scale=0.1)
    llm = LLM(str(path), adapters={"a": ad}, **{**ENGINE, "dtype": dtype}, max_model_len=64)
    for name, oracle in ((None, hf), ("a", merged(hf, ad))):
        ours = llm.prompt_logits(GenerateRequest("p", prompt_token_ids=PROMPTS[2], adapter=name))
        ref = hf_logits(oracle, PROMPTS[2])
        err = (ours - ref).abs().max().item() / ref.abs().max().item()
        assert err < tol, f"{dtype} adapter {name}: logits differ by {err:.2e}"
    outs = llm.generate([GenerateRequest(str(i), prompt_token_ids=p, adapter="a", sampling=_greedy(4))
                         for i, p in enumerate(PROMPTS)])
    assert all(o.error is None and len(o.token_ids) == 4 for o in outs)


def test_hub_repo_id_resolves_from_the_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`LLM("org/name")` finds a model in the Hugging Face cache without a network (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-moe"
    hf = build_hf("qwen3_moe_nonorm")
    save(hf, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    llm = LLM("tiny-org/tiny-moe", **ENGINE, max_model_len=32)
    assert llm.model_name == "tiny-org/tiny-moe" and llm.model_dir.name == commit
    out = llm.generate([GenerateRequest("a", prompt_token_ids=PROMPTS[0], sampling=_greedy(4))])[0]
    assert out.token_ids == hf_greedy(hf, PROMPTS[0], 4)
    with pytest.raises(ConfigError, match="tiny-org/absent"):
        LLM("tiny-org/absent", **ENGINE)
