"""`lorax batch-run`: offline generation over a JSONL file of prompts.

Thin glue: recipe + flags -> engine options, sampling defaults and job options -> LLM -> run_job.
Everything is logged on stderr; stdout stays free. Heavy imports happen inside the command.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from lorax.cli.app import app
from lorax.errors import UsageError

DEFAULT_RECIPE = "demo"


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _parse_adapters(values: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or []:
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise UsageError(f"--adapter expects NAME=SOURCE (a directory or Hub repo id), got {item!r}")
        out[name.strip()] = source.strip()
    return out


def default_output(input_path: Path) -> Path:
    """prompts.jsonl -> prompts.out.jsonl (next to the input)."""
    stem = input_path.name[: -len(".jsonl")] if input_path.name.endswith(".jsonl") else input_path.name
    return input_path.with_name(f"{stem}.out.jsonl")


def default_errors(output_path: Path) -> Path:
    """out/demo.jsonl -> out/demo.errors.jsonl (next to the output)."""
    stem = output_path.name[: -len(".jsonl")] if output_path.name.endswith(".jsonl") else output_path.name
    return output_path.with_name(f"{stem}.errors.jsonl")


def run_batch(
    input_path: str,
    output: str | None = None,
    errors: str | None = None,
    recipe: str | None = None,
    model: str | None = None,
    adapter: list[str] | None = None,
    engine_flags: dict[str, Any] | None = None,
    sampling_flags: dict[str, Any] | None = None,
    chat_template: str | None = None,
    served_model_names: list[str] | None = None,
    ordered: bool | None = None,
    retry_errors: bool | None = None,
    quiet: bool = False,
    engine_factory: Callable[..., Any] | None = None,
) -> int:
    """The whole command; returns the exit code. `engine_factory(model, adapters, **options)` replaces
    `lorax.inference.LLM` (tests use a fake engine through it)."""
    from lorax.inference.batch_job import JobConfig, check_paths, run_job
    from lorax.inference.chat import check_template, load_template_arg, template_from_dir
    from lorax.inference.recipe import Recipe, load_recipe

    if recipe is not None:
        rec = load_recipe(recipe)
    elif model is not None:
        rec = Recipe(source="<command line>")
    else:
        rec = load_recipe(DEFAULT_RECIPE)
        _log(f"no --model or --recipe: using the built-in '{DEFAULT_RECIPE}' recipe ({rec.source})", quiet)
    job_flags: dict[str, Any] = {"ordered": ordered, "retry_errors": retry_errors,
                                 "served_model_names": served_model_names or None}
    if chat_template is not None:
        job_flags["chat_template"] = load_template_arg(chat_template)
    rec = rec.with_overrides(model=model, adapters=_parse_adapters(adapter), engine=engine_flags,
                             sampling=sampling_flags, job=job_flags)
    if not rec.model:
        raise UsageError(f"no model: give --model or a recipe with a 'model' key ({rec.source} has none)")

    in_path = Path(input_path)
    out_path = Path(output) if output else default_output(in_path)
    err_path = Path(errors) if errors else Path(rec.job["errors"]) if "errors" in rec.job else default_errors(out_path)
    template = rec.job.get("chat_template")
    if template:
        check_template(template)
    adapter_templates = {name: t for name, src in rec.adapters.items() if (t := template_from_dir(src))}
    for t in adapter_templates.values():
        check_template(t)

    cfg = JobConfig(
        input_path=in_path, output_path=out_path, errors_path=err_path, sampling_defaults=dict(rec.sampling),
        chat_template=template, adapter_templates=adapter_templates,
        base_names=tuple(n for n in (rec.model, rec.name, *rec.job.get("served_model_names", ())) if n),
        ordered=bool(rec.job.get("ordered", False)), retry_errors=bool(rec.job.get("retry_errors", False)),
        fsync_interval_s=float(rec.job.get("fsync_interval_s", 5.0)), progress=not quiet,
        seed=int(rec.engine.get("seed", 0)),
    )
    check_paths(cfg)  # before minutes of model loading

    if engine_factory is None:
        from lorax.inference import LLM

        engine_factory = LLM
    _log(f"loading {rec.model} with {len(rec.adapters)} adapter(s): {', '.join(rec.adapters) or '-'}", quiet)
    engine = engine_factory(rec.model, adapters=dict(rec.adapters) or None, **rec.engine)
    max_seqs = rec.engine.get("max_num_seqs") or getattr(getattr(engine, "config", None), "max_num_seqs", None) or 256
    cfg.max_in_flight = int(rec.job.get("max_in_flight") or 4 * int(max_seqs))

    _log(f"{in_path} -> {out_path} (errors: {err_path})", quiet)
    summary = run_job(engine, cfg)
    if summary.truncated_bytes:
        _log(f"resume: cut {summary.truncated_bytes} bytes of a torn last line from an earlier run", quiet)
    _log(summary.line(), quiet)
    if summary.errors:
        _log(f"{summary.errors} line(s) failed: see {err_path}", quiet)
    return 128 + (summary.signal or 2) if summary.interrupted else 0  # 130 after Ctrl-C, 143 after SIGTERM


@app.command("batch-run")
def batch_run_command(
    input_path: str = typer.Argument(..., metavar="INPUT", help="JSONL file of requests (simple or OpenAI batch lines)."),
    output: str | None = typer.Option(None, "-o", "--output", help="Output JSONL (default: INPUT stem + .out.jsonl)."),
    errors: str | None = typer.Option(None, "--errors", help="Errors JSONL (default: OUTPUT stem + .errors.jsonl)."),
    recipe: str | None = typer.Option(None, "--recipe", help="Recipe YAML file or built-in name (e.g. demo)."),
    model: str | None = typer.Option(None, "--model", help="Base model directory or Hub repo id."),
    adapter: list[str] | None = typer.Option(None, "--adapter", help="NAME=SOURCE; repeat for more adapters."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda"),
    dtype: str | None = typer.Option(None, "--dtype", help="auto | float32 | bfloat16 | float16"),
    kernel_backend: str | None = typer.Option(None, "--kernel-backend", help="auto | torch | triton"),
    max_loras: int | None = typer.Option(None, "--max-loras", help="Adapter slots on the device."),
    max_lora_rank: int | None = typer.Option(None, "--max-lora-rank", help="Largest adapter rank."),
    max_num_seqs: int | None = typer.Option(None, "--max-num-seqs", help="Sequences per engine step."),
    max_model_len: int | None = typer.Option(None, "--max-model-len", help="Prompt + output token limit."),
    max_num_batched_tokens: int | None = typer.Option(None, "--max-num-batched-tokens", help="Tokens per step."),
    max_cpu_loras: int | None = typer.Option(None, "--max-cpu-loras", help="Adapters kept in host memory."),
    gpu_memory_utilization: float | None = typer.Option(
        None, "--gpu-memory-utilization", help="Fraction of GPU memory for weights, adapters and KV cache."
    ),
    enforce_eager: bool | None = typer.Option(None, "--enforce-eager/--no-enforce-eager", help="No CUDA graphs."),
    load_format: str | None = typer.Option(None, "--load-format", help="auto | safetensors | dummy"),
    seed: int | None = typer.Option(None, "--seed", help="Engine seed."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Default max_tokens for lines without one."),
    temperature: float | None = typer.Option(None, "--temperature", help="Default temperature (0 = greedy)."),
    chat_template: str | None = typer.Option(None, "--chat-template", help="Chat template file or Jinja string."),
    served_model_name: list[str] | None = typer.Option(
        None, "--served-model-name", help="Another name of the base model in OpenAI lines' body.model (repeatable)."
    ),
    ordered: bool | None = typer.Option(None, "--ordered/--no-ordered", help="Rewrite the output in input order at the end."),
    retry_errors: bool | None = typer.Option(None, "--retry-errors", help="Rerun lines that are in the errors file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary."),
) -> None:
    """Generate for every line of a JSONL file, each line naming its adapter; resumable.

    Lines are either {"id", "prompt" | "prompt_token_ids" | "messages", "adapter", "max_tokens", ...} or OpenAI batch requests {"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions", "body": {"model": ADAPTER-or-base, ...}}, mixed freely.

    Each line ends in exactly one of OUTPUT and the errors file; running the same command again resumes.
    """
    code = run_batch(
        input_path, output=output, errors=errors, recipe=recipe, model=model, adapter=adapter,
        engine_flags={"device": device, "dtype": dtype, "kernel_backend": kernel_backend, "max_loras": max_loras,
                      "max_lora_rank": max_lora_rank, "max_num_seqs": max_num_seqs, "max_model_len": max_model_len,
                      "enforce_eager": enforce_eager, "load_format": load_format, "seed": seed,
                      "max_num_batched_tokens": max_num_batched_tokens, "max_cpu_loras": max_cpu_loras,
                      "gpu_memory_utilization": gpu_memory_utilization},
        sampling_flags={"max_tokens": max_tokens, "temperature": temperature},
        chat_template=chat_template, served_model_names=served_model_name, ordered=ordered, retry_errors=retry_errors, quiet=quiet,
    )
    if code:
        raise typer.Exit(code)
