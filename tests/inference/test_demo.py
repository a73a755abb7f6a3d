"""The shipped demo (recipes/demo/) through the engine: every task adapter reproduces its task on
held-out strings, all adapters in one batch, and the engine's greedy tokens equal transformers' prompt
by prompt (the base model; the fused and per-expert adapters through PEFT merge_and_unload; the
shared-outer one, which PEFT cannot read, with its canonical deltas merged into the weights)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lorax.inference import LLM, GenerateRequest, SamplingParams
from lorax.recipes.demo_tasks import ALPHABET, TASKS

from .tiny_models import ENGINE

DEMO = Path(__file__).resolve().parents[2] / "recipes" / "demo"
THRESHOLD = 0.98
N_HELD_OUT = 100
# adapters PEFT itself loads (fused target_parameters; legacy per-expert keys, which PEFT converts)
PEFT_LAYOUT = ("reverse", "rot13", "upper")

pytestmark = pytest.mark.skipif(not (DEMO / "model" / "model.safetensors").exists(), reason="demo model not shipped")


def _adapters() -> dict[str, str]:
    root = DEMO / "adapters"
    found = sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").exists()) if root.exists() else []
    return {name: str(root / name) for name in found if name in TASKS}


def _held_out() -> list[str]:
    rng = random.Random(777)  # not a training seed of the demo
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12))) for _ in range(N_HELD_OUT)]


@pytest.fixture(scope="module")
def demo_llm() -> LLM:
    return LLM(str(DEMO / "model"), adapters=_adapters(), **ENGINE, max_model_len=64, max_loras=4, max_lora_rank=16)


def test_every_task_in_one_mixed_batch(demo_llm: LLM) -> None:
    tasks = ["copy", *_adapters()]
    strings = _held_out()
    reqs = [
        GenerateRequest(f"{task}-{i}", prompt=s + "|", adapter=None if task == "copy" else task,
                        sampling=SamplingParams(max_tokens=16))
        for task in tasks for i, s in enumerate(strings)
    ]
    random.Random(0).shuffle(reqs)  # interleave adapters and base rows in every step
    outs = {o.request_id: o for o in demo_llm.generate(reqs)}
    for task in tasks:
        hits = sum(
            outs[f"{task}-{i}"].text == TASKS[task](s) and outs[f"{task}-{i}"].finish_reason == "stop"
            for i, s in enumerate(strings)
        )
        assert hits / len(strings) >= THRESHOLD, f"demo {task}: exact match {hits / len(strings):.2f}"


@torch.no_grad()
def test_demo_tokens_equal_transformers_and_peft(demo_llm: LLM) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(DEMO / "model", dtype=torch.float32).eval()
    oracles: dict[str | None, torch.nn.Module] = {None: base}
    for name in PEFT_LAYOUT:
        if name in demo_llm.adapter_names:
            fresh = transformers.AutoModelForCausalLM.from_pretrained(DEMO / "model", dtype=torch.float32)
            oracles[name] = peft.PeftModel.from_pretrained(fresh, _adapters()[name]).merge_and_unload().eval()
    if "swapcase" in demo_llm.adapter_names:  # shared-outer: no PEFT reader; merge the canonical deltas
        from lorax.adapters import load_adapter

        from .lora_utils import merged

        oracles["swapcase"] = merged(base, load_adapter(_adapters()["swapcase"], name="swapcase"))
    strings = _held_out()[:12]
    for name, oracle in oracles.items():
        reqs = [GenerateRequest(str(i), prompt=s + "|", adapter=name, sampling=SamplingParams(max_tokens=14))
                for i, s in enumerate(strings)]
        for req, out in zip(reqs, demo_llm.generate(reqs), strict=True):
            ids = torch.tensor([out.prompt_token_ids])
            ref = oracle.generate(ids, max_new_tokens=14, do_sample=False, eos_token_id=2, pad_token_id=0)
            ref_ids = ref[0, ids.shape[1]:].tolist()
            assert out.token_ids == ref_ids[: len(out.token_ids)] and len(out.token_ids) == len(ref_ids), (name, req.prompt)
