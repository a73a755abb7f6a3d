"""`lorax batch-run`: offline generation over a JSONL file of prompts."""

from __future__ import annotations

import typer

from lorax.cli.app import app
from lorax.errors import LoraxError


@app.command("batch-run")
def batch_run_command(
    input_path: str = typer.Argument(..., help="JSONL file of requests."),
) -> None:
    """Generate for every line of a JSONL file, each line naming its adapter."""
    raise LoraxError("batch-run is being built (issue 6)")
