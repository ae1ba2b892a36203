"""Exceptions for mistakes a user can fix; the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's config, data or environment, with a message that says the fix."""


class ConfigError(UserError):
    """One or more invalid config values, all collected before any weights load."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


class ModelLoadError(UserError):
    """The model or tokenizer could not be found locally or fetched."""


class DataError(UserError):
    """The dataset could not be found, read or split into preference pairs."""
