"""Errors a user can fix. Each message names the problem and the fix; the command line prints it
as one line (no traceback) and exits with status 2. Every layer raises these; one base class,
``UserError``, lets the command line and the sweep catch them all."""
from __future__ import annotations

import difflib
from typing import Collection


class UserError(Exception):
    """A problem in the user's input or environment, with a message that says how to fix it."""


class ConfigError(UserError, ValueError):
    """A configuration problem: an unknown key, a value of the wrong type, a bad recipe."""


class DataError(UserError, RuntimeError):
    """Data missing or malformed; the message names the expected layout and the fix."""


class PretrainedWeightsError(UserError, RuntimeError):
    """Pretrained weights that cannot be found or loaded; the message names both ways to give them."""


class PlanError(UserError):
    """Everything wrong with a sweep's plan, found before any run starts: one message, one line
    per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"the plan has {count}; nothing was run:\n" + "\n".join(f"  - {p}" for p in problems))


def did_you_mean(name: str, choices: Collection[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
