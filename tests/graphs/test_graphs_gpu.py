"""CUDA graphs and the sync-free forward, on the GPU (skipped without CUDA).

The engine runs the Triton backend in fp32 on a tiny random Qwen3-MoE; the same engine is stepped with
its decode graphs and with them switched off (eager), so both see the same weights and the same LoRA
slab while slots are loaded and evicted between steps (4 adapters, 2 slots).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lorax.adapters.canonical import CanonicalAdapter, LoraPair, MoELora
from lorax.inference import LLM, GenerateRequest, SamplingParams
from lorax.kernels import lora_stacked

pytestmark = pytest.mark.gpu

H, HEADS, KV, D, E, I_MOE, I_DENSE, V, LAYERS = 64, 4, 2, 16, 8, 32, 48, 128, 3


def _checkpoint(path: Path) -> Path:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=V, hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=D,
        num_hidden_layers=LAYERS, intermediate_size=I_DENSE, moe_intermediate_size=I_MOE, num_experts=E,
        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1], max_position_embeddings=1024,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def _adapter(name: str, rank: int, moe_format: str, seed: int, scale: float = 0.2) -> CanonicalAdapter:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    ad = CanonicalAdapter(name=name, moe_format=moe_format)
    for layer in range(LAYERS):
        for mod, (fin, fout) in {
            "self_attn.q_proj": (H, HEADS * D), "self_attn.k_proj": (H, KV * D),
            "self_attn.v_proj": (H, KV * D), "self_attn.o_proj": (HEADS * D, H),
        }.items():
            ad.dense[(layer, mod)] = LoraPair(rnd(rank, fin), rnd(fout, rank))
        if moe_format == "none":
            continue
        if layer == 1:  # the dense (mlp_only) layer
            ad.dense[(layer, "mlp.gate_proj")] = LoraPair(rnd(rank, H), rnd(I_DENSE, rank))
            ad.dense[(layer, "mlp.up_proj")] = LoraPair(rnd(rank, H), rnd(I_DENSE, rank))
            ad.dense[(layer, "mlp.down_proj")] = LoraPair(rnd(rank, I_DENSE), rnd(H, rank))
            continue
        outer = 1 if moe_format == "shared-outer" else E
        ad.moe[layer] = MoELora(rnd(outer, 2 * rank, H), rnd(E, 2 * I_MOE, rank), rnd(E, rank, I_MOE), rnd(outer, H, rank))
    return ad


ADAPTERS = {
    "pe16": ("per-expert", 16),
    "pe8": ("per-expert", 8),
    "so4": ("shared-outer", 4),
    "attn1": ("none", 1),
}


@pytest.fixture(scope="module", params=["0", "1"], ids=["A_apart", "A_stacked"])
def llm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    # the dense layers' A apart from the weights, or stacked under them (one GEMM + the expand)
    path = _checkpoint(tmp_path_factory.mktemp("graphs") / "m")
    adapters = {n: _adapter(n, r, fmt, seed=i) for i, (n, (fmt, r)) in enumerate(ADAPTERS.items())}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lora_stacked, "STACKED_MODE", request.param)
        engine = LLM(
            str(path), adapters=adapters, device="cuda", dtype="float32", kernel_backend="triton",
            max_loras=2, max_lora_rank=16, max_num_seqs=16, max_num_batched_tokens=512, num_kv_blocks=512,
            block_size=16,
        )
    assert engine.runner.graphs is not None, "decode graphs were not captured"
    assert (engine.model.layers[0].attn.qkv._w_cat is not None) == (request.param == "1")
    yield engine


def _run(llm: LLM, reqs: list[GenerateRequest], graphs: bool) -> list[list[int]]:
    saved = llm.runner.graphs
    llm.runner.graphs = saved if graphs else None
    try:
        outs = llm.generate(reqs)
    finally:
        llm.runner.graphs = saved
    for o in outs:
        assert o.error is None, o.error
    return [o.token_ids for o in outs]


def _requests(rng: random.Random, n: int, max_tokens: int, tag: str) -> list[GenerateRequest]:
    names = [None, *ADAPTERS]
    return [
        GenerateRequest(
            request_id=f"{tag}-{j}",
            prompt_token_ids=[rng.randrange(V) for _ in range(rng.randint(1, 20))],
            adapter=rng.choice(names),
            sampling=SamplingParams(max_tokens=rng.randint(1, max_tokens), ignore_eos=True),
        )
        for j in range(n)
    ]


def test_forward_never_syncs_with_the_host(llm: LLM) -> None:
    """Every forward of a generation (prefill, eager decode, graph replay) under sync-debug 'error'."""
    runner = llm.runner
    original = runner.forward_logits
    calls = {"n": 0}

    def checked(batch, all_rows=False):  # type: ignore[no-untyped-def]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            calls["n"] += 1
            return original(batch, all_rows)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    runner.forward_logits = checked  # type: ignore[method-assign]
    try:
        rng = random.Random(1)
        _run(llm, _requests(rng, 6, 8, "sync-graph"), graphs=True)
        _run(llm, _requests(rng, 6, 8, "sync-eager"), graphs=False)
    finally:
        runner.forward_logits = original  # type: ignore[method-assign]
    assert calls["n"] > 4


def test_graph_replay_equals_eager_over_random_adapter_mixes(llm: LLM) -> None:
    assert llm.runner.graphs is not None
    replays = {"n": 0}
    graphs = llm.runner.graphs
    original = graphs.forward_logits

    def counted(batch):  # type: ignore[no-untyped-def]
        replays["n"] += 1
        return original(batch)

    graphs.forward_logits = counted  # type: ignore[method-assign]
    rng = random.Random(0)
    try:
        for mix in range(100):
            reqs = _requests(rng, rng.randint(1, 13), 10, f"mix{mix}")
            eager = _run(llm, reqs, graphs=False)
            replayed = _run(llm, reqs, graphs=True)
            for r, a, b in zip(reqs, eager, replayed, strict=True):
                assert a == b, f"mix {mix} request {r.request_id} adapter {r.adapter}: eager {a} graph {b}"
    finally:
        graphs.forward_logits = original  # type: ignore[method-assign]
    assert replays["n"] > 100, "the decode steps did not go through graph replay"


def test_long_generation_under_graphs_stays_identical_to_eager(llm: LLM) -> None:
    rng = random.Random(7)
    reqs = [
        GenerateRequest(
            request_id=f"long-{j}", prompt_token_ids=[rng.randrange(V) for _ in range(5 + j)], adapter=name,
            sampling=SamplingParams(max_tokens=520, ignore_eos=True),
        )
        for j, name in enumerate([None, "pe16", "so4", "attn1", "pe8"])
    ]
    eager = _run(llm, reqs, graphs=False)
    replayed = _run(llm, reqs, graphs=True)
    for r, a, b in zip(reqs, eager, replayed, strict=True):
        assert len(a) == 520
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        assert first is None, f"{r.adapter}: graph output diverges from eager at token {first}"
