# ruff: noqa: E741  (I is the expert intermediate size, as in the kernel contracts)
"""Triton fused_moe (no LoRA) against fused_moe_ref: odd sizes, sentinels, empty input, dtypes.

The reference runs in fp32 on the same (rounded) inputs; the tolerance is relative to the output's
largest magnitude, per dtype.
"""

from __future__ import annotations

import pytest
import torch

from lorax.kernels.fused_moe import fused_moe, fused_moe_ref, fused_moe_scratch_bytes

TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def make_moe(T: int, H: int, I: int, E: int, k: int, dtype: torch.dtype, device: str,
             lo: int = 0, hi: int | None = None) -> tuple[torch.Tensor, ...]:
    x = torch.randn(T, H, device=device).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, device=device) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=device) / I**0.5).to(dtype)
    ids = torch.randint(lo, E if hi is None else hi, (T, k), dtype=torch.int32, device=device)
    w = torch.softmax(torch.randn(T, k, device=device), dim=-1)
    return x, w13, w2, w, ids


def ref_fp32(x, w13, w2, w, ids, lora=None):  # type: ignore[no-untyped-def]
    if lora is not None:
        lora = lora._replace(**{f: getattr(lora, f).float() for f in lora._fields
                                if isinstance(getattr(lora, f), torch.Tensor) and f != "token_slot"})
    return fused_moe_ref(x.float(), w13.float(), w2.float(), w.float(), ids, lora)


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = max(ref.abs().max().item(), 1e-6)
    err = (got.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max err {err:.3g} vs scale {scale:.3g} ({dtype})"


# (T, H, I, E, k, id low, id high)
CASES = [
    (1, 32, 16, 4, 2, 0, 4),  # one decode token
    (7, 48, 24, 5, 2, 0, 5),  # odd T, I not a multiple of the tile
    (13, 40, 20, 3, 3, -1, 5),  # sentinels below and above E, H not a multiple of BLOCK_K
    (20, 32, 16, 8, 1, 0, 8),  # top-1
    (33, 16, 32, 2, 2, 0, 2),  # several blocks per expert
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,H,I,E,k,lo,hi", CASES)
def test_fused_moe_matches_ref(device: str, dtype: torch.dtype, T: int, H: int, I: int, E: int, k: int,
                               lo: int, hi: int) -> None:
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, dtype, device, lo, hi)
    got = fused_moe(x, w13, w2, w, ids)
    assert got.shape == (T, H) and got.dtype == dtype
    assert_close(got, ref_fp32(x, w13, w2, w, ids), dtype)


@pytest.mark.parametrize(
    "name,ids",
    [
        ("all sentinels", lambda T, k, E: torch.full((T, k), -1, dtype=torch.int32)),
        ("all past E", lambda T, k, E: torch.full((T, k), E, dtype=torch.int32)),
        ("all on one expert", lambda T, k, E: torch.full((T, k), E - 1, dtype=torch.int32)),
        ("every expert empty but one token", lambda T, k, E: torch.cat(
            [torch.full((1, k), 1, dtype=torch.int32), torch.full((T - 1, k), -1, dtype=torch.int32)])),
    ],
)
def test_fused_moe_edge_cases(device: str, name: str, ids) -> None:  # type: ignore[no-untyped-def]
    T, H, I, E, k = 9, 32, 16, 4, 2
    x, w13, w2, w, _ = make_moe(T, H, I, E, k, torch.float32, device)
    topk_ids = ids(T, k, E).to(device)
    assert_close(fused_moe(x, w13, w2, w, topk_ids), ref_fp32(x, w13, w2, w, topk_ids), torch.float32)


def test_empty_input(device: str) -> None:
    x, w13, w2, w, ids = make_moe(0, 32, 16, 4, 2, torch.float32, device)
    assert fused_moe(x, w13, w2, w, ids).shape == (0, 32)


def test_strided_x_scratch_out_and_determinism(device: str) -> None:
    T, H, I, E, k = 11, 32, 16, 4, 2
    big, w13, w2, w, ids = make_moe(T, 2 * H, I, E, k, torch.float32, device)
    x = big[:, :H]  # row stride 2H
    w13 = w13[:, :, :H].contiguous()
    w2 = w2[:, :H].contiguous()
    first = fused_moe(x, w13, w2, w, ids)
    assert_close(first, ref_fp32(x.contiguous(), w13, w2, w, ids), torch.float32)
    scratch = torch.empty(fused_moe_scratch_bytes(x, w13, k) + 100, dtype=torch.uint8, device=device)
    out = torch.empty(T, H, device=device)
    again = fused_moe(x, w13, w2, w, ids, scratch=scratch, out=out)
    assert again.data_ptr() == out.data_ptr()
    assert torch.equal(again, first)  # the top-k sum has a fixed order: bitwise repeatable


def test_rejects_bad_shapes(device: str) -> None:
    x, w13, w2, w, ids = make_moe(3, 32, 16, 4, 2, torch.float32, device)
    with pytest.raises(ValueError, match="do not agree"):
        fused_moe(x, w13, w2[:, :16], w, ids)


# GPU: real layer shapes (Qwen3-30B-A3B, OLMoE, a Mixtral-like layer with a smaller I to bound the fp32 ref)
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 8, 100, 512, 2048])
@pytest.mark.parametrize("H,I,E,k", [(2048, 768, 128, 8), (2048, 1024, 64, 8), (4096, 3584, 8, 2)])
def test_fused_moe_gpu(dtype: torch.dtype, T: int, H: int, I: int, E: int, k: int) -> None:
    x, w13, w2, w, ids = make_moe(T, H, I, E, k, dtype, "cuda", -1, E)
    assert_close(fused_moe(x, w13, w2, w, ids), ref_fp32(x, w13, w2, w, ids), dtype)


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu() -> None:
    """The interpreter does not type-check kernels the way the compiler does (a name bound to two shapes
    in the branches of a runtime `if` passes there and fails on a GPU), so compile every launch of
    fused_moe for sm_90 through triton's bundled ptxas, with the runtime's argument specialization."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lorax.kernels.moe_tune", "--compile-check"], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and not any(ln.startswith("FAIL") for ln in lines), proc.stdout[-4000:] + proc.stderr[-2000:]
    compiled = {ln.split()[1] for ln in lines if ln.startswith("ok")}
    assert {"_gate_up_kernel", "_down_kernel", "_topk_sum_kernel", "_moe_lora_shrink_kernel", "_moe_count_kernel",
            "_moe_scatter_kernel", "_moe_prefix_kernel", "_moe_align_small_kernel",
            "_moe_lora_down_shrink_kernel", "_prefill_kernel", "_decode_kernel", "_decode_reduce_kernel",
            "_seg_shrink_kernel", "_seg_expand_kernel", "_seg_down_expand_kernel"} <= compiled


def test_moe_config_takes_the_lora_entry_for_lora_calls(monkeypatch):
    # a tuned bucket's "lora" entry is the config for calls with adapters; calls without use the rest
    import lorax.kernels.fused_moe as fm

    base = dict(BLOCK_M=16, BLOCK_N_GU=32, BLOCK_K_GU=256, BLOCK_N_D=64, BLOCK_K_D=256, GROUP_M=1, SPLIT=8,
                num_warps=4, num_stages=3)
    with_lora = {**base, "BLOCK_M": 32, "SPLIT": 2}
    table = {"Fake GPU": {"E128_H2048_I768_k8": {"8": {**base, "lora": with_lora}, "64": dict(base)}}}
    import lorax.kernels._common as common

    monkeypatch.setattr(common, "_config_file", lambda name: table if name == "fused_moe.json" else {})
    monkeypatch.setattr(common, "_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(common, "interpreting", lambda: False)
    dev = torch.device("cuda")
    assert fm.moe_config(4, 8, 128, 2048, 768, dev) == base
    assert fm.moe_config(4, 8, 128, 2048, 768, dev, lora=True) == with_lora
    assert fm.moe_config(40, 8, 128, 2048, 768, dev, lora=True) == base  # bucket without a lora entry
    assert "lora" not in fm.moe_config(40, 8, 128, 2048, 768, dev)


def test_moe_config_past_the_largest_bucket(monkeypatch):
    # past the largest tuned bucket: that bucket's tile when both are prefill sizes (> 48 pairs per expert),
    # else the heuristic (a decode bucket's tile is not taken for a prefill call)
    import lorax.kernels._common as common
    import lorax.kernels.fused_moe as fm
    import lorax.kernels.moe_config as mc

    large = dict(BLOCK_M=128, BLOCK_N_GU=128, BLOCK_K_GU=64, BLOCK_N_D=256, BLOCK_K_D=64, GROUP_M=8, SPLIT=1,
                 num_warps=8, num_stages=4)
    small = dict(BLOCK_M=16, BLOCK_N_GU=32, BLOCK_K_GU=256, BLOCK_N_D=64, BLOCK_K_D=256, GROUP_M=1, SPLIT=1,
                 num_warps=4, num_stages=3)
    tables = {"prefill": {"Fake GPU": {"E128_H2048_I768_k8": {"8": small, "2048": large}}},
              "decode": {"Fake GPU": {"E128_H2048_I768_k8": {"8": small, "128": small}}}}
    monkeypatch.setattr(common, "_device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(common, "interpreting", lambda: False)
    monkeypatch.setattr(mc, "interpreting", lambda: False)
    dev = torch.device("cuda")
    for name, table in tables.items():
        monkeypatch.setattr(common, "_config_file", lambda f, t=table: t if f == "fused_moe.json" else {})
        got = fm.moe_config(8192, 8, 128, 2048, 768, dev)
        assert got == (large if name == "prefill" else mc._default_config(8192, 8, 128)), name
        assert got["BLOCK_M"] == (128 if name == "prefill" else 64)
    # 200 tokens (12.5 pairs per expert) past a decode table: the heuristic's mid-size tile
    monkeypatch.setattr(common, "_config_file", lambda f: tables["decode"] if f == "fused_moe.json" else {})
    assert fm.moe_config(200, 8, 128, 2048, 768, dev) == mc._default_config(200, 8, 128)
