"""The `--baseline hf` runner of `lorax bench throughput`: what a user would run instead.

Hugging Face transformers `generate` (greedy, exactly `output_len` new tokens) on the same model shape
with random weights, plus PEFT LoRA adapters of the same rank on q/k/v/o and both fused expert
parameters (`target_parameters`). PEFT cannot mix MoE adapters in one batch, so the prompts are grouped
by adapter and run as sub-batches of at most `batch_size`, one adapter each, switched with
`set_adapter`. transformers and peft are optional extras: imported here only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from lorax.errors import LoraxError


def _imports() -> tuple[Any, Any]:
    try:
        import peft
        import transformers
    except ImportError as exc:
        raise LoraxError(
            f"--baseline hf needs transformers and peft ({exc.name} is missing): pip install transformers peft"
        ) from exc
    return transformers, peft


def build_hf_model(config: dict[str, Any], adapter_names: list[str], rank: int, device: torch.device,
                   dtype: torch.dtype, seed: int) -> Any:
    """A transformers model from `config` (random weights drawn on `device`) wrapped by PEFT with one
    random LoRA per name. LoRA B is random too (PEFT initialises it to zero, which would be free)."""
    transformers, peft = _imports()
    raw = {k: v for k, v in config.items() if k not in ("architectures", "dtype", "torch_dtype")}
    hf_config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    hf_config.output_router_logits = False  # generate() fails with router logits on (FACTS.md)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():  # explicit random weights (never zeros or uninitialised memory), drawn on device
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02, generator=gen)
            if name.endswith("norm.weight"):
                p.add_(1.0)
    lora = peft.LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    pm = peft.get_peft_model(model, lora, adapter_name=adapter_names[0], autocast_adapter_dtype=False)
    for name in adapter_names[1:]:
        pm.add_adapter(name, lora)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                # add_adapter makes fp32 factors; every adapter gets the model's dtype, as lorax's do.
                fresh = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
                p.data = fresh.mul_(0.02).to(dtype)
    return pm


def sub_batches(adapters: list[str], batch_size: int) -> list[tuple[str, list[int]]]:
    """Prompt indices grouped by adapter (first-seen order), cut into chunks of at most batch_size."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(adapters):
        groups.setdefault(name, []).append(i)
    return [(name, idx[s : s + batch_size]) for name, idx in groups.items() for s in range(0, len(idx), batch_size)]


def run_hf_baseline(config: dict[str, Any], prompts: list[list[int]], adapters: list[str], rank: int,
                    output_len: int, batch_size: int, device: torch.device, dtype: torch.dtype,
                    max_batches: int | None = None, seed: int = 0,
                    progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Time transformers + PEFT generate over the sub-batches; -> report dict (output tok/s over the
    sub-batches run; with max_batches, only the first few run, which is stated in the report)."""
    transformers, peft = _imports()
    names = list(dict.fromkeys(adapters))
    model = build_hf_model(config, names, rank, device, dtype, seed)
    experts_impl = str(getattr(model.config, "_experts_implementation", None))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def generate(ids: torch.Tensor, new: int) -> torch.Tensor:
        out: torch.Tensor = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0,
        )
        return out

    plan = sub_batches(adapters, batch_size)
    run = plan[:max_batches] if max_batches else plan
    with torch.inference_mode():
        model.set_adapter(run[0][0])
        warm = torch.tensor([prompts[i] for i in run[0][1][:2]], device=device)
        generate(warm, min(2, output_len))  # warm-up: cuBLAS handles, allocator
        batches = []
        total_s, out_tokens, in_tokens = 0.0, 0, 0
        for j, (name, idx) in enumerate(run):
            progress(f"hf sub-batch {j + 1}/{len(run)}: adapter {name}, {len(idx)} prompts")
            model.set_adapter(name)
            ids = torch.tensor([prompts[i] for i in idx], device=device)
            sync()
            t0 = time.perf_counter()
            out = generate(ids, output_len)
            sync()
            seconds = time.perf_counter() - t0
            new = (out.shape[1] - ids.shape[1]) * out.shape[0]
            batches.append({"adapter": name, "prompts": len(idx), "seconds": seconds, "output_tokens": new})
            total_s += seconds
            out_tokens += new
            in_tokens += ids.numel()
    return {
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "experts_implementation": experts_impl,
        "batch_size": batch_size,
        "batches_total": len(plan),
        "batches_run": len(run),
        "prompts_run": sum(len(idx) for _, idx in run),
        "total_s": total_s,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "output_tok_per_s": out_tokens / total_s,
        "batches": batches,
    }
