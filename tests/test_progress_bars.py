"""pretrain.progress_bars: tqdm's bar on a terminal, occasional plain lines in a log."""

from __future__ import annotations

import io
import sys

from pretrain import progress_bars


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_bounded_few_plain_lines_that_say_how_far(monkeypatch):
    """tqdm redrew its bar with carriage returns a few times a second into a log; now a line at the start
    and at the end of a quick loop, however many updates, and no carriage return or cursor move."""
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bars.progress_bar(total=50_000, unit="row", desc="work") as bar:
        for _ in range(50_000):
            bar.update()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text, repr(text)
    lines = text.splitlines()
    assert len(lines) == 2, lines  # the start and the end: LOG_INTERVAL_S (30 s) never passed
    assert lines[0].startswith("work:   0%") and "0/50000" in lines[0], lines
    assert lines[-1].startswith("work: 100%") and "50000/50000" in lines[-1], lines


def test_stacked_bars_in_a_log_stay_one_line_each(monkeypatch):
    """Two bars open at once (prepare's read and token bars): tqdm moves the cursor between their rows."""
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bars.progress_bar(total=3, desc="outer") as outer:
        with progress_bars.progress_bar(total=None, unit="tok", desc="inner") as inner:
            inner.update(7)
        outer.update(3)
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text, repr(text)
    assert [line.split(":")[0] for line in text.splitlines()] == ["outer", "inner", "inner", "outer"], text
    assert text.splitlines()[2].startswith("inner: 7tok "), text


def test_a_terminal_keeps_the_redrawn_bar(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    with progress_bars.progress_bar(total=4, desc="work", mininterval=0) as bar:
        for _ in range(4):
            bar.update()
    assert screen.getvalue().count("\r") >= 4  # redrawn in place, as tqdm does


def test_disabled_writes_nothing(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bars.progress_bar(total=4, desc="work", disable=True) as bar:
        bar.update(4)
    assert log.getvalue() == ""


def test_every_tool_makes_its_bars_through_the_helper():
    """A bar made with tqdm directly writes carriage returns into a log again. The benchmarks are run
    at a terminal and keep tqdm's own."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = [*root.glob("pretrain/**/*.py"), *root.glob("tools/*.py")]
    direct = [
        str(p.relative_to(root))
        for p in sources
        if "from tqdm import" in p.read_text()
        and p.name != "progress_bars.py"
        and not p.name.startswith("bench_")
        and "bench" not in p.relative_to(root).parts
    ]
    assert direct == [], f"{direct} make tqdm bars directly: use pretrain.progress_bars.progress_bar"
