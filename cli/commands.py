"""Imports every sub-command module so that each registers itself on `lorax.cli.main.app`."""

from lorax.cli import batch_cmd, bench_cmd, bench_throughput_cmd, convert_cmd, inspect_cmd, verify_cmd  # noqa: F401
