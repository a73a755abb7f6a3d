"""Bad inputs: per-request errors (the batch goes on) and start-up errors that name the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorax.errors import AdapterError, ConfigError
from lorax.inference import LLM, GenerateRequest, SamplingParams

from .lora_utils import random_adapter
from .tiny_models import ENGINE, build_hf, hf_greedy, save

OK_PROMPT = [1, 2, 3]

# (request, substring of the error)
BAD_REQUESTS = [
    (GenerateRequest("unknown", prompt_token_ids=OK_PROMPT, adapter="nope"), "unknown adapter 'nope'"),
    (GenerateRequest("empty", prompt_token_ids=[]), "empty prompt"),
    (GenerateRequest("empty-text", prompt=""), "empty prompt"),
    (GenerateRequest("too-long", prompt_token_ids=[1] * 32), "max_model_len is 32"),
    (GenerateRequest("vocab", prompt_token_ids=[1, 96]), "[0, 96)"),
    (GenerateRequest("both", prompt="a", prompt_token_ids=[1]), "exactly one of"),
    (GenerateRequest("params", prompt_token_ids=OK_PROMPT, sampling=SamplingParams(top_p=0)), "top_p"),
    (GenerateRequest("max", prompt_token_ids=OK_PROMPT, sampling=SamplingParams(max_tokens=0)), "max_tokens"),
]


def test_bad_requests_fail_alone(qwen3_moe: tuple) -> None:
    hf, path = qwen3_moe
    llm = LLM(str(path), adapters={"a": random_adapter(hf, "a", rank=2)}, **ENGINE, max_model_len=32)
    good = GenerateRequest("good", prompt_token_ids=OK_PROMPT, sampling=SamplingParams(max_tokens=4, ignore_eos=True))
    reqs = [good] + [r for r, _ in BAD_REQUESTS] + [good]
    outs = llm.generate(reqs)
    assert [o.request_id for o in outs] == [r.request_id for r in reqs]
    for out, (_, why) in zip(outs[1:-1], BAD_REQUESTS, strict=True):
        assert out.error is not None and why in out.error, (out.request_id, out.error)
        assert out.token_ids == [] and out.finish_reason is None
    for out in (outs[0], outs[-1]):
        assert out.error is None and out.token_ids == hf_greedy(hf, OK_PROMPT, 4)


def test_prompt_text_without_tokenizer_is_a_request_error(tmp_path: Path) -> None:
    llm = LLM(str(save(build_hf("qwen3_moe_nonorm"), tmp_path / "m")), **ENGINE, max_model_len=16)
    out = llm.generate([GenerateRequest("t", prompt="hello")])[0]
    assert out.error is not None and "tokenizer" in out.error
    sp = SamplingParams(stop=["x"])
    out = llm.generate([GenerateRequest("s", prompt_token_ids=[1, 2], sampling=sp)])[0]
    assert out.error is not None and "stop strings need a tokenizer" in out.error
    with pytest.raises(ConfigError, match="tokenizer"):
        _ = llm.tokenizer


def test_adapter_rank_above_max_lora_rank(qwen3_moe: tuple) -> None:
    hf, path = qwen3_moe
    with pytest.raises(AdapterError, match=r"rank 8 exceeds max_lora_rank=4"):
        LLM(str(path), adapters={"big": random_adapter(hf, "big", rank=8)}, **ENGINE, max_lora_rank=4)


def test_adapter_for_another_model(qwen3_moe: tuple) -> None:
    _, path = qwen3_moe
    other = build_hf("mixtral")  # same hidden size, other expert / attention shapes
    with pytest.raises(AdapterError, match="another model|does not fit|has no module|not a MoE layer"):
        LLM(str(path), adapters={"x": random_adapter(other, "x", rank=2)}, **ENGINE)


def test_adapter_tensor_shape_mismatch_names_the_module(qwen3_moe: tuple) -> None:
    hf, path = qwen3_moe
    ad = random_adapter(hf, "x", rank=2, moe_format="none", dense_mlp=False)
    pair = ad.dense[(0, "self_attn.k_proj")]
    pair.B = torch.zeros(pair.B.shape[0] + 1, 2)
    with pytest.raises(AdapterError, match=r"layers\.0\.self_attn\.k_proj"):
        LLM(str(path), adapters={"x": ad}, **ENGINE)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(dtype="float64"), "dtype"),
        (dict(max_loras=0), "max_loras"),
        (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (dict(num_kv_blocks=1), "num_kv_blocks"),
        (dict(kernel_backend="cuda"), "kernel_backend"),
        (dict(max_num_sequences=4), "unknown engine option"),
        (dict(max_model_len=10_000), "max_position_embeddings"),
        (dict(max_model_len=64, num_kv_blocks=3, block_size=4), "max_model_len=64"),
    ],
)
def test_bad_engine_options(options: dict, match: str, qwen3_moe: tuple) -> None:
    _, path = qwen3_moe
    with pytest.raises(ConfigError, match=match):
        LLM(str(path), **{**ENGINE, **options})


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_errors_name_the_tensor(qwen3_moe: tuple, tmp_path: Path) -> None:
    _, path = qwen3_moe
    # a missing expert tensor
    d = _copy_model(path, tmp_path / "missing")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.3.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ConfigError, match=r"layers\.0\.mlp\.w13"):
        LLM(str(d), **ENGINE)
    # an unknown tensor
    d = _copy_model(path, tmp_path / "unknown")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.mystery.weight"] = torch.zeros(2)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ConfigError, match="mystery"):
        LLM(str(d), **ENGINE)
    # a shape that disagrees with config.json
    d = _copy_model(path, tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["moe_intermediate_size"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"experts\.\d\.\w+_proj\.weight' has shape"):
        LLM(str(d), **ENGINE)


def test_unsupported_model_and_missing_dir(tmp_path: Path) -> None:
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="gpt2"):
        LLM(str(tmp_path / "gpt2"), **ENGINE)
    with pytest.raises(ConfigError, match="not a directory|not fetchable"):
        LLM(str(tmp_path / "nowhere" / "x" / "y"), **ENGINE)


def test_sliding_window_caps_max_model_len(tmp_path: Path) -> None:
    hf = build_hf("mixtral")
    hf.config.sliding_window = 16
    path = save(hf, tmp_path / "m")
    assert LLM(str(path), **ENGINE).max_model_len == 16
    with pytest.raises(ConfigError, match="sliding_window"):
        LLM(str(path), **ENGINE, max_model_len=32)
