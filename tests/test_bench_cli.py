"""`lorax bench kernels`: flag checking, the roofline arithmetic, and a CPU smoke run end to end."""

from __future__ import annotations

import json

import pytest
import torch

from lorax.cli.main import main

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize(
    "argv,code,message",
    [
        (["--tokens", "1,x"], 2, "--tokens"),
        (["--tokens", "0"], 2, "positive"),
        (["--kernels", "moe,flash"], 2, "unknown group"),
        (["--device", "cpu"], 2, "tiny"),
        (["--workload", "huge"], 2, "--workload"),
    ],
)
def test_bad_flags_exit_2(argv, code, message, capsys):
    assert main(["bench", "kernels", *argv]) == code
    assert message in capsys.readouterr().err


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU message")
def test_no_gpu_is_one_line_error(capsys):
    assert main(["bench", "kernels"]) == 1
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1


def test_roofline_arithmetic_follows_benchmarks_md():
    from lorax.kernels.bench import STANDARD, expected_experts_hit, moe_bytes, roofline_ms

    H, inter, r = 2048, 768, 16
    # E_hit = E (1 - (1 - k/E)^T): one token touches exactly k experts; many tokens approach E.
    assert expected_experts_hit(128, 8, 1) == pytest.approx(8)
    assert 127 < expected_experts_hit(128, 8, 2048) <= 128
    T, hit, pairs = 8, 50, 60
    base = moe_bytes(STANDARD, hit, pairs, T, lora=False)
    assert base == hit * 3 * H * inter * 2 + 2 * T * H * 2  # expert weights + x in + y out, bf16
    assert moe_bytes(STANDARD, hit, pairs, T, lora=True) - base == pairs * 2 * r * 3 * (H + inter)
    # bytes-bound and flops-bound sides of the roofline
    assert roofline_ms(3_020_000_000, 0, 3.02, 788) == pytest.approx(1.0)
    assert roofline_ms(0, 788_000_000_000, 3.02, 788) == pytest.approx(1.0)


def test_cpu_smoke_run_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "kernels", "--device", "cpu", "--workload", "tiny", "--tokens", "1,3",
            "--kernels", "qkv,attention", "--adapters", "2", "--json", str(path)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    report = json.loads(path.read_text())
    kernels = {(r["kernel"], r["tokens"]) for r in report["rows"]}
    expected = {"qkv_base", "qkv_lora", "qkv_base+lora", "qkv_base+lora_apart", "lora_batch_build", "store_kv",
                "attn_decode", "attn_prefill", "attn_prefill_paged"}
    assert kernels == {(k, t) for k in expected for t in (1, 3)}
    for r in report["rows"]:
        assert r["ours_ms"] > 0
        assert r["roofline_fraction"] == pytest.approx(r["roofline_ms"] / r["ours_ms"])
        if r["rel_err"] is not None:  # numerics were checked against the reference before timing
            assert r["rel_err"] < 1e-4, r
        assert f"| {r['kernel']} | {r['tokens']} |" in table
    assert report["workload"]["adapters"] == 2
    assert set(report["ratios"]["qkv_lora_over_base"]) == {"1", "3"}
    assert report["copy_tb_s"] > 0


def test_cli_groups_match_bench():
    from lorax.cli.bench_cmd import _GROUPS
    from lorax.kernels.bench import KERNEL_GROUPS

    assert _GROUPS == KERNEL_GROUPS
