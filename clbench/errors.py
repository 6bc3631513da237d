"""Errors a user can fix. Each message names the problem and the fix; the command line prints it
as one line (no traceback) and exits with status 2. Every layer raises these; one base class,
``UserError``, lets the command line and the sweep catch them all."""
from __future__ import annotations

import difflib
from typing import Collection


class UserError(Exception):
    """A problem in the user's input or environment, with a message that says how to fix it.

    Raised in a DataLoader worker, it reaches the main process re-created by torch with a message
    of torch's (``Caught DataError in DataLoader worker process 0. Original Traceback ...``);
    the message is then the original one again, so an error reads the same with any number of
    workers."""

    def __init__(self, *args: object):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_original_message(args[0], type(self)),)
        super().__init__(*args)


_WORKER_WRAPPER = "in DataLoader worker process"


def _original_message(message: str, cls: type) -> str:
    """The message of the exception ``cls`` that a DataLoader worker raised, out of the text
    torch re-raises it with (the worker's traceback, its last line ``module.Class: message``);
    any other message as it is."""
    if not message.startswith("Caught ") or _WORKER_WRAPPER not in message.split("\n", 1)[0]:
        return message
    marker = f"\n{cls.__module__}.{cls.__qualname__}: "
    at = message.rfind(marker)
    return message[at + len(marker):].strip() if at >= 0 else message


class RunFailed(Exception):
    """A run that cannot go on, for a reason its message states in full (its training diverged):
    the sweep records the run failed with this message, not a traceback, and goes on with its
    other runs."""


class DivergenceError(RunFailed):
    """A non-finite training loss or parameter: the run stops (``train.on_divergence=stop``)."""


class ConfigError(UserError, ValueError):
    """A configuration problem: an unknown key, a value of the wrong type, a bad recipe."""


class DataError(UserError, RuntimeError):
    """Data missing or malformed; the message names the expected layout and the fix."""


class PretrainedWeightsError(UserError, RuntimeError):
    """Pretrained weights that cannot be found or loaded; the message names both ways to give them."""


class CorruptFileError(UserError):
    """A file the harness wrote that does not read back (truncated, bit-flipped, not its format)."""

    def __init__(self, path: object, why: str):
        self.path, self.why = path, why
        super().__init__(f"{path} is corrupt ({why})")


class DiskFullError(UserError, OSError):
    """No space left (or quota exceeded) while writing a file; nothing was left half-written."""


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
