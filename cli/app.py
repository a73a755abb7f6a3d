"""The typer application every sub-command registers on (kept apart from `main` so that
`python -m lorax.cli.main` and the console script share one app)."""

from __future__ import annotations

import typer

from lorax import __version__

app = typer.Typer(
    name="lorax",
    help="Many LoRA adapters on Mixture-of-Experts LLMs: inspect, convert, and offline batch inference.\n\n"
    "Not affiliated with Predibase's LoRAX server.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorax {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool | None = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug
