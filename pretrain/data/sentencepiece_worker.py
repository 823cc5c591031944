"""sentencepiece's trainer in a process of its own, which pretrain.data.tokenizer runs as a script:

    python sentencepiece_worker.py OPTIONS_JSON MODEL_PATH    (the sample on stdin, one sentence a line)

The trainer is native code: in the caller's process it held the main thread, and with it every Python
signal handler, until it returned (minutes on a large sample). Here the caller can kill it at once.
It ignores the stop signals and Ctrl-C, which Slurm and the terminal send to every process of the
step or group: the caller decides the stop. The model goes to MODEL_PATH.tmp, renamed to MODEL_PATH
when complete. Only the standard library and sentencepiece are imported: it starts in a blink.
"""

import json
import os
import signal
import sys

_STOPS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def main() -> None:
    for sig in _STOPS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)  # blocked by the caller until they are ignored
    # Run as a script, this file's folder leads sys.path, and its inspect.py would stand in for the standard
    # library's, which sentencepiece's `import importlib.resources` imports on Python 3.12 and later.
    here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    import sentencepiece as spm

    options, model_path = json.loads(sys.argv[1]), sys.argv[2]
    sentences = sys.stdin.buffer.read().decode("utf-8").split("\n")
    with open(model_path + ".tmp", "wb") as model:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **options)
    os.replace(model_path + ".tmp", model_path)


if __name__ == "__main__":
    main()
