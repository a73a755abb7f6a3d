"""`lorax bench throughput`: end-to-end offline throughput, with-LoRA vs base-only, optional HF baseline.

The model is the standard Qwen3-30B-A3B shape (default, written as a config.json on the fly), a recipe's
model, or a model directory. torch and the engine are imported only when the command runs.
"""

from __future__ import annotations

import json
import shlex
import tempfile
from pathlib import Path
from typing import Any

import typer

from lorax.cli.bench_cmd import bench_app
from lorax.errors import UsageError


def _positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")


@bench_app.command("throughput")
def throughput_command(
    recipe: str | None = typer.Option(None, "--recipe", help="Recipe name or file: its model and engine options."),
    model: str | None = typer.Option(None, "--model", help="Model directory (or Hub id) instead of a recipe."),
    standard: bool = typer.Option(False, "--standard",
                                  help="Qwen3-30B-A3B shape, dummy weights (the default without --recipe/--model)."),
    load_format: str | None = typer.Option(None, "--load-format", help="auto | safetensors | dummy "
                                           "(default: dummy for --standard, else the recipe's or auto)."),
    layers: int | None = typer.Option(None, "--layers", help="Cut the model to its first N layers (dummy weights "
                                      "only; e.g. 24 for the standard model on an 80 GB GPU)."),
    num_prompts: int = typer.Option(256, "--num-prompts"),
    input_len: int = typer.Option(512, "--input-len", help="Prompt tokens (random ids)."),
    output_len: int = typer.Option(256, "--output-len", help="Generated tokens per prompt (ignore_eos)."),
    adapters: int = typer.Option(8, "--adapters", help="Random adapters; prompt i uses adapter i % N."),
    rank: int = typer.Option(16, "--rank", help="LoRA rank on q/k/v/o and every expert's gate/up/down."),
    max_num_seqs: int | None = typer.Option(None, "--max-num-seqs", help="Decode batch (default: recipe or 64)."),
    max_num_batched_tokens: int | None = typer.Option(None, "--max-num-batched-tokens",
                                                      help="Prefill tokens per step (default: recipe or 8192)."),
    max_loras: int | None = typer.Option(None, "--max-loras", help="Adapter slots (default: --adapters)."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda (default: recipe or auto)."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto | bfloat16 | float16 | float32."),
    kernel_backend: str | None = typer.Option(None, "--kernel-backend", help="auto | torch | triton."),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="No CUDA graphs for decode."),
    base_engine: bool = typer.Option(True, "--base-engine/--no-base-engine",
                                     help="Also time an engine built without adapters."),
    baseline: str | None = typer.Option(None, "--baseline", help="hf: transformers + PEFT generate, same GPU."),
    baseline_batches: int | None = typer.Option(None, "--baseline-batches",
                                                help="Run only the first N HF sub-batches (default: all)."),
    baseline_batch_size: int | None = typer.Option(
        None, "--baseline-batch-size", help="HF sub-batch size (default: --max-num-seqs), e.g. 64 while lorax runs 256."
    ),
    copy_mb: int | None = typer.Option(None, "--copy-mb", help="Copy-bandwidth tensor size (default 2048 on CUDA)."),
    peak_tflops: float = typer.Option(788.0, "--peak-tflops", help="Dense bf16 peak (788 = H100 SXM, measured)."),
    seed: int = typer.Option(0, "--seed"),
    json_path: str | None = typer.Option(None, "--json", help="Also write the full report as JSON here."),
) -> None:
    """End-to-end throughput: requests/s, tokens/s, decode step time and HBM GB/s, prefill TFLOP/s."""
    _positive(num_prompts=num_prompts, input_len=input_len, output_len=output_len, adapters=adapters, rank=rank,
              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_loras=max_loras,
              layers=layers, baseline_batches=baseline_batches, copy_mb=copy_mb,
              baseline_batch_size=baseline_batch_size)
    if sum(x is not None and x is not False for x in (recipe, model, standard or None)) > 1:
        raise UsageError("give at most one of --recipe, --model, --standard")
    if baseline not in (None, "hf"):
        raise UsageError(f"--baseline: expected hf, got {baseline!r}")
    use_standard = recipe is None and model is None
    engine: dict[str, Any] = {}
    model_src = model
    if recipe is not None:
        from lorax.inference.recipe import load_recipe

        rec = load_recipe(recipe)
        engine, model_src = dict(rec.engine), rec.model
        if model_src is None:
            raise UsageError(f"recipe {recipe!r} names no model")
    if use_standard:
        engine.update(dtype="bfloat16", max_num_seqs=64, max_num_batched_tokens=8192)
    given = {"load_format": load_format or ("dummy" if use_standard else None), "max_num_seqs": max_num_seqs,
             "max_num_batched_tokens": max_num_batched_tokens, "device": device, "dtype": dtype,
             "kernel_backend": kernel_backend, "seed": seed}
    engine.update({k: v for k, v in given.items() if v is not None})
    if enforce_eager:
        engine["enforce_eager"] = True
    engine["max_loras"] = max_loras or adapters
    engine["max_lora_rank"] = max(rank, int(engine.get("max_lora_rank", rank)))  # a recipe's larger slots stay
    engine.setdefault("max_model_len", input_len + output_len)
    if layers is not None and engine.get("load_format") != "dummy":
        raise UsageError("--layers needs --load-format dummy (a cut model has no checkpoint to load)")

    import torch

    from lorax.inference.bench_inputs import STANDARD_MODEL, Workload, write_model_dir
    from lorax.inference.bench_throughput import BenchSpec, run_throughput

    if use_standard and engine.get("device", "auto") in ("auto", "cuda") and not torch.cuda.is_available():
        raise UsageError("the standard model needs a CUDA GPU; --model DIR --device cpu runs a smoke test")
    command = _command_line(recipe, model, layers, num_prompts, input_len, output_len, adapters, rank, engine,
                            base_engine, baseline, baseline_batches, baseline_batch_size)
    with tempfile.TemporaryDirectory(prefix="lorax-bench-") as tmp:
        full_layers = None
        if use_standard:
            model_dir = write_model_dir(STANDARD_MODEL, Path(tmp), layers)
            full_layers = int(STANDARD_MODEL["num_hidden_layers"])
        else:
            from lorax.inference.engine import resolve_model_dir

            assert model_src is not None
            model_dir = resolve_model_dir(model_src, engine.get("revision"))
            if layers is not None:
                config = json.loads((model_dir / "config.json").read_text())
                full_layers = int(config["num_hidden_layers"])
                model_dir = write_model_dir(config, Path(tmp), layers)
        spec = BenchSpec(
            model_dir=model_dir, engine=engine,
            workload=Workload(num_prompts, input_len, output_len, adapters, rank, seed),
            full_layers=full_layers, copy_bytes=copy_mb << 20 if copy_mb else None, base_engine=base_engine,
            baseline=baseline, baseline_batches=baseline_batches, baseline_batch_size=baseline_batch_size,
            peak_tflops=peak_tflops, command=command,
        )
        report = run_throughput(spec, progress=lambda m: typer.echo(f"  {m}", err=True))
    typer.echo(format_report(report))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        typer.echo(f"wrote {json_path}")


def _command_line(recipe: str | None, model: str | None, layers: int | None, num_prompts: int, input_len: int,
                  output_len: int, adapters: int, rank: int, engine: dict[str, Any], base_engine: bool,
                  baseline: str | None, baseline_batches: int | None,
                  baseline_batch_size: int | None = None) -> str:
    """The run as one reproducible command (every resolved engine option spelled out)."""
    argv = ["lorax", "bench", "throughput"]
    argv += ["--recipe", recipe] if recipe else ["--model", model] if model else ["--standard"]
    if layers is not None:
        argv += ["--layers", str(layers)]
    argv += ["--num-prompts", str(num_prompts), "--input-len", str(input_len), "--output-len", str(output_len),
             "--adapters", str(adapters), "--rank", str(rank)]
    flags = {"load_format": "--load-format", "max_num_seqs": "--max-num-seqs", "max_loras": "--max-loras",
             "max_num_batched_tokens": "--max-num-batched-tokens", "device": "--device", "dtype": "--dtype",
             "kernel_backend": "--kernel-backend", "seed": "--seed"}
    for key, flag in flags.items():
        if key in engine:
            argv += [flag, str(engine[key])]
    if engine.get("enforce_eager"):
        argv.append("--enforce-eager")
    if not base_engine:
        argv.append("--no-base-engine")
    if baseline:
        argv += ["--baseline", baseline]
    if baseline_batches:
        argv += ["--baseline-batches", str(baseline_batches)]
    if baseline_batch_size:
        argv += ["--baseline-batch-size", str(baseline_batch_size)]
    return shlex.join(argv)


def format_report(r: dict[str, Any]) -> str:
    """The report as a few lines of text and one table row per pass."""
    m, wl, eng = r["model"], r["workload"], r["engine"]
    cut = f" (CUT from {m['full_layers']} layers: per-layer figures below)" if m["cut"] else ""
    lines = [
        f"lorax bench throughput  {r['date']}  {r['device']}  torch {r['versions']['torch']}  "
        f"triton {r['versions']['triton']}",
        f"command: {r['command']}",
        f"model: {m['model_type']} hidden {m['hidden']}, {m['layers']} layers{cut}, {m['heads']}/{m['kv_heads']} heads "
        f"x {m['head_dim']}, {m['experts']} experts top-{m['top_k']} x {m['moe_intermediate']}, vocab {m['vocab']}, "
        f"{m['dtype']}",
        f"engine: {eng['kernels']} kernels, cuda graphs {'on' if eng['cuda_graphs'] else 'off'}, "
        f"max_num_seqs {eng.get('max_num_seqs', 64)}, start-up {eng['startup_s']:.1f} s",
        f"workload: {wl['num_prompts']} prompts x {wl['input_len']} in / {wl['output_len']} out (ignore_eos, greedy), "
        f"{wl['adapters']} adapters rank {wl['rank']} (q/k/v/o + every expert)",
        f"copy bandwidth: {r['copy_gbs']:.4g} GB/s (read + write, same run)",
        "",
        f"{'pass':<12} {'total s':>8} {'req/s':>8} {'in tok/s':>10} {'out tok/s':>10} {'decode B':>8} "
        f"{'step ms':>8} {'ms/layer':>8} {'GB/s':>7} {'%copy':>6} {'prefill TF/s':>12}",
    ]
    for s in r["passes"].values():
        dec = "decode_step_ms" in s
        lines.append(
            f"{s['label']:<12} {s['total_s']:>8.2f} {s['requests_per_s']:>8.2f} {s['input_tok_per_s']:>10.0f} "
            f"{s['output_tok_per_s']:>10.0f} {s.get('decode_batch', '-'):>8} "
            + (f"{s['decode_step_ms']:>8.2f} {s['decode_step_ms_per_layer']:>8.3f} {s['decode_hbm_gbs']:>7.0f} "
               f"{100 * s['decode_hbm_fraction_of_copy']:>5.0f}%" if dec else f"{'-':>8} {'-':>8} {'-':>7} {'-':>6}")
            + f" {s.get('prefill_tflops', float('nan')):>12.1f}"
        )
    lines.append("")
    lines += [f"{k}: {v:.3f}" for k, v in r["ratios"].items()]
    hf = r.get("baseline_hf")
    if hf:
        lines.append(
            f"transformers {hf['transformers']} + peft {hf['peft']}: {hf['output_tok_per_s']:.1f} out tok/s over "
            f"{hf['batches_run']}/{hf['batches_total']} sub-batches of <= {hf['batch_size']} (one adapter each), "
            f"{hf['total_s']:.1f} s"
        )
    return "\n".join(lines)
