"""Errors every layer may raise; the CLI turns them into one clear line and an exit code."""

from __future__ import annotations


class LoraxError(Exception):
    """A problem with the user's input or environment, worth one clear line (no traceback)."""

    exit_code = 1


class UsageError(LoraxError):
    """The command was called wrongly (bad flag combination, missing file)."""

    exit_code = 2


class AdapterError(LoraxError):
    """An adapter file or config that lorax cannot use as it is."""


class ConfigError(LoraxError):
    """A recipe, engine option or model config.json that is invalid."""
