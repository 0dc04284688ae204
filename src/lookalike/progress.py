"""Progress bars for long work: tqdm, shown only on a terminal and only while the user wants them.

Library code calls `tqdm(...)` from here instead of tqdm's own, so one switch (`enable`, which the CLI's
--no-progress and --quiet turn off) and one rule (no bars when stderr is a file or a pipe) hold everywhere.
"""

from __future__ import annotations

from tqdm import tqdm as _tqdm

_enabled = True


def enable(on: bool) -> None:
    """Show progress bars (on a terminal) or never."""
    global _enabled
    _enabled = on


def tqdm(*args, disable: bool = False, **kwargs):
    """tqdm's bar; `disable=None` leaves it to tqdm, which shows it only when stderr is a terminal."""
    return _tqdm(*args, disable=True if disable or not _enabled else None, **kwargs)


def write(line: str) -> None:
    """Print a line of its own above any progress bar (tqdm's `write`), e.g. what a long step is about to do."""
    _tqdm.write(line)


external_write_mode = _tqdm.external_write_mode
