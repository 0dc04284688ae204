"""One exception family, so the CLI can turn every expected failure into a message, not a traceback."""


class LookalikeError(Exception):
    """A problem the user can fix; the message says what and how."""


class BadImageError(LookalikeError):
    """A file that cannot be used as an image (corrupt, truncated, too large, not an image)."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(LookalikeError):
    """A configuration file or value that is not valid."""
