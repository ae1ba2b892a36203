"""Exceptions for mistakes a user can fix; the CLI prints them as one line, without a traceback."""

from __future__ import annotations

# Exit codes (README, "When a run stops"): 0 finished; 1 a bug (with its traceback);
# 2 a user error (config, data, model, disk, launch); 3 stopped by the non-finite guard;
# 75 interrupted by a signal after saving a checkpoint: resumable (EX_TEMPFAIL: "try again").
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 75


class UserError(Exception):
    """A problem with the user's config, data or environment, with a message that says the fix."""

    exit_code = EXIT_USER_ERROR


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


class Interrupted(UserError):
    """SIGTERM, SIGINT or SIGUSR1 stopped the run after it saved a checkpoint: resumable."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum  # the signal that stopped the run (SIGUSR1 under SLURM requeues the job)


class NonFiniteError(UserError):
    """Too many consecutive non-finite steps: the run stopped with its last good state saved."""

    exit_code = EXIT_NONFINITE


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line
    warnings and errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
