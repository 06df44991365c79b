"""The one exception type meant for the user, and the documented exit codes."""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_FAILED_CHUNKS = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class FastmayaError(Exception):
    """An error the user can act on: printed as one line by the CLI, never as a traceback.

    `problem` names what went wrong, `fix` says what to do about it.
    """

    exit_code = EXIT_RUNTIME

    def __init__(self, problem: str, fix: str = "", *, exit_code: int | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.problem} {self.fix}".strip()


class InputError(FastmayaError):
    """Bad input or bad usage: exit code 2."""

    exit_code = EXIT_USAGE


class RuntimeFailure(FastmayaError):
    """A failure while rendering (model loading, engine, output): exit code 1."""

    exit_code = EXIT_RUNTIME
