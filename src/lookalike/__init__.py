"""lookalike: train, evaluate and serve image similarity rankers on your own photos."""

from .errors import BadImageError, ConfigError, LookalikeError

__version__ = "0.1.0"

__all__ = ["BadImageError", "ConfigError", "LookalikeError", "__version__"]
