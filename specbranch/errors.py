"""User-facing errors.

Everything a user can get wrong (a missing file, a bad flag value, an incompatible model pair)
raises :class:`SpecBranchError` with a message that says what was wrong and how to fix it. The
CLI prints it on one line and exits with status 2; the server maps it to HTTP 400.
"""


class SpecBranchError(Exception):
    """A problem with the user's input or environment, with a fix in the message."""


class ConfigError(SpecBranchError, ValueError):
    """An invalid configuration value."""


class ModelError(SpecBranchError):
    """A model could not be found, assembled, converted or loaded."""


class WorkerError(SpecBranchError):
    """The draft worker of the parallel runtime failed; the generation could not go on with it."""


class WorkerDiedError(WorkerError):
    """The draft worker process exited (crashed or was killed)."""


class WorkerTimeoutError(WorkerError):
    """The draft worker stopped answering within the worker timeout (hung or far too slow)."""
