"""`lorax inspect`: read an adapter, report what it holds, check it against a base model."""

from __future__ import annotations

import typer

from lorax.cli.app import app
from lorax.errors import LoraxError


@app.command("inspect")
def inspect_command(
    source: str = typer.Argument(..., help="Adapter directory, file, or Hugging Face repo id."),
    base: str | None = typer.Option(None, "--base", help="Base model dir or repo (config.json) to check against."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Read an adapter, detect its layout, and check it against a base model."""
    raise LoraxError("inspect is being built (issue 3)")
