"""The tools' progress bars (prepare, export, average, perplexity): one constructor, `progress_bar`.

On a terminal it is tqdm's bar, redrawn in place. Written to a file or pipe (a Slurm log, `2> log`,
`| tee`), tqdm's in-place redraws are carriage returns: a log filled with thousands of `\\r`-joined
redraws on one line, a few a second. There the bar is instead a plain line (tqdm's text, ASCII) at
the start, at most one per LOG_INTERVAL_S after, and the final one at the end: how far the work got,
in a log that reads line by line.
"""

from __future__ import annotations

import re
import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # seconds between progress lines in a log

_CURSOR_MOVES = re.compile(r"\r|\x1b\[A")  # tqdm's redraw of a line and its moves between stacked bars


class _LogLines:
    """A text stream for tqdm that turns its redraws into whole lines: each non-blank text it writes,
    carriage returns and cursor moves removed and trailing padding stripped, becomes one line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        for line in _CURSOR_MOVES.sub("\n", text).split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable=None, *, disable: bool = False, **tqdm_options) -> tqdm:
    """A tqdm bar on stderr (`iterable` and `tqdm_options` as tqdm's: total, unit, desc, ...): redrawn in place on a
    terminal, occasional plain lines elsewhere (see the module's docstring)."""
    stream = sys.stderr  # looked up now: a caller (a test, a tool) may have replaced it
    if disable or _is_terminal(stream):
        return tqdm(iterable, disable=disable, file=stream, **tqdm_options)
    return tqdm(
        iterable,
        file=_LogLines(stream),
        mininterval=LOG_INTERVAL_S,
        maxinterval=LOG_INTERVAL_S,  # tqdm's monitor thread would redraw every 10 s otherwise
        ascii=True,
        ncols=80,
        **tqdm_options,
    )
