"""`lorax verify`: each adapter through eager kernels, CUDA-graph replay and a merged-weight torch
reference; prints the largest logprob difference and the first diverging token per adapter."""

from __future__ import annotations

import json
from typing import Any

import typer

from lorax.cli.app import app
from lorax.errors import UsageError


@app.command("verify")
def verify_command(
    model: str | None = typer.Option(None, "--model", help="Model dir or repo id (default: the demo model)."),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=SOURCE, repeatable (default: the demo's)."),
    recipe: str | None = typer.Option(None, "--recipe", help="Take model, adapters and engine options from a recipe."),
    prompt: list[str] = typer.Option([], "--prompt", help="Probe prompt, repeatable (default: the recipe's probes, else a few built-ins)."),
    max_tokens: int = typer.Option(16, "--max-tokens", help="Tokens generated per probe."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto, float32, bfloat16 or float16."),
    kernel_backend: str | None = typer.Option(None, "--kernel-backend", help="auto, torch or triton."),
    load_format: str | None = typer.Option(None, "--load-format", help="auto, safetensors or dummy."),
    tolerance: float | None = typer.Option(
        None, "--tolerance", help="Max |logprob| difference (default 1e-3 in fp32, 1.0 in 16-bit)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check every adapter: eager vs CUDA-graph replay vs the pure-torch reference with the adapter
    merged into the weights. Exits 1 when a difference passes the tolerance."""
    from lorax.adapters import load_adapter
    from lorax.inference.engine import LLM
    from lorax.inference.recipe import load_recipe
    from lorax.inference.verify import DEFAULT_PROBES, format_report, verify

    if max_tokens < 1:
        raise UsageError("--max-tokens must be >= 1")
    sources: dict[str, str] = {}
    for item in adapter:
        name, sep, src = item.partition("=")
        if not sep or not name or not src:
            raise UsageError(f"--adapter expects NAME=SOURCE, got {item!r}")
        sources[name] = src
    engine: dict[str, Any] = {}
    recipe_probes: list[str] = []
    if recipe is not None or model is None:
        rec = load_recipe(recipe or "demo")
        model = model or rec.model
        if not sources:
            sources = dict(rec.adapters)
        engine.update(rec.engine)
        recipe_probes = rec.probes
    if model is None:
        raise UsageError("no model: give --model or a recipe that names one")
    for key, value in (("device", device), ("dtype", dtype), ("kernel_backend", kernel_backend),
                       ("load_format", load_format)):
        if value is not None:
            engine[key] = value
    adapters = {name: load_adapter(src, name=name) for name, src in sources.items()}
    if adapters:  # the slab must hold the largest adapter asked for
        engine["max_lora_rank"] = max([int(engine.get("max_lora_rank", 16))] + [a.rank for a in adapters.values()])
    llm = LLM(model, adapters=dict(adapters), **engine)
    texts = prompt or recipe_probes or list(DEFAULT_PROBES)
    try:
        tok = llm.tokenizer
        prompts = [tok.encode(t) for t in texts]
    except Exception:  # a model without a tokenizer: fixed token ids stand in for text probes
        prompts = [[(7 * i + j) % max(2, llm.model_config.vocab_size) for j in range(8)] for i in range(len(texts))]
    report = verify(llm, adapters, prompts, max_tokens=max_tokens, tolerance=tolerance)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    if not report.ok:
        raise typer.Exit(1)
