"""`lorax inspect`: read an adapter, report what it holds, check it against a base model."""

from __future__ import annotations

import json

import typer

from lorax.cli.app import app


@app.command("inspect")
def inspect_command(
    source: str = typer.Argument(..., help="Adapter directory, file, or Hugging Face repo id."),
    base: str | None = typer.Option(None, "--base", help="Base model dir or repo (config.json) to check against."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    b_packing: str | None = typer.Option(
        None, "--b-packing", help="Fused expert B column order: rank-major (PEFT, default) or expert-major."
    ),
) -> None:
    """Read an adapter, detect its layout, and check it against a base model.

    Exit code 0 when the adapter is usable, 1 when any error was found, 2 on a usage error.
    """
    from lorax.adapters.inspect import format_report, inspect_adapter

    info = inspect_adapter(source, base, revision=revision, b_packing=b_packing)
    typer.echo(json.dumps(info, indent=2, sort_keys=True) if as_json else format_report(info))
    if info["errors"]:
        raise typer.Exit(1)
