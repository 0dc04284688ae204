"""What every command prints through: stdout for results, stderr for the library's log and errors.

Lines are never wrapped when the stream is a file or a pipe, and the library's `lookalike` logger
is shown here (warnings in yellow), so library code never prints.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import LookalikeError
from ..progress import external_write_mode
from ..results import MatchOut, QueryOut, SearchOut, format_distance, format_probability

#: Exit codes: 0 success, 1 a runtime failure, 2 a usage error (a bad flag, argument or config value),
#: 3 a partial success (some inputs failed; the command's report lists them).
EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL = 1, 2, 3

# into a file or a pipe, tables take the width their cells need (whole paths), not a terminal's 80 columns
out = Console(highlight=False, soft_wrap=not sys.stdout.isatty(), width=None if sys.stdout.isatty() else 100_000)
err = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())

#: The flag that sets each library parameter a LookalikeError may name (`param`).
PARAM_FLAGS = {
    "data": "--data", "out": "--out", "run_dir": "--out", "weights": "--weights", "backbone": "--backbone", "config": "--config",
    "directory": "DIRECTORY", "gallery": "--gallery", "attributes": "--attributes", "key": "BING_SEARCH_KEY (or --list-queries)",
    "model": "--model", "k": "--top", "kind": "--kind", "overwrite": "--overwrite", "images": "--images",
    "shard_size": "--shard-size", "address": "--address", "executor": "--executor", "index": "--index", "attribute": "--attribute", "distance": "--distance",
}


class ConsoleLog(logging.Handler):
    """The library's log on stderr: warnings in yellow, errors in red."""

    STYLES = {logging.WARNING: "yellow", logging.ERROR: "red"}

    def emit(self, record: logging.LogRecord) -> None:
        with external_write_mode():  # a line of its own, never glued onto a progress bar
            err.print(escape(self.format(record)), style=self.STYLES.get(record.levelno))


def attach_log(level: int = logging.INFO) -> None:
    """Show the `lookalike` logger at `level` on stderr (once)."""
    logger = logging.getLogger("lookalike")
    if not any(isinstance(h, ConsoleLog) for h in logger.handlers):
        logger.addHandler(ConsoleLog())
    logger.setLevel(level)
    logger.propagate = False


def error_message(e: LookalikeError) -> str:
    """The error as the CLI shows it: prefixed with the flag that sets the parameter at fault, when it names one."""
    flag = PARAM_FLAGS.get(getattr(e, "param", None) or "")
    return f"{flag}: {e}" if flag else str(e)


def search_answer(path: Path, own: int | None, matches, took_ms: float, attribute: str | None = None, min_probability: float | None = None) -> SearchOut:
    """One query's answer in the shape of REST /search (`lookalike.results`), with the query's and the matches' paths."""
    from PIL import Image

    with Image.open(path) as img:
        width, height, fmt = img.width, img.height, img.format or None  # as the service names it (PIL: "JPEG", "PNG")
    return SearchOut(
        query=QueryOut(width=width, height=height, format=fmt, id=own, path=str(path)),
        attribute=attribute,
        min_probability=min_probability,
        results=[MatchOut.from_match(m.to_dict(), with_path=True) for m in matches],
        took_ms=took_ms,
    )


def print_matches(title: str, matches) -> None:
    """A search's matches as the table every command shows: rank, distance, P(same), attribute, path."""
    table = Table(title=escape(title))
    for col in ("#", "distance", "P(same)", "attribute", "path"):
        table.add_column(col, justify="right" if col in ("#", "distance", "P(same)") else "left")
    for rank, m in enumerate(matches, 1):
        table.add_row(str(rank), format_distance(m.distance), format_probability(m.probability), escape(m.attribute or ""), escape(m.path))
    out.print(table)
