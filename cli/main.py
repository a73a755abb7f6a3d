"""Entry point of the `lorax` command.

Every sub-command lives in its own module and imports torch (and everything heavy) lazily, so that
`lorax --help` and `lorax --version` stay fast. Errors derived from `lorax.errors.LoraxError` print one
line on stderr and exit with the error's code; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys

import typer

from lorax.cli.app import _state, app
from lorax.errors import LoraxError


def _register() -> None:
    # Each module adds its command(s) to `app`; importing them must stay cheap (no torch at import).
    from lorax.cli import commands  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    _register()
    try:
        # Outside standalone mode click returns the code of a `typer.Exit(code)` instead of raising it.
        rc = app(args=argv, standalone_mode=False)
    except LoraxError as err:
        if _state["debug"]:
            raise
        typer.echo(f"error: {err}", err=True)
        return err.exit_code
    except typer.Exit as ex:
        return ex.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as err:  # click usage errors and the like
        import click

        # typer >= 0.27 vendors click (typer._click): its usage errors derive from typer.TyperException.
        if isinstance(err, click.exceptions.ClickException) or (
            isinstance(err, typer.TyperException) and hasattr(err, "show") and hasattr(err, "exit_code")
        ):
            err.show()
            return err.exit_code
        if isinstance(err, click.exceptions.Exit):
            return err.exit_code
        if _state["debug"]:
            raise
        typer.echo(f"error: {type(err).__name__}: {err} (run with --debug for the traceback)", err=True)
        return 1
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
