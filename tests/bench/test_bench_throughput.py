"""`lorax bench throughput` on a tiny Qwen3-MoE (dummy weights, CPU): the report's structure and the
relations its numbers must satisfy (token counts, step counts, ratios that are quotients of fields)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lorax.cli.main import main
from lorax.inference.bench_inputs import STANDARD_MODEL, random_adapter, write_model_dir
from lorax.inference.config import ModelConfig
from lorax.inference.lora_pool import check_adapter

TINY = dict(STANDARD_MODEL, vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, intermediate_size=40, moe_intermediate_size=16, num_experts=8,
            num_experts_per_tok=2, mlp_only_layers=[1], max_position_embeddings=256, bos_token_id=4,
            eos_token_id=5)
N, IN, OUT, ADAPTERS, RANK = 4, 8, 5, 2, 4
PASSES = ("lora", "base", "base_engine")


def _argv(model_dir: Path, *extra: str) -> list[str]:
    return ["bench", "throughput", "--model", str(model_dir), "--device", "cpu", "--load-format", "dummy",
            "--num-prompts", str(N), "--input-len", str(IN), "--output-len", str(OUT), "--adapters",
            str(ADAPTERS), "--rank", str(RANK), "--max-num-seqs", str(N), "--max-num-batched-tokens", "64",
            "--copy-mb", "4", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """One CLI run with the HF baseline (when peft is installed), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("bench")
    model_dir = write_model_dir(TINY, tmp / "model")
    path = tmp / "report.json"
    extra = ["--json", str(path)]
    try:
        import peft  # noqa: F401

        extra += ["--baseline", "hf"]
    except ImportError:
        pass
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(_argv(model_dir, *extra)) == 0
    return json.loads(path.read_text()), buf.getvalue()


def test_report_structure(run: tuple[dict[str, Any], str]) -> None:
    report, table = run
    for key in ("command", "date", "device", "versions", "model", "engine", "workload", "copy_gbs", "passes",
                "ratios"):
        assert key in report, key
    assert set(report["passes"]) == set(PASSES)
    assert {"torch", "triton"} <= set(report["versions"])
    assert report["model"]["layers"] == 3 and report["model"]["cut"] is False
    assert report["engine"]["max_loras"] == ADAPTERS and report["engine"]["max_lora_rank"] == RANK
    assert "--model" in report["command"] and f"--adapters {ADAPTERS}" in report["command"]
    for label in PASSES:
        assert f"\n{label} " in table


@pytest.mark.parametrize("label", PASSES)
def test_token_and_step_counts(run: tuple[dict[str, Any], str], label: str) -> None:
    s = run[0]["passes"][label]
    assert s["requests"] == N
    assert s["input_tokens"] == N * IN and s["prefill_tokens"] == N * IN
    assert s["output_tokens"] == N * OUT  # ignore_eos: every request runs to output_len
    # All prompts fit one prefill step (which samples the first token); then OUT - 1 decode steps at batch N.
    assert s["num_prefill_steps"] == 1 and s["num_decode_steps"] == OUT - 1
    assert s["decode_batch"] == N and s["decode_steps_at_batch"] == OUT - 1
    assert s["decode_time_s"] + s["prefill_time_s"] <= s["total_s"]


@pytest.mark.parametrize("label", PASSES)
def test_rates_are_quotients(run: tuple[dict[str, Any], str], label: str) -> None:
    report = run[0]
    s = report["passes"][label]
    assert s["requests_per_s"] == pytest.approx(s["requests"] / s["total_s"])
    assert s["input_tok_per_s"] == pytest.approx(s["input_tokens"] / s["total_s"])
    assert s["output_tok_per_s"] == pytest.approx(s["output_tokens"] / s["total_s"])
    assert s["decode_hbm_gbs"] == pytest.approx(s["decode_bytes_per_step"] / s["decode_step_ms"] / 1e6)
    assert s["decode_hbm_fraction_of_copy"] == pytest.approx(s["decode_hbm_gbs"] / report["copy_gbs"])
    assert s["decode_step_ms_per_layer"] == pytest.approx(s["decode_step_ms"] / 3)
    assert s["decode_tok_per_s"] == pytest.approx(s["decode_batch"] * 1e3 / s["decode_step_ms"])
    assert s["prefill_tflops"] > 0 and s["decode_step_ms"] > 0


def test_lora_pass_touches_more_bytes_and_ratios_are_consistent(run: tuple[dict[str, Any], str]) -> None:
    report = run[0]
    p, r = report["passes"], report["ratios"]
    # Same prompts and context lengths: LoRA adds bytes, the two base-only passes touch the same bytes.
    assert p["lora"]["decode_bytes_per_step"] > p["base"]["decode_bytes_per_step"]
    assert p["base"]["decode_bytes_per_step"] == p["base_engine"]["decode_bytes_per_step"]
    for other in ("base", "base_engine"):
        assert r[f"decode_step_lora_over_{other}"] == pytest.approx(
            p["lora"]["decode_step_ms"] / p[other]["decode_step_ms"])
        assert r[f"output_tok_s_lora_over_{other}"] == pytest.approx(
            p["lora"]["output_tok_per_s"] / p[other]["output_tok_per_s"])


def test_hf_baseline(run: tuple[dict[str, Any], str]) -> None:
    pytest.importorskip("peft")
    report, table = run
    hf = report["baseline_hf"]
    # N prompts over ADAPTERS adapters, one adapter per sub-batch of <= max_num_seqs.
    assert hf["batches_total"] == hf["batches_run"] == ADAPTERS
    assert [b["adapter"] for b in hf["batches"]] == [f"bench{j}" for j in range(ADAPTERS)]
    assert hf["output_tokens"] == N * OUT and hf["input_tokens"] == N * IN
    assert hf["output_tok_per_s"] == pytest.approx(hf["output_tokens"] / hf["total_s"])
    assert report["ratios"]["lora_over_hf_output_tok_s"] == pytest.approx(
        report["passes"]["lora"]["output_tok_per_s"] / hf["output_tok_per_s"])
    assert "transformers" in table


@pytest.mark.parametrize(
    "adapters,batch,expected",
    [
        (["a", "b", "a", "b"], 4, [("a", [0, 2]), ("b", [1, 3])]),
        (["a"] * 5, 2, [("a", [0, 1]), ("a", [2, 3]), ("a", [4])]),
        (["b", "a", "b"], 1, [("b", [0]), ("b", [2]), ("a", [1])]),
    ],
)
def test_sub_batches_one_adapter_each(adapters: list[str], batch: int, expected: list[Any]) -> None:
    from lorax.inference.hf_baseline import sub_batches

    assert sub_batches(adapters, batch) == expected


def test_random_adapter_fits_and_is_nonzero() -> None:
    mcfg = ModelConfig.from_hf(TINY)
    a = random_adapter(mcfg, "x", 4, seed=1, dtype=torch.float32, device=torch.device("cpu"))
    check_adapter(a, mcfg, max_rank=4)
    assert sorted(a.moe) == [0, 2]  # layer 1 is dense (mlp_only_layers)
    assert len(a.dense) == 3 * 4  # q/k/v/o on every layer
    tensors = [t for p in a.dense.values() for t in (p.A, p.B)]
    tensors += [t for m in a.moe.values() for t in (m.gate_up_A, m.gate_up_B, m.down_A, m.down_B)]
    assert all(bool((t != 0).all()) for t in tensors)
    b = random_adapter(mcfg, "y", 4, seed=2, dtype=torch.float32, device=torch.device("cpu"))
    assert not torch.equal(a.moe[0].down_B, b.moe[0].down_B)


def test_layers_cut(tmp_path: Path) -> None:
    d = write_model_dir(STANDARD_MODEL, tmp_path, layers=24)
    assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 24
    assert ModelConfig.from_pretrained_dir(d).num_layers == 24


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--baseline", "vllm"], "--baseline"),
        (["--layers", "1", "--load-format", "auto"], "--layers"),
        (["--num-prompts", "0"], "--num-prompts"),
        (["--standard"], "at most one"),
    ],
)
def test_bad_flags_exit_2(tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = write_model_dir(TINY, tmp_path)
    assert main(_argv(model_dir, *extra)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_smoke_with_graphs_and_hf(tmp_path: Path) -> None:
    """The CUDA path end to end on a small model: Triton kernels, decode graphs, bf16, HF baseline."""
    small = dict(TINY, hidden_size=64, head_dim=16, moe_intermediate_size=32, vocab_size=256)
    model_dir = write_model_dir(small, tmp_path / "model")
    path = tmp_path / "report.json"
    argv = _argv(model_dir, "--json", str(path), "--baseline", "hf", "--dtype", "bfloat16", "--copy-mb", "256")
    argv[argv.index("--device") + 1] = "cuda"
    assert main(argv) == 0
    report = json.loads(path.read_text())
    assert report["engine"]["cuda_graphs"] is True and report["engine"]["kernels"] == "triton"
    for label in PASSES:
        s = report["passes"][label]
        assert s["output_tokens"] == N * OUT and s["num_decode_steps"] == OUT - 1
    assert report["baseline_hf"]["output_tokens"] == N * OUT


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_standard_without_gpu_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "throughput", "--layers", "2"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
