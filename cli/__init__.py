"""The `lorax` command: thin typer front ends over lorax.adapters and lorax.inference."""
