"""sentencepiece's trainer in a process of its own, which pretrain.data.tokenizer runs as a script:

    python sentencepiece_worker.py OPTIONS_JSON MODEL_PATH CALLER_PID    (the sample on stdin, each sentence and "\n")

The trainer is native code: in the caller's process it held the main thread, and with it every Python
signal handler, until it returned (minutes on a large sample). Here the caller can kill it at once.
It ignores the stop signals and Ctrl-C, which Slurm and the terminal send to every process of the
step or group: the caller decides the stop. MODEL_PATH lies in a temporary folder of the caller's own
(tempfile.TemporaryDirectory), never beside the tool's output, so concurrent runs do not share it; the
caller moves the model to its output with pretrain.files.atomic_write. The model goes to MODEL_PATH.tmp,
renamed to MODEL_PATH when complete. On Linux it dies with its caller (a kill -9 of the tool, the OOM killer), where it
would train on for minutes, its model unread. Only the standard library and sentencepiece are imported: it starts in a blink.
"""

import ctypes
import json
import os
import signal
import sys

_STOPS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


_PR_SET_PDEATHSIG = 1  # prctl(2)


def _die_with_the_caller(caller_pid: int) -> None:
    """SIGKILL this process when its caller ends (Linux; elsewhere the caller's kill on its way out
    is all there is). The caller may have died before the request: then its pid is no longer the parent's."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != caller_pid:
        os._exit(1)


def _sentences(lines):
    """The sample's sentences, read one at a time as the trainer asks for them: it keeps a copy of each, and
    the sample read whole beside it (its bytes, their text, the list of lines) raised this process's peak by
    a fifth (a 50 MB corpus, all 1.45M lines: 776 MiB, 648 MiB read so)."""
    for line in lines:
        yield line.removesuffix(b"\n").decode("utf-8")


def main() -> None:
    _die_with_the_caller(int(sys.argv[3]))
    for sig in _STOPS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # blocked by the caller until they are ignored
    # Run as a script, this file's folder leads sys.path, and its inspect.py would stand in for the standard
    # library's, which sentencepiece's `import importlib.resources` imports on Python 3.12 and later.
    here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    import sentencepiece as spm

    options, model_path = json.loads(sys.argv[1]), sys.argv[2]
    with open(model_path + ".tmp", "wb") as model:
        spm.SentencePieceTrainer.train(sentence_iterator=_sentences(sys.stdin.buffer), model_writer=model, **options)
    os.replace(model_path + ".tmp", model_path)


if __name__ == "__main__":
    main()
