"""Errors that mean "the user's input is wrong": the CLI prints them and exits with code 2."""

from __future__ import annotations


class EmguardError(Exception):
    """A problem the user can fix (bad config, bad data, missing model). Exit code 2."""


class ConfigError(EmguardError):
    """The run configuration is invalid; the message names every bad key."""


class DataError(EmguardError):
    """Training or evaluation data is invalid.

    Attributes:
        problems: One ``FILE:LINE: message`` string per problem, in file order.
        total: How many problems were found (``problems`` may be capped).
    """

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = list(problems)
        self.total = len(problems) if total is None else total
        lines = list(self.problems)
        if self.total > len(self.problems):
            lines.append(f"... and {self.total - len(self.problems)} more problems (not shown)")
        super().__init__("\n".join(lines))
