"""One exception family, so the CLI can turn every expected failure into a message, not a traceback."""

from __future__ import annotations


class LookalikeError(Exception):
    """A problem the user can fix; the message says what and how.

    `param` names the parameter at fault (as the Python API spells it, e.g. "data" or "weights"); the
    message never names a CLI flag, and the CLI shows the flag that sets that parameter.
    """

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


class BadImageError(LookalikeError):
    """A file that cannot be used as an image (corrupt, truncated, too large, not an image)."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(LookalikeError):
    """A configuration value that is not valid: in a file, a parameter or a flag (the CLI exits with 2, a usage error)."""


class InvalidInputError(LookalikeError, ValueError):
    """Data an estimator cannot fit or score; a ValueError too, as scikit-learn's contract expects."""
