"""The engine on the Triton kernel backend (the interpreter on CPU, the real kernels on CUDA): base rows,
a per-expert and a shared-outer adapter in one batch, chunked prefill, against the merged oracles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lorax.inference import LLM, GenerateRequest, SamplingParams
from lorax.kernels import lora_stacked

from .lora_utils import merged, random_adapter
from .tiny_models import DEVICE, build_hf, hf_greedy, hf_logits, save

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
        reason="Triton on CPU needs TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)",
    ),
]

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]
NEW = 4


def _generate_matches_oracles(llm: LLM, hf, ads: dict, names: list[str | None]) -> None:  # type: ignore[no-untyped-def]
    """Every prompt of PROMPTS once per adapter name (None: the base model), greedy, equal to the merged oracle's."""
    reqs = [GenerateRequest(f"{a}-{i}", prompt_token_ids=p, adapter=a, sampling=SamplingParams(max_tokens=NEW, ignore_eos=True))
            for a in names for i, p in enumerate(PROMPTS)]
    for req, out in zip(reqs, llm.generate(reqs), strict=True):
        oracle = hf if req.adapter is None else merged(hf, ads[req.adapter])
        assert out.token_ids == hf_greedy(oracle, req.prompt_token_ids or [], NEW), req.request_id


@pytest.mark.parametrize("stacked", ["0", "1"])  # A apart / stacked under the dense weights
def test_triton_backend_matches_merged_oracles(stacked: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_stacked, "STACKED_MODE", stacked)
    hf = build_hf("qwen3_moe")
    path = save(hf, tmp_path / "m")
    ads = {
        "pe": random_adapter(hf, "pe", rank=4, seed=1),
        "so": random_adapter(hf, "so", rank=8, moe_format="shared-outer", seed=2),
    }
    llm = LLM(str(path), adapters=ads, device=DEVICE, dtype="float32", kernel_backend="triton",
              max_model_len=32, max_lora_rank=8, max_num_batched_tokens=4, enforce_eager=True)
    assert llm.ops.name == "triton"
    assert (llm.model.layers[0].attn.qkv._w_cat is not None) == (stacked == "1")
    _generate_matches_oracles(llm, hf, ads, [None, "pe", "so"])
    ours = llm.prompt_logits(GenerateRequest("l", prompt_token_ids=PROMPTS[0], adapter="so"))
    ref = hf_logits(merged(hf, ads["so"]), PROMPTS[0])
    assert (ours - ref).abs().max().item() / ref.abs().max().item() < 1e-4
    assert torch.isfinite(ours).all()


def test_triton_backend_lora_k_step_matches_merged_oracle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine with the MoE LoRA forced into the K step mode (config LORA_K, half-block shrink programs),
    as the tuned prefill buckets run it. A shared-outer adapter is registered too: steps without it leave
    the shared-outer slabs out and take the K step; a step with it takes the epilogue path."""
    from lorax.kernels import fused_moe as fm
    from lorax.kernels import moe_config as mc

    base_config, base_k_step = mc.moe_config, fm._lora_k_step
    k_steps: list[bool] = []

    def k_step_config(T: int, topk: int, E: int, H: int, I: int, device: torch.device,  # noqa: E741
                      lora: bool = False) -> dict[str, int]:
        cfg = base_config(T, topk, E, H, I, device, lora)
        return {**cfg, "SPLIT": 1, "LORA_K": 1, "SHRINK_M": 16, "BLOCK_M": 32} if lora else cfg

    def spy_k_step(lora, cfg):  # type: ignore[no-untyped-def]
        mode = base_k_step(lora, cfg)
        if lora is not None:
            k_steps.append(bool(mode))
        return mode

    monkeypatch.setattr(mc, "moe_config", k_step_config)
    monkeypatch.setattr(fm, "_lora_k_step", spy_k_step)
    hf = build_hf("qwen3_moe")
    path = save(hf, tmp_path / "m")
    ads = {"a": random_adapter(hf, "a", rank=4, seed=3), "b": random_adapter(hf, "b", rank=8, seed=4),
           "so": random_adapter(hf, "so", rank=8, moe_format="shared-outer", seed=5)}
    llm = LLM(str(path), adapters=ads, device=DEVICE, dtype="float32", kernel_backend="triton",
              max_model_len=32, max_lora_rank=8, max_num_batched_tokens=8, enforce_eager=True)
    for names, want_k in (([None, "a", "b"], True), (["so", "a"], False)):
        k_steps.clear()
        _generate_matches_oracles(llm, hf, ads, names)
        assert k_steps and (any(k_steps) if want_k else not all(k_steps)), (names, k_steps)
    ours = llm.prompt_logits(GenerateRequest("l", prompt_token_ids=PROMPTS[0], adapter="b"))
    ref = hf_logits(merged(hf, ads["b"]), PROMPTS[0])
    assert (ours - ref).abs().max().item() / ref.abs().max().item() < 1e-4


def test_triton_backend_segment_schedule_matches_merged_oracle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine with the MoE LoRA in the segment schedule (kernels/moe_lora_seg.py), which it takes by default
    only with many adapters in use at prefill sizes: the thresholds lowered so that this tiny model's steps
    take it. The step's distinct adapters reach the kernels as `active_slots`; a step with a shared-outer
    adapter keeps the other schedules."""
    from lorax.kernels import moe_config as mc

    monkeypatch.setattr(mc, "SEG_MIN_SLOTS", 2)
    monkeypatch.setattr(mc, "_PREFILL_PAIRS", 0)
    base_use_seg = mc.use_seg
    seen: list[tuple[int | None, bool]] = []

    def spy_use_seg(lora, T, topk, E):  # type: ignore[no-untyped-def]
        mode = base_use_seg(lora, T, topk, E)
        seen.append((lora.active_slots, mode))
        return mode

    monkeypatch.setattr(mc, "use_seg", spy_use_seg)
    hf = build_hf("qwen3_moe")
    path = save(hf, tmp_path / "m")
    ads = {"a": random_adapter(hf, "a", rank=4, seed=6), "b": random_adapter(hf, "b", rank=8, seed=7),
           "c": random_adapter(hf, "c", rank=1, seed=8),
           "so": random_adapter(hf, "so", rank=8, moe_format="shared-outer", seed=9)}
    llm = LLM(str(path), adapters=ads, device=DEVICE, dtype="float32", kernel_backend="triton",
              max_model_len=32, max_lora_rank=8, max_num_batched_tokens=16, enforce_eager=True)
    for names, want_seg in (([None, "a", "b", "c"], True), (["so", "a"], False)):
        seen.clear()
        _generate_matches_oracles(llm, hf, ads, names)
        assert seen and any(m for _, m in seen) == want_seg, (names, seen)
        assert max(a or 0 for a, _ in seen) == len([n for n in names if n]), seen  # the step's adapters


@pytest.mark.parametrize("new_kv", [True, False], ids=["k_new", "all_keys_paged"])
def test_triton_backend_prefill_attention_paths_match_merged_oracles(
    new_kv: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefill attention reading each step's keys beside their queries (rope_store's k_out, the qkv output's v)
    and only the cached prefix through the block table (the default), or every key through the table: chunks of
    4 tokens, so most steps have a prefix."""
    from lorax.inference.layers.attention import Attention
    from lorax.kernels import attention as attn

    monkeypatch.setattr(Attention, "prefill_new_kv", new_kv)
    base_check = attn._check_new_kv
    taken: list[bool] = []

    def spy(*args, **kw):  # type: ignore[no-untyped-def]
        taken.append(base_check(*args, **kw))
        return taken[-1]

    monkeypatch.setattr(attn, "_check_new_kv", spy)
    hf = build_hf("qwen3_moe")
    path = save(hf, tmp_path / "m")
    ads = {"pe": random_adapter(hf, "pe", rank=4, seed=1)}
    llm = LLM(str(path), adapters=ads, device=DEVICE, dtype="float32", kernel_backend="triton",
              max_model_len=32, max_lora_rank=8, max_num_batched_tokens=4, enforce_eager=True)
    _generate_matches_oracles(llm, hf, ads, [None, "pe"])
    assert taken and all(t == new_kv for t in taken)  # every prefill launch took the chosen path
