"""`lorax bench`: measured speed. `kernels` times every Triton kernel against its reference and the
HBM roofline (issue 7/9); `throughput` (end to end) is registered on the same sub-app by its own module.
"""

from __future__ import annotations

import json
import os

import typer

from lorax.cli.app import app
from lorax.errors import UsageError

bench_app = typer.Typer(help="Measure speed: kernels against the roofline, end-to-end throughput.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

_GROUPS = ("moe", "qkv", "attention", "layer")  # == lorax.kernels.bench.KERNEL_GROUPS (not imported: it loads triton)


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--{what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"--{what}: expected positive integers, got {text!r}")
    return values


@bench_app.command("kernels")
def kernels_command(
    tokens: str = typer.Option("1,8,32,128,512,2048", "--tokens", help="Token counts, comma-separated."),
    adapters: int = typer.Option(4, "--adapters", help="Adapter slots; tokens are spread evenly over them."),
    rank: int = typer.Option(16, "--rank", help="LoRA rank of every adapter."),
    kernels: str = typer.Option(",".join(_GROUPS), "--kernels", help="Kernel groups: moe, qkv, attention, layer (norms, rope + KV store, router top-k)."),
    json_path: str | None = typer.Option(None, "--json", help="Also write the full report as JSON here."),
    device: str = typer.Option("cuda", "--device", help="cuda, or cpu for an interpreter smoke run."),
    workload: str = typer.Option("standard", "--workload",
                                 help="standard (Qwen3-30B-A3B layer shapes) or tiny (smoke test)."),
    peak_tflops: float = typer.Option(788.0, "--peak-tflops",
                                      help="Dense bf16 peak of the GPU (788 = H100 SXM, measured)."),
) -> None:
    """Time each kernel (ours vs reference vs HBM roofline) on the standard workload."""
    import dataclasses

    import torch

    from lorax.errors import LoraxError

    toks = _int_list(tokens, "tokens")
    groups = tuple(g.strip() for g in kernels.split(",") if g.strip())
    bad = [g for g in groups if g not in _GROUPS]
    if bad or not groups:
        raise UsageError(f"--kernels: unknown group(s) {bad or kernels!r}; choose from {', '.join(_GROUPS)}")
    if workload not in ("standard", "tiny"):
        raise UsageError(f"--workload: expected standard or tiny, got {workload!r}")
    if adapters < 1 or rank < 1:
        raise UsageError("--adapters and --rank must be positive")
    if device not in ("cuda", "cpu"):
        raise UsageError(f"--device: expected cuda or cpu, got {device!r}")
    if device == "cpu" and workload != "tiny":
        raise UsageError("--device cpu runs only --workload tiny (the interpreter is far too slow for layer shapes)")
    if device == "cuda" and not torch.cuda.is_available():
        raise LoraxError("bench kernels needs a CUDA GPU (none visible); "
                         "`--device cpu --workload tiny` runs a smoke test in the Triton interpreter")
    if device == "cpu":
        # Triton reads this when the kernels are decorated, i.e. before lorax.kernels.* is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from lorax.kernels import bench  # imports triton and the kernels: keep `lorax --help` fast

    wl = bench.STANDARD if workload == "standard" else bench.TINY
    wl = dataclasses.replace(wl, adapters=adapters, rank=rank)
    report = bench.run_kernels(wl, toks, groups, device=device, peak_tflops=peak_tflops,
                               progress=lambda m: typer.echo(f"  {m}", err=True))
    typer.echo(bench.format_table(report))
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report.to_json(), f, indent=1)
        typer.echo(f"wrote {json_path}")
