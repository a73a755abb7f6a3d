"""`lorax convert`: legacy .bin/.pt to safetensors without pickle, and MoE layout conversion."""

from __future__ import annotations

import typer

from lorax.cli.app import app


@app.command("convert")
def convert_command(
    source: str = typer.Argument(..., help="Adapter directory or file to read."),
    dest: str = typer.Argument(..., help="Directory to write (safetensors + adapter_config.json)."),
    to: str | None = typer.Option(
        None, "--to", help="Layout: peft | per-expert | fused | shared-outer (default: keep the source's)."
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: keep)."),
    b_packing: str | None = typer.Option(
        None, "--b-packing", help="Fused expert B column order of the source: rank-major (PEFT) or expert-major."
    ),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision of SOURCE."),
    force: bool = typer.Option(False, "--force", help="Replace an existing adapter in DEST."),
) -> None:
    """Convert an adapter to safetensors and/or another MoE layout, then validate it.

    Never executes pickle: .bin/.pt files are read by walking their opcodes.

    The output is written atomically, re-read and compared bit for bit with the source.
    """
    from lorax.adapters.convert import convert_adapter
    from lorax.adapters.inspect import inspect_adapter

    out = convert_adapter(source, dest, to, dtype=dtype, b_packing=b_packing, revision=revision, overwrite=force)
    info = inspect_adapter(str(out))
    typer.echo(f"wrote {out} ({info['moe_format']}, rank {info['rank']}, {info['num_params']:,} parameters, "
               f"{info['num_bytes']:,} bytes); verified bit-exact against the source")
    for w in info["warnings"]:
        typer.echo(f"warning: {w}")
    if info["errors"]:
        for e in info["errors"]:
            typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
