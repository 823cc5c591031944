"""argparse types shared by the command-line tools (tools/*.py): bad input is refused when the
arguments are parsed, with the option and the value named, before any work starts. Also how a tool
prints (warnings as one line; an output whose reader stopped early, `| head`, ends quietly) and meets
a stop signal."""

from __future__ import annotations

import argparse
import functools
import math
import os
import select
import signal
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pretrain.files import file_in_the_way
from pretrain.slurm import STOP_SIGNALS
from pretrain.words import counted


def help_description(doc: str) -> str:
    """A tool's --help description: the first paragraph of its docstring on one line (its first line
    alone cut a sentence that runs on, as bench_attention's 'SDPA with the dense')."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def int_at_least(lowest: int, note: str = ""):
    """argparse type: an integer >= `lowest`; `note` (e.g. "0 = off") closes each message."""
    suffix = f" ({note})" if note else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an integer; give an integer >= {lowest}{suffix}"
            ) from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{text} must be an integer >= {lowest}{suffix}")
        return value

    return parse


positive_int = int_at_least(1)


def positive_number(note: str = "", what: str = "number"):
    """argparse type: a finite float > 0 (nan, inf and 0 refused); `what` names it in the
    messages ("number of seconds"), `note` (e.g. "1.0 = off") closes each."""
    return _finite_number(0.0, True, note, what)


def non_negative_number(note: str = "", what: str = "number"):
    """argparse type: a finite float >= 0 (nan, inf and negatives refused), for an option whose
    0 means something (`note`, e.g. "0 = off", says what); `what` as in `positive_number`."""
    return _finite_number(0.0, False, note, what)


def fraction(note: str = "", what: str = "number"):
    """argparse type: a float in (0, 1] (0, negatives, > 1 and nan refused), e.g. a probability
    mass; `note` (e.g. "1 = off") closes each message, `what` as in `positive_number`."""
    return _finite_number(0.0, True, note, what, highest=1.0)


def _finite_number(lowest: float, strict: bool, note: str, what: str, highest: float | None = None):
    suffix = f" ({note})" if note else ""
    bound = f"{'>' if strict else '>='} {lowest:g}"
    if highest is not None:
        bound = f"in ({lowest:g}, {highest:g}]" if strict else f"in [{lowest:g}, {highest:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a {what} {bound}{suffix}") from None
        in_range = value > lowest if strict else value >= lowest
        if not (math.isfinite(value) and in_range and (highest is None or value <= highest)):
            finite = "" if highest is not None else "finite "  # a bounded range says it already
            raise argparse.ArgumentTypeError(f"{text} must be a {finite}{what} {bound}{suffix}")
        return value

    return parse


def add_corpus_reading_options(parser: argparse.ArgumentParser, files: str = "--input") -> None:
    """--format and --text-field: how the corpus files named by `files` are read (the tools that read
    a corpus take the same two options, with the same choices and defaults)."""
    from pretrain.data.file_formats import FORMATS

    parser.add_argument(
        "--format", default="auto", choices=FORMATS, help=f"how {files} files are read (auto: from the suffix)"
    )
    parser.add_argument("--text-field", default="text", help="JSONL field or Parquet column holding the document")


def refuse_one_file_for_two_outputs(parser: argparse.ArgumentParser, **outputs: str | Path | None) -> None:
    """parser.error when two of the `outputs` (option name -> file, None = not written) name one
    file: the later write would replace the earlier (a JSON over the plot), after all the work."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        key = Path(path).resolve()
        if key in seen:
            parser.error(
                f"{seen[key]} and {option} both name {path}: the one written last would replace the "
                "other; give them different files"
            )
        seen[key] = option


def _refuse_a_file_in_the_way(text: str) -> None:
    """ArgumentTypeError for an output path through a file (`notes.txt/loss.json`): missing parent
    folders are made when the result is written, a file on the way cannot be (a FileExistsError
    after all the work)."""
    blocker = file_in_the_way(text)
    if blocker is not None:
        raise argparse.ArgumentTypeError(
            f"{text}: {blocker} is a file, not a folder, so nothing can be written under it; name a path "
            "under a folder (missing folders are made)"
        )


def output_file(example: str):
    """argparse type for a file to write: an existing folder is refused, `example` inside it given
    as the fix (the atomic write's final rename would fail only after all the work), and so is a path
    through a file. Missing parent folders are fine: the write makes them."""

    def check(text: str) -> str:
        if Path(text).is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder: name the file to write, e.g. {Path(text) / example}")
        _refuse_a_file_in_the_way(text)
        return text

    return check


def image_file(example: str):
    """argparse type for an image to write (pretrain.files.save_figure): `output_file`, and a suffix
    matplotlib writes (none means PNG); matplotlib would refuse another only at the save, after the
    work that made the figure. A PNG (the usual name) is checked without importing matplotlib, which
    took most of a tool's refusal time (0.27 of slot_report's 0.38 s)."""
    check_file = output_file(example)

    def check(text: str) -> str:
        suffix = Path(text).suffix[1:].lower()
        if suffix in ("", "png"):
            return check_file(text)
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = FigureCanvasBase.get_supported_filetypes()
        if suffix not in kinds:
            raise argparse.ArgumentTypeError(
                f"{text}: matplotlib cannot write a .{suffix} image; name a .png (or {', '.join(sorted(kinds))}) file"
            )
        return check_file(text)

    return check


def output_folder(text: str) -> str:
    """argparse type for a folder to write into: an existing file is refused (making the folder
    would fail with a bare FileExistsError, possibly after minutes of work), and so is a path through
    a file. Missing parent folders are fine: the write makes them."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder: name a folder to write the results into")
    _refuse_a_file_in_the_way(text)
    return text


def torch_device(text: str) -> str:
    """argparse type for --device: cpu, or cuda / cuda:N on a machine that has that GPU; refused at
    the parse (torch refused a misspelt name, and CUDA lacking, only after the model loaded)."""
    if text == "cpu":  # the tools' default, which argparse passes through here too: no torch needed
        return text
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give cpu, or cuda (cuda:N for GPU N)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: the tools run on cpu or cuda (cuda:N for GPU N)")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device torch can use: give cpu")
        if parsed.index is not None and parsed.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {counted(count, 'CUDA device')}: give cuda:0"
                + (f" to cuda:{count - 1}" if count > 1 else "")
            )
    return "cpu" if parsed.type == "cpu" else text  # safetensors refuses "cpu:0"


# The folders whose warnings are the project's own (tools/ is installed as memlayers_tools).
_OWN_FOLDERS = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), name) + os.sep
    for name in ("pretrain", "kernels", "tools", "memlayers_tools")
)


@contextmanager
def plain_warnings() -> Iterator[None]:
    """Within it, the project's own warnings (UserWarning raised in pretrain/, kernels/ or tools/) print as
    `warning: <message>`. Python's own format names the module and line that warned and repeats that line of
    code (`.../pretrain/data/input_files.py:137: UserWarning: --input /usr/share/doc: ...`, then
    `  _warn_of_linked_folders(linked_folders, arg, option, p)`), which tell a user of a tool nothing. Any
    other warning keeps that format: its category and origin say what it is (`FutureWarning` from pyarrow,
    numpy's `RuntimeWarning: divide by zero`, which names the project's line that divided). Only the printed
    form changes: a warning is raised, filtered and recorded (pytest.warns) as before."""
    before = warnings.formatwarning

    def formatted(message, category, filename, lineno, line=None) -> str:
        if category is UserWarning and os.path.realpath(filename).startswith(_OWN_FOLDERS):
            return f"warning: {message}\n"
        return before(message, category, filename, lineno, line)

    warnings.formatwarning = formatted
    try:
        yield
    finally:
        warnings.formatwarning = before


class StoppedBySignal(SystemExit):
    """A stop signal ended the tool (raised in the main thread by `stop_signals_exit`'s handler)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def _ignore_further_stops() -> None:
    # the next one (Slurm's SIGTERM after its USR1, a second scancel, a Ctrl-C on top) must not raise
    # again inside the cleanup this one starts: it ended the removal of the temporary there
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _raise_stopped(signum, frame):
    _ignore_further_stops()
    raise StoppedBySignal(signum)


def _raise_interrupted(signum, frame):
    _ignore_further_stops()
    raise KeyboardInterrupt


@contextmanager
def stop_signals_exit() -> Iterator[None]:
    """Within it, SIGTERM (kill, scancel, a Slurm time limit) and USR1 (Slurm's --signal warning) raise
    StoppedBySignal, an exit with status 128 + the signal, where they would end the process at once:
    `finally` blocks and the atomic writers remove what is unfinished on the way out, as Ctrl-C's
    KeyboardInterrupt does. Only the first stop, Ctrl-C's included: the later ones, of any of the three,
    are ignored until the block ends, so catch StoppedBySignal and KeyboardInterrupt and say why inside it.
    A Ctrl-C this process was started ignoring stays ignored, as Python leaves it: a shell runs `tool &`
    from a script so, and the Ctrl-C that stops the script is not meant for it. The previous handlers are
    put back after."""
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ends_quietly_when_the_reader_stops(main):
    """Wrap a tool's main so that output piped into a reader that stops early (`memlayers-tfidf ... |
    head`, quitting `less`) ends the tool with status 1 and nothing printed, as `cat` ends, instead of a
    BrokenPipeError traceback (from the print that met the closed pipe, or Python's flush at exit)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            status = main(*args, **kwargs)
            sys.stdout.flush()  # here, not at exit, where a closed pipe is an 'Exception ignored' message
            return status
        except BrokenPipeError:
            if not _stdout_reader_gone():
                raise  # another pipe broke (a worker's, a subprocess's stdin): a fault, not a reader's choice
            # the interpreter flushes stdout again at exit: point it at /dev/null (Python's signal docs)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1

    return wrapped


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports POLLERR on the writing end)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (a StringIO): it broke no pipe
        return False
