"""tools/prepare_data.py with tokenizer workers, signaled as Slurm signals a job step (every
process) or as the out-of-memory killer ends one worker. Measured before pretrain/data/worker_pool.py
(multiprocessing.Pool, --workers 2, this corpus): SIGTERM to the workers left the preparation
waiting forever for the chunks they held (the Pool replaced them silently), its temporary folder
beside --output; SIGTERM to every process ended it with exit status 143 and no word; USR1 (Slurm's
--signal warning) killed it at once, the temporary folder left behind."""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _corpus(folder: Path) -> Path:
    """About 40 MB of JSON Lines: several seconds of tokenizing on 2 workers."""
    words = "alpha beta gamma delta memory layer slot value key token the of and a to".split()
    rng = random.Random(0)
    path = folder / "corpus.jsonl"
    with open(path, "w") as fh:
        for _ in range(60_000):
            fh.write(json.dumps({"text": " ".join(rng.choices(words, k=150))}) + "\n")
    return path


def _status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _serving_workers(parent: int, count: int, timeout: float = 120) -> list[int]:
    """The pids of `parent`'s children that ignore SIGTERM and USR1 (tokenizer workers past their
    start), once there are `count`; fails after `timeout` seconds."""
    stop_signals = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGUSR1 - 1))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                status = _status(int(entry.name))
                if (
                    status.get("PPid") == str(parent)
                    and int(status.get("SigIgn", "0"), 16) & stop_signals == stop_signals
                ):
                    found.append(int(entry.name))
        if len(found) >= count:
            return found
        time.sleep(0.1)
    pytest.fail(f"no {count} tokenizer workers ignoring SIGTERM and USR1 after {timeout} s")


@pytest.fixture
def preparation(tmp_path, tokenizer):
    """Starts tools/prepare_data.py --workers 2 in a session of its own; yields (process, output)."""
    corpus = _corpus(tmp_path)
    out = tmp_path / "data"
    argv = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--input", str(corpus), "--output", str(out)]
    argv += ["--tokenizer", str(tokenizer.path), "--seq-len", "32", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield proc, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def _left_beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}")))


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_to_every_process_ends_the_preparation_with_one_message(preparation, stop):
    proc, out = preparation
    workers = _serving_workers(proc.pid, 2)
    for pid in [*workers, proc.pid]:  # as Slurm signals each process of the step
        os.kill(pid, stop)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + stop, err
    assert err.startswith(f"error: stopped by {signal.Signals(stop).name} ("), err
    assert f"the unfinished preparation was removed and {out} is as it was before" in err
    assert "Traceback" not in err, err
    assert _left_beside(out) == []  # neither the output nor a temporary
    assert not any(_status(pid) for pid in workers)  # ended by the main process, not left running


def test_a_worker_killed_by_the_out_of_memory_killer_is_named(preparation):
    proc, out = preparation
    victim = _serving_workers(proc.pid, 2)[0]
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err == (
        f"error: a tokenizer worker (pid {victim}) was killed by SIGKILL, most often the kernel's out-of-memory "
        "killer (dmesg): use fewer --workers\n"
    )
    assert _left_beside(out) == []


def test_a_worker_that_dies_idle_after_the_last_result_loses_nothing():
    """Once every result is in, the pool told each worker to end by writing to its pipe: one that had
    died while idle (the out-of-memory killer, say) failed the whole map after its last result with a
    BrokenPipeError. It owed nothing: the map now ends as without it, no process left behind."""
    import multiprocessing

    from pretrain.data.worker_pool import ordered_map

    before = set(multiprocessing.active_children())
    results = ordered_map(abs, [-3], workers=2)
    assert next(results) == 3
    workers = [child for child in multiprocessing.active_children() if child not in before]
    assert len(workers) == 2
    for worker in workers:  # neither holds an item: the one result came back
        worker.kill()
        worker.join()
    assert list(results) == []
    assert set(multiprocessing.active_children()) <= before


def test_a_map_without_workers_is_refused_not_waited_for():
    # it waited forever for results no process would compute
    from pretrain.data.worker_pool import ordered_map

    with pytest.raises(ValueError, match="workers >= 1, got 0"):
        list(ordered_map(abs, [-3], 0))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.fixture
def tokenizer_training(tmp_path):
    """Starts tools/train_tokenizer.py on ~20 MB of text (seconds of sentencepiece training) in a session
    of its own; yields (process, the sentencepiece worker's pid once it computes, --output)."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(20_000)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=40)) for _ in range(80_000)) + "\n")
    out = tmp_path / "tok.model"
    argv = [sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--input", str(corpus), "--output", str(out)]
    proc = subprocess.Popen(
        [*argv, "--vocab-size", "16000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # as a shell's foreground job: a test run started in the background (nohup, `cmd &` in a
        # script) has SIGINT ignored, which its children inherit, and Python then leaves it ignored
        preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL),
    )
    try:
        trainer = _serving_workers(proc.pid, 1)[0]
        deadline = time.monotonic() + 120
        while _cpu_seconds(trainer) < 0.5:  # it has its sample and trains (about 5 s of CPU in all)
            assert time.monotonic() < deadline and proc.poll() is None, "the trainer never got to work"
            time.sleep(0.05)
        yield proc, trainer, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_while_the_tokenizer_trains_ends_it_with_one_message(tokenizer_training, stop):
    """sentencepiece's trainer is native code: it trained in the tool's main thread, where Python runs
    signal handlers only once it returned. Measured on 50 MB of /usr/share/doc and Python sources
    (--max-sentences 2000000): Ctrl-C at 15 s acted 4.9 s later, as a KeyboardInterrupt traceback; a
    unigram model there trains for 9.5 min. SIGTERM and USR1 ended the tool at once with no word (no
    handler). The trainer now runs in a child that ignores the stop signals (pretrain/data/sentencepiece_worker.py):
    the tool stops with one line and exit status 128 + the signal (measured: 0.3 s), kills the worker,
    and writes no model."""
    proc, trainer, out = tokenizer_training
    for pid in (trainer, proc.pid):  # as Slurm signals each process of the step, and Ctrl-C the process group
        os.kill(pid, stop)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + stop, err
    name = signal.Signals(stop).name
    assert re.fullmatch(
        f"error: stopped by {name} after \\d+ s: no tokenizer was written, {re.escape(str(out))} is as it was before\n",
        err,
    ), err
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus.txt"]  # no model, no temporary
    assert not _status(trainer)  # killed by the tool, not left training


def test_a_tokenizer_trainer_killed_by_the_out_of_memory_killer_is_named(tokenizer_training):
    proc, trainer, out = tokenizer_training
    os.kill(trainer, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err == (
        f"error: the sentencepiece trainer (pid {trainer}) was killed by SIGKILL, most often the kernel's "
        "out-of-memory killer (dmesg): a smaller sample (--max-sentences) needs less memory\n"
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus.txt"]


def test_a_tokenizer_trainer_ends_with_the_tool_killed_outright(tokenizer_training):
    """kill -9 of the tool (the OOM killer, a node's cleanup) left its sentencepiece trainer training on
    to the end, and writing a model no one would read (measured: it finished and renamed its model into
    the tool's temporary folder, the tool long gone). On Linux it now asks the kernel to SIGKILL it when
    its caller ends."""
    proc, trainer, _ = tokenizer_training
    model = Path(Path(f"/proc/{trainer}/cmdline").read_bytes().split(b"\0")[3].decode())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 120
    while _status(trainer).get("State", "Z").startswith(("R", "S", "D")):
        assert time.monotonic() < deadline, f"the trainer (pid {trainer}) was still training after 120 s"
        time.sleep(0.05)
    trained = model.exists()
    shutil.rmtree(model.parent)  # the tool's temporary folder: a kill -9 leaves it behind
    assert not trained, "the trainer trained to the end with the tool gone"


def test_the_tokenizer_trainer_imports_the_standard_librarys_modules_not_the_packages(tmp_path, monkeypatch):
    """The trainer runs pretrain/data/sentencepiece_worker.py as a script, so pretrain/data led its
    sys.path, and pretrain/data/inspect.py stood in for the standard library's inspect, which
    sentencepiece imports (through importlib.resources) on Python 3.12 and later: there every tokenizer
    training failed (reproduced with Python 3.12.1 and sentencepiece 0.2.3: 'ModuleNotFoundError: No
    module named numpy' from pretrain/data/inspect.py; with numpy, a circular import). Here a stand-in
    sentencepiece imports inspect as 3.12's does, and its trainer writes where inspect came from."""
    import inspect

    from pretrain.data import tokenizer as tokenizer_mod

    fake = tmp_path / "site" / "sentencepiece"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import inspect\n\n"
        "class SentencePieceTrainer:\n"
        "    @staticmethod\n"
        "    def train(sentence_iterator, model_writer, **options):\n"
        "        model_writer.write(inspect.__file__.encode())\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    assert tokenizer_mod._trained_model(["a sentence"], {}).decode() == inspect.__file__


def _signalled_mid_tokenizing(tmp_path, tokenizer, monkeypatch, signum: int) -> list[str]:
    """prepare_data's argv for a 400-document corpus whose tokenizing sends `signum` to this process after
    300 documents (--workers 1: the main process tokenizes)."""
    from pretrain.data import prepare as prepare_mod

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(400)))
    tokenize = prepare_mod.tokenize_documents

    def tokenize_then_signalled(*args, **kwargs):
        for n, ids in enumerate(tokenize(*args, **kwargs)):
            if n == 300:
                os.kill(os.getpid(), signum)
            yield ids

    monkeypatch.setattr(prepare_mod, "tokenize_documents", tokenize_then_signalled)
    argv = ["--input", str(corpus), "--tokenizer", str(tokenizer.path), "--output", str(tmp_path / "data")]
    return argv + ["--seq-len", "16", "--sequences-per-shard", "64", "--no-progress", "--workers", "1"]


@pytest.mark.parametrize(
    "first, second",
    [
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGUSR1, signal.SIGTERM),
        (signal.SIGINT, signal.SIGTERM),
        (signal.SIGTERM, signal.SIGINT),
        (signal.SIGINT, signal.SIGINT),
    ],
)
def test_a_second_signal_during_the_cleanup_still_removes_the_temporary(
    tmp_path, tokenizer, monkeypatch, capsys, first, second
):
    """Slurm sends SIGTERM at the time limit after its USR1 warning, and a second `scancel` sends another:
    one that came while the stop was removing the hidden temporary folder raised the stop again inside
    that removal, which ended there and left the folder beside --output, while the message said it was
    removed (and a USR1 stop reported SIGTERM). Once stopping, the tool now ignores further stop signals
    until it has cleaned up and said why it stopped. Here the second signal comes as the removal starts.

    Ctrl-C (SIGINT) counts as a stop too, first or second: a SIGTERM inside the cleanup of a Ctrl-C raised
    there, left the folder and reported SIGTERM (exit 143), and a Ctrl-C inside a SIGTERM's cleanup left
    it with a KeyboardInterrupt traceback (exit 130); a Ctrl-C alone printed a traceback."""
    import shutil

    from tools import prepare_data as prepare_cli

    argv = _signalled_mid_tokenizing(tmp_path, tokenizer, monkeypatch, first)
    rmtree, removals = shutil.rmtree, []

    def rmtree_signalled_again(path, *args, **kwargs):
        if Path(path).name.startswith(".data.tmp-"):
            removals.append(path)
            os.kill(os.getpid(), second)
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_signalled_again)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    assert prepare_cli.main(argv) == 128 + first
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # put back once it has stopped
    assert removals, "the temporary folder was not removed with shutil.rmtree"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # neither the output nor a temporary
    said = capsys.readouterr().err
    assert said.startswith(f"error: stopped by {signal.Signals(first).name} ("), said
    assert f"the unfinished preparation was removed and {tmp_path / 'data'} is as it was before" in said
    assert said.count("error:") == 1 and "Traceback" not in said, said


def test_a_ctrl_c_the_tool_was_started_ignoring_stays_ignored(tmp_path, tokenizer, monkeypatch):
    """A shell runs `memlayers-prepare-data ... &` from a script with SIGINT ignored, so that the Ctrl-C
    that stops the script (the terminal sends it to the whole process group) leaves the background job
    alone; Python keeps an inherited SIG_IGN. Counting Ctrl-C as a stop (6b49dfe) replaced it with a
    handler, and such a Ctrl-C stopped the preparation (exit status 130, nothing written). It now
    runs to the end, and SIGINT is still ignored after it."""
    from tools import prepare_data as prepare_cli

    argv = _signalled_mid_tokenizing(tmp_path, tokenizer, monkeypatch, signal.SIGINT)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert prepare_cli.main(argv) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["documents"] == 400


def test_stop_signals_in_a_workers_start_up_leave_it_working(tmp_path, monkeypatch):
    """Slurm's SIGTERM and USR1 and Ctrl-C's SIGINT in a tokenizer worker's first second (Python's start
    and spawn's imports, before the worker ignores them) killed it: the preparation then failed with
    'a tokenizer worker (pid N) was killed by SIGTERM'. The workers now start with them blocked and
    ignore them before unblocking. Here each is held in spawn's imports until all three were sent."""
    from pretrain.data.worker_pool import ordered_map
    from tests.data import held_start

    gate = tmp_path / "gate"
    gate.mkdir()
    monkeypatch.setenv("HELD_START_GATE", str(gate))
    monkeypatch.setenv("HELD_START_PARENT", str(os.getpid()))

    def signal_held_workers():
        deadline = time.monotonic() + 120
        while len(held := [p for p in gate.iterdir() if p.name != "go"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        for pid in held:
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                os.kill(int(pid.name), sig)
        (gate / "go").touch()

    sender = threading.Thread(target=signal_held_workers)
    sender.start()
    try:
        results = list(ordered_map(held_start.identity, range(40), workers=2))
    finally:
        (gate / "go").touch()
        sender.join()
    assert len([p for p in gate.iterdir() if p.name != "go"]) == 2  # both were held and signalled
    assert results == list(range(40))
