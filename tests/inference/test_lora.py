"""Multi-LoRA parity: engine with adapters == transformers with each adapter merged into the weights.

Adapters in canonical form are written by hand (per-expert and shared-outer MoE layouts, attention,
dense-MLP / shared-expert modules, mixed ranks); PEFT-made adapters go through lorax.adapters. Every row
of a batch mixing all adapters and base rows must equal its own oracle: the single-adapter reference
(transformers + merged delta, or PEFT merge_and_unload) greedy-decoding that prompt alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorax.inference import LLM, GenerateRequest, SamplingParams
from lorax.kernels import lora_stacked

from .lora_utils import merged, random_adapter
from .tiny_models import ENGINE, build_hf, hf_greedy, hf_logits, save

PROMPTS = [[1, 2, 3, 4, 5, 6], [9, 8, 7]]
NEW = 6
RTOL = 1e-4


def _adapters(hf: torch.nn.Module) -> dict:
    """Three adapters of different ranks and MoE layouts (max rank 8)."""
    return {
        "per_expert": random_adapter(hf, "per_expert", rank=4, moe_format="per-expert", seed=1),
        "shared_outer": random_adapter(hf, "shared_outer", rank=8, moe_format="shared-outer", seed=2),
        "attn_only": random_adapter(hf, "attn_only", rank=2, moe_format="none", dense_mlp=False, seed=3),
    }


def _run_mixed(llm: LLM, names: list[str | None]) -> dict[tuple[str | None, int], list[int]]:
    reqs, keys = [], []
    for name in names:
        for j, prompt in enumerate(PROMPTS):
            keys.append((name, j))
            sp = SamplingParams(max_tokens=NEW, ignore_eos=True)
            reqs.append(GenerateRequest(f"{name}-{j}", prompt_token_ids=prompt, adapter=name, sampling=sp))
    outs = llm.generate(reqs)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return {k: o.token_ids for k, o in zip(keys, outs, strict=True)}


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral", "llama"])
def test_mixed_adapter_batch_matches_merged_oracles(arch: str, tmp_path: Path) -> None:
    _check_mixed_batch(arch, tmp_path)


@pytest.mark.parametrize("arch", ["qwen2_moe", "llama"])  # qkv with a bias; dense MLPs
def test_stacked_shrink_matches_merged_oracles(arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stacked under the weight (one GEMM for the base output and the shrink) on every dense layer."""
    monkeypatch.setattr(lora_stacked, "STACKED_MODE", "1")
    llm = _check_mixed_batch(arch, tmp_path)
    attn = llm.model.layers[0].attn
    assert attn.qkv._w_cat is not None and attn.qkv.weight.data_ptr() == attn.qkv._w_cat.data_ptr()
    assert attn.qkv.lora_A is not None and attn.qkv.lora_A.data_ptr() > attn.qkv._w_cat.data_ptr()


def _check_mixed_batch(arch: str, tmp_path: Path) -> LLM:
    hf = build_hf(arch)
    path = save(hf, tmp_path / arch)
    adapters = _adapters(hf)
    llm = LLM(str(path), adapters=dict(adapters), **ENGINE, max_model_len=64, max_loras=4, max_lora_rank=8)
    names: list[str | None] = [None, *adapters]
    got = _run_mixed(llm, names)
    for name in names:
        oracle = hf if name is None else merged(hf, adapters[name])
        for j, prompt in enumerate(PROMPTS):
            assert got[(name, j)] == hf_greedy(oracle, prompt, NEW), f"{arch} adapter {name} prompt {j}"
        if name is not None:
            ours = llm.prompt_logits(GenerateRequest("l", prompt_token_ids=PROMPTS[0], adapter=name))
            ref = hf_logits(oracle, PROMPTS[0])
            err = (ours - ref).abs().max().item() / ref.abs().max().item()
            assert err < RTOL, f"{arch} adapter {name}: logits differ by {err:.2e}"
    # the adapters must matter, or this test checks nothing
    assert any(got[(n, 0)] != got[(None, 0)] for n in adapters)
    return llm


def test_adapters_on_some_layers_and_modules_only(tmp_path: Path) -> None:
    """Sparse targets: q on layer 0 and v on layer 2 in one adapter, experts of layer 2 only in another."""
    hf = build_hf("qwen3_moe")
    path = save(hf, tmp_path / "m")
    a = random_adapter(hf, "a", rank=4, moe_format="none", dense_mlp=False, seed=5)
    a.dense = {k: v for k, v in a.dense.items() if k in ((0, "self_attn.q_proj"), (2, "self_attn.v_proj"))}
    b = random_adapter(hf, "b", rank=2, attention=False, dense_mlp=False, seed=6)
    b.moe = {2: b.moe[2]}
    llm = LLM(str(path), adapters={"a": a, "b": b}, **ENGINE, max_model_len=64, max_lora_rank=8)
    assert llm.model.layers[1].attn.qkv.lora_A is None and llm.model.layers[0].mlp.lora is None
    got = _run_mixed(llm, ["a", "b", None])
    for name, ad in (("a", a), ("b", b)):
        for j, prompt in enumerate(PROMPTS):
            assert got[(name, j)] == hf_greedy(merged(hf, ad), prompt, NEW), f"adapter {name} prompt {j}"
        assert any(got[(name, j)] != got[(None, j)] for j in range(len(PROMPTS))), f"adapter {name} changes nothing"


def test_more_adapters_than_slots(tmp_path: Path) -> None:
    """max_loras=1 with three adapters: requests are grouped by adapter, slots evicted and reloaded."""
    hf = build_hf("qwen3_moe")
    path = save(hf, tmp_path / "m")
    adapters = _adapters(hf)
    llm = LLM(str(path), adapters=dict(adapters), **ENGINE, max_model_len=64, max_loras=1, max_lora_rank=8)
    names: list[str | None] = [*adapters, None, "per_expert"]
    got = _run_mixed(llm, names)
    for name in set(names):
        oracle = hf if name is None else merged(hf, adapters[name])
        for j, prompt in enumerate(PROMPTS):
            assert got[(name, j)] == hf_greedy(oracle, prompt, NEW), f"adapter {name} prompt {j}"
    assert llm.pool is not None and llm.pool.refcount == [0]


def test_interleaved_adapters_are_grouped_not_thrashed(tmp_path: Path) -> None:
    """One slot, requests alternating between two adapters: each adapter is loaded once."""
    hf = build_hf("qwen3_moe_nonorm")
    adapters = _adapters(hf)
    llm = LLM(str(save(hf, tmp_path / "m")), adapters=adapters, **ENGINE, max_model_len=32, max_loras=1,
              max_lora_rank=8)
    names = ["per_expert", "shared_outer"] * 4
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    outs = llm.generate([GenerateRequest(str(i), prompt_token_ids=[i + 1, 2], adapter=n, sampling=sp)
                         for i, n in enumerate(names)])
    assert all(o.error is None and len(o.token_ids) == 3 for o in outs)
    assert llm.pool is not None and llm.pool.num_loads == 2


def test_evicted_slot_is_zeroed_in_place(tmp_path: Path) -> None:
    hf = build_hf("qwen3_moe_nonorm")
    llm = LLM(str(save(hf, tmp_path / "m")), adapters=_adapters(hf), **ENGINE, max_model_len=32,
              max_loras=2, max_lora_rank=8)
    pool = llm.pool
    assert pool is not None
    moe = llm.model.layers[0].mlp.lora
    buffers = [moe.gate_up_A, moe.down_B, llm.model.layers[0].attn.qkv.lora_A]
    ptrs = [b.data_ptr() for b in buffers]
    slot = pool.acquire("per_expert")
    assert slot is not None and all(b[slot].abs().sum() > 0 for b in buffers)
    pool.release(slot)
    pool.evict(slot)
    assert all(b[slot].abs().sum() == 0 for b in buffers)
    assert int(pool.slot_rank[slot]) == 0
    assert [b.data_ptr() for b in buffers] == ptrs


# arch -> extra PEFT target_modules (dense MLP layers of Qwen3-MoE, the Qwen2-MoE shared expert)
PEFT_CASES = {"qwen3_moe": ["gate_proj", "up_proj", "down_proj"], "qwen2_moe": ["gate_proj", "up_proj", "down_proj"],
              "mixtral": [], "olmoe": []}


@pytest.mark.parametrize("arch", list(PEFT_CASES))
def test_peft_adapter_matches_peft_merge(arch: str, tmp_path: Path) -> None:
    """A PEFT adapter on q/k/v/o (+ dense MLPs) and the fused experts (target_parameters), read by
    lorax.adapters; the oracle is PEFT's merge_and_unload."""
    peft = pytest.importorskip("peft")
    hf = build_hf(arch)
    path = save(hf, tmp_path / "base")
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", *PEFT_CASES[arch]],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    pm = peft.get_peft_model(build_hf(arch), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    pm.save_pretrained(tmp_path / "adapter")
    oracle = pm.merge_and_unload().eval()

    llm = LLM(str(path), adapters={"peft": str(tmp_path / "adapter")}, **ENGINE, max_model_len=64,
              max_lora_rank=8)
    got = _run_mixed(llm, ["peft", None])
    for j, prompt in enumerate(PROMPTS):
        assert got[("peft", j)] == hf_greedy(oracle, prompt, NEW)
        assert got[(None, j)] == hf_greedy(hf, prompt, NEW)
    assert got[("peft", 0)] != got[(None, 0)], "the PEFT adapter does not change the output: test too weak"
    ours = llm.prompt_logits(GenerateRequest("l", prompt_token_ids=PROMPTS[0], adapter="peft"))
    ref = hf_logits(oracle, PROMPTS[0])
    assert (ours - ref).abs().max().item() / ref.abs().max().item() < RTOL


LAYOUT_OF = {"per_expert": "per-expert", "shared_outer": "shared-outer", "attn_only": "peft"}


def test_adapters_from_disk_reloaded_past_max_cpu_loras(tmp_path: Path) -> None:
    """Adapter directories in three on-disk layouts; one slot and one host copy: every switch re-reads
    the adapter from disk, and every row still matches its merged oracle."""
    from lorax.adapters import save_adapter

    hf = build_hf("qwen3_moe")
    path = save(hf, tmp_path / "m")
    adapters = _adapters(hf)
    sources = {n: str(save_adapter(a, tmp_path / n, LAYOUT_OF[n])) for n, a in adapters.items()}
    llm = LLM(str(path), adapters=sources, **ENGINE, max_model_len=64, max_loras=1, max_cpu_loras=1,
              max_lora_rank=8)
    got = _run_mixed(llm, [*adapters, None])
    for name in [*adapters, None]:
        oracle = hf if name is None else merged(hf, adapters[name])
        for j, prompt in enumerate(PROMPTS):
            assert got[(name, j)] == hf_greedy(oracle, prompt, NEW), f"adapter {name} prompt {j}"
    assert llm.pool is not None and len(llm.pool._host) == 1
