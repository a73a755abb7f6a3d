"""`lorax convert`: legacy .bin/.pt to safetensors without pickle, and MoE layout conversion."""

from __future__ import annotations

import typer

from lorax.cli.app import app
from lorax.errors import LoraxError


@app.command("convert")
def convert_command(
    source: str = typer.Argument(..., help="Adapter directory or file to read."),
    dest: str = typer.Argument(..., help="Directory to write (safetensors + adapter_config.json)."),
) -> None:
    """Convert an adapter to safetensors and/or another MoE layout, then validate it."""
    raise LoraxError("convert is being built (issue 3)")
