"""`lorax bench throughput`: end-to-end offline throughput of the engine on random prompts and adapters.

One run measures, on the same device and the same prompts:
  - a copy bandwidth (torch copy of a large tensor, bytes read + written): the HBM yardstick;
  - the engine with K random adapters (prompt i -> adapter i % K), then the same prompts base-only
    (adapter None) on the same engine, then (optionally) on a second engine built without adapters;
  - optionally the Hugging Face transformers + PEFT baseline (inference/hf_baseline.py).

Every step of a pass is timed on the host around `LLM.step()`; the step ends with the sampled ids'
device->host copy, so the wall time of a step is its device time plus the host scheduling around it.
The scheduler's batch is read through a wrapper around `scheduler.schedule` (no engine edits), and the
byte / FLOP model of each step (bench_cost.py, after ../shared/BENCHMARKS.md) is applied
after the timed region.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lorax.errors import ConfigError, LoraxError
from lorax.inference.bench_cost import decode_step_bytes, prefill_step_flops
from lorax.inference.bench_inputs import (
    Workload,
    adapter_name,
    copy_bandwidth_gbs,
    free_device,
    make_prompts,
    random_adapter,
)
from lorax.inference.config import ModelConfig
from lorax.inference.types import GenerateRequest, SamplingParams

Progress = Callable[[str], None]


# ---- one timed pass ----------------------------------------------------------------------------------
@dataclass
class StepRecord:
    is_decode: bool
    seconds: float
    num_seqs: int
    num_tokens: int
    cost: float  # decode: bytes touched; prefill: FLOPs


@dataclass
class PassResult:
    label: str
    total_s: float
    num_requests: int
    input_tokens: int
    output_tokens: int
    steps: list[StepRecord] = field(default_factory=list)


def timed_pass(llm: Any, label: str, prompts: list[list[int]], adapters: list[str | None], output_len: int,
               rank: int, sync: Callable[[], None]) -> PassResult:
    """Run every prompt to `output_len` tokens (ignore_eos, greedy); time the whole pass and each step."""
    mcfg: ModelConfig = llm.model_config
    elem = torch.empty((), dtype=llm.dtype).element_size()
    sched = llm.scheduler
    inner = sched.schedule
    seen: list[Any] = []

    def recording_schedule() -> Any:
        batch = inner()
        seen.append(batch)
        return batch

    sched.schedule = recording_schedule  # instance attribute: shadows the method for this pass only
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    result = PassResult(label, 0.0, len(prompts), sum(len(p) for p in prompts), 0)
    outputs = []
    try:
        sync()
        t_begin = time.perf_counter()
        for i, (ids, adapter) in enumerate(zip(prompts, adapters, strict=True)):
            llm.add_request(GenerateRequest(f"{label}-{i}", prompt_token_ids=ids, adapter=adapter, sampling=sp))
        while llm.has_unfinished():
            seen.clear()
            t0 = time.perf_counter()
            outputs.extend(llm.step())
            sync()
            seconds = time.perf_counter() - t0
            if seen and seen[-1] is not None:
                result.steps.append(_record(seen[-1], seconds, mcfg, elem, rank))
        sync()
        result.total_s = time.perf_counter() - t_begin
    finally:
        vars(sched).pop("schedule", None)
    failed = [o for o in outputs if o.error]
    if failed:
        raise LoraxError(f"bench pass {label!r}: request {failed[0].request_id} failed: {failed[0].error}")
    result.output_tokens = sum(len(o.token_ids) for o in outputs)
    return result


def _record(batch: Any, seconds: float, mcfg: ModelConfig, elem: int, rank: int) -> StepRecord:
    """Cost of a step from its batch, read after the step: `num_computed` is then the context length."""
    adapters = [s.adapter for s in batch.seqs]
    ends = [s.num_computed for s in batch.seqs]
    tokens = sum(batch.num_new)
    if batch.is_decode:
        cost = float(decode_step_bytes(mcfg, elem, adapters, ends, rank))
    else:
        cost = float(prefill_step_flops(mcfg, batch.num_new, ends, adapters, rank))
    return StepRecord(batch.is_decode, seconds, len(batch.seqs), tokens, cost)


def summarize(p: PassResult, copy_gbs: float, peak_tflops: float, num_layers: int) -> dict[str, Any]:
    """Throughput and per-step figures of one pass. The decode step is the median over pure-decode steps
    at the largest decode batch of the pass (the steady state with max_num_seqs running)."""
    decode = [s for s in p.steps if s.is_decode]
    prefill = [s for s in p.steps if not s.is_decode]
    out: dict[str, Any] = {
        "label": p.label,
        "total_s": p.total_s,
        "requests": p.num_requests,
        "input_tokens": p.input_tokens,
        "output_tokens": p.output_tokens,
        "requests_per_s": p.num_requests / p.total_s,
        "input_tok_per_s": p.input_tokens / p.total_s,
        "output_tok_per_s": p.output_tokens / p.total_s,
        "num_steps": len(p.steps),
        "num_decode_steps": len(decode),
        "num_prefill_steps": len(prefill),
        "decode_time_s": sum(s.seconds for s in decode),
        "prefill_time_s": sum(s.seconds for s in prefill),
    }
    if decode:
        batch = max(s.num_seqs for s in decode)
        at_batch = [s for s in decode if s.num_seqs == batch]
        ms = statistics.median(s.seconds for s in at_batch) * 1e3
        nbytes = statistics.fmean(s.cost for s in at_batch)
        gbs = nbytes / ms / 1e6
        out.update({
            "decode_batch": batch,
            "decode_steps_at_batch": len(at_batch),
            "decode_step_ms": ms,
            "decode_step_ms_per_layer": ms / num_layers,
            "decode_tok_per_s": batch / ms * 1e3,  # steady-state generation rate at that batch
            "decode_step_ms_all_median": statistics.median(s.seconds for s in decode) * 1e3,
            "decode_bytes_per_step": nbytes,
            "decode_hbm_gbs": gbs,
            "decode_hbm_fraction_of_copy": gbs / copy_gbs,
            "decode_roofline_ms": nbytes / copy_gbs / 1e6,
        })
    if prefill:
        flops = sum(s.cost for s in prefill)
        seconds = sum(s.seconds for s in prefill)
        out.update({
            "prefill_tokens": sum(s.num_tokens for s in prefill),
            "prefill_tflops": flops / seconds / 1e12,
            "prefill_fraction_of_peak": flops / seconds / 1e12 / peak_tflops,
        })
    return out


# ---- the whole benchmark -----------------------------------------------------------------------------
@dataclass
class BenchSpec:
    model_dir: Path
    engine: dict[str, Any]  # EngineConfig options
    workload: Workload = field(default_factory=Workload)
    full_layers: int | None = None  # layers of the uncut model (None: not cut)
    copy_bytes: int | None = None  # None: 2 GiB on CUDA, 32 MiB on the CPU
    base_engine: bool = True  # also time an engine built without adapters
    baseline: str | None = None  # "hf"
    baseline_batches: int | None = None  # HF sub-batches to run (None: all)
    baseline_batch_size: int | None = None  # HF sub-batch size (None: the engine's max_num_seqs)
    peak_tflops: float = 788.0
    command: str = ""


def _sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _passes(llm: Any, spec: BenchSpec, prompts: list[list[int]], with_lora: bool, progress: Progress) -> list[PassResult]:
    wl = spec.workload
    sync = _sync_for(llm.device)
    # Warm-up (Triton compiles, allocator growth): one batch of short requests on each path timed below.
    warm_n = min(len(prompts), llm.config.max_num_seqs)
    warm_out = min(4, wl.output_len)
    labels: list[tuple[str, list[str | None]]] = []
    if with_lora:
        labels.append(("lora", [wl.adapter_of(i) for i in range(len(prompts))]))
    labels.append(("base" if with_lora else "base_engine", [None] * len(prompts)))
    for label, adapters in labels:
        progress(f"warm-up {label}")
        timed_pass(llm, f"warm-{label}", prompts[:warm_n], adapters[:warm_n], warm_out, wl.rank, sync)
    results = []
    for label, adapters in labels:
        progress(f"timed pass {label}: {len(prompts)} prompts x {wl.input_len} in / {wl.output_len} out")
        results.append(timed_pass(llm, label, prompts, adapters, wl.output_len, wl.rank, sync))
    return results


def run_throughput(spec: BenchSpec, progress: Progress = lambda _: None) -> dict[str, Any]:
    """Build the engine(s), run the passes (and the baseline), return the report as a JSON-able dict."""
    from lorax.inference.engine import LLM, _resolve_device

    wl = spec.workload
    mcfg = ModelConfig.from_pretrained_dir(spec.model_dir)
    if wl.rank > int(spec.engine.get("max_lora_rank", 16)):
        raise ConfigError(f"--rank {wl.rank} exceeds the engine's max_lora_rank={spec.engine.get('max_lora_rank', 16)}")
    device = _resolve_device(str(spec.engine.get("device", "auto")))
    copy_bytes = spec.copy_bytes or (2 << 30 if device.type == "cuda" else 32 << 20)
    progress(f"copy bandwidth ({copy_bytes / 2**30:.2f} GiB tensor)")
    copy_gbs = copy_bandwidth_gbs(device, copy_bytes)

    prompts = make_prompts(wl.num_prompts, wl.input_len, mcfg.vocab_size, wl.seed)
    dtype_name = str(spec.engine.get("dtype", "auto"))
    adapter_dtype = {"float32": torch.float32, "float16": torch.float16}.get(
        dtype_name, torch.bfloat16 if device.type == "cuda" else torch.float32)
    progress(f"{wl.adapters} random adapters of rank {wl.rank}")
    adapters = {adapter_name(j): random_adapter(mcfg, adapter_name(j), wl.rank, wl.seed + 1 + j, adapter_dtype, device)
                for j in range(wl.adapters)}
    progress("engine with adapters")
    t0 = time.perf_counter()
    llm = LLM(str(spec.model_dir), adapters=adapters, **spec.engine)
    startup = time.perf_counter() - t0
    dtype = str(llm.dtype).removeprefix("torch.")
    kernels = llm.ops.name
    graphs = llm.runner.graphs is not None
    passes = _passes(llm, spec, prompts, True, progress)
    del llm, adapters
    free_device(device)
    if spec.base_engine:
        progress("engine without adapters")
        llm = LLM(str(spec.model_dir), **spec.engine)
        passes += _passes(llm, spec, prompts, False, progress)
        del llm
        free_device(device)

    layers = mcfg.num_layers
    summaries = {p.label: summarize(p, copy_gbs, spec.peak_tflops, layers) for p in passes}
    report: dict[str, Any] = {
        "benchmark": "lorax bench throughput",
        "command": spec.command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": _versions(),
        "model": {
            "dir": str(spec.model_dir), "model_type": mcfg.model_type, "hidden": mcfg.hidden_size,
            "layers": layers, "full_layers": spec.full_layers or layers,
            "cut": spec.full_layers is not None and spec.full_layers != layers,
            "heads": mcfg.num_heads, "kv_heads": mcfg.num_kv_heads, "head_dim": mcfg.head_dim,
            "experts": mcfg.num_experts, "top_k": mcfg.top_k, "moe_intermediate": mcfg.moe_intermediate_size,
            "vocab": mcfg.vocab_size, "dtype": dtype,
        },
        "engine": {**spec.engine, "kernels": kernels, "cuda_graphs": graphs, "startup_s": startup},
        "workload": {"num_prompts": wl.num_prompts, "input_len": wl.input_len, "output_len": wl.output_len,
                     "adapters": wl.adapters, "rank": wl.rank, "seed": wl.seed},
        "copy_gbs": copy_gbs,
        "peak_tflops": spec.peak_tflops,
        "passes": summaries,
        "ratios": _ratios(summaries),
    }
    if spec.baseline == "hf":
        from lorax.inference.hf_baseline import run_hf_baseline

        progress("transformers + PEFT baseline")
        hf = run_hf_baseline(
            json.loads((spec.model_dir / "config.json").read_text()), prompts,
            [wl.adapter_of(i) for i in range(len(prompts))], wl.rank, wl.output_len,
            batch_size=spec.baseline_batch_size or int(spec.engine.get("max_num_seqs", 64)), device=device,
            dtype=getattr(torch, dtype), max_batches=spec.baseline_batches, seed=wl.seed, progress=progress,
        )
        report["baseline_hf"] = hf
        report["ratios"]["lora_over_hf_output_tok_s"] = summaries["lora"]["output_tok_per_s"] / hf["output_tok_per_s"]
    return report


def _ratios(s: dict[str, dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    lora = s["lora"]
    for other in ("base", "base_engine"):
        if other not in s:
            continue
        if "decode_step_ms" in lora and "decode_step_ms" in s[other]:
            out[f"decode_step_lora_over_{other}"] = lora["decode_step_ms"] / s[other]["decode_step_ms"]
        out[f"output_tok_s_lora_over_{other}"] = lora["output_tok_per_s"] / s[other]["output_tok_per_s"]
    return out


def _versions() -> dict[str, str]:
    import lorax

    out = {"python": platform.python_version(), "torch": torch.__version__, "lorax": lorax.__version__,
           "cuda": str(torch.version.cuda)}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "none"
    return out

