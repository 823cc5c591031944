"""kernels/shared_builds.py and kernels/deepspeed_ops.py: checkouts with the same sources share one
JIT build, whatever their paths; other sources get a build of their own beside it.

Two checkouts are two folders of sources, each run by a Python whose virtual environment is a link
to this one (as the project's worktrees link /work/main/.venv), so torch's include paths in the
compile lines differ between them, which made ninja rebuild at every switch. The op is a trivial
library (no torch headers): a real build, under a second.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE = 'extern "C" int memlayers_shared_build_test() { return %d; }\n'
LOAD = """
import sys
from pathlib import Path
from kernels.shared_builds import BuildInputs, load_shared_op
inputs = BuildInputs("shared_build_test", [Path(sys.argv[1])])
print(inputs.name, load_shared_op(inputs, root=Path(sys.argv[2]), say=print))
"""


def checkout(tmp_path: Path, name: str, answer: int) -> tuple[Path, Path]:
    """A checkout's source and a Python in a virtual environment linked under the checkout."""
    folder = tmp_path / name
    (folder / "csrc").mkdir(parents=True)
    (folder / "csrc" / "op.cpp").write_text(SOURCE % answer)
    (folder / ".venv").symlink_to(Path(sys.prefix))
    return folder / "csrc" / "op.cpp", folder / ".venv" / "bin" / Path(sys.executable).name


def load_in(python: Path, source: Path, root: Path) -> str:
    done = subprocess.run(
        [str(python), "-c", LOAD, str(source), str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()[-2]  # the op's name (its build folder)


def links(build: Path) -> int:
    """Builds ninja ran in this folder (one link line each in its log)."""
    log = build / ".ninja_log"
    return sum(line.split("\t")[3].endswith(".so") for line in log.read_text().splitlines()[1:]) if log.exists() else 0


def test_checkouts_with_the_same_sources_build_once_and_other_sources_beside(tmp_path):
    (source_a, python_a), (source_b, python_b) = checkout(tmp_path, "a", 42), checkout(tmp_path, "b", 42)
    root = tmp_path / "extensions"
    names = [load_in(python, source, root) for python, source in ((python_a, source_a), (python_b, source_b))]
    assert names[0] == names[1] and [p.name for p in root.iterdir()] == [names[0]]
    build = root / names[0]
    library = build / f"{names[0]}.so"
    first = library.stat()
    for python, source in ((python_a, source_a), (python_b, source_b)):
        assert load_in(python, source, root) == names[0]
    assert links(build) == 1
    assert (library.stat().st_ino, library.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert not (build / "lock").exists()

    source_b.write_text(SOURCE % 7)  # checkout b moves on: its own build, a's left as it is
    changed = load_in(python_b, source_b, root)
    assert changed != names[0] and links(root / changed) == 1
    assert load_in(python_a, source_a, root) == names[0]
    assert links(build) == 1 and library.stat().st_mtime_ns == first.st_mtime_ns


def test_a_library_changed_after_its_build_is_not_loaded_unchecked(tmp_path):
    """The record of a finished build names the library's size and mtime: a library replaced since
    (a build killed mid-link and rerun by hand) goes through torch's build step again, not straight
    to dlopen."""
    from kernels.shared_builds import BuildInputs, load_finished, load_shared_op

    source = tmp_path / "csrc" / "op.cpp"
    source.parent.mkdir()
    source.write_text(SOURCE % 3)
    inputs = BuildInputs("shared_build_test", [source])
    load_shared_op(inputs, root=tmp_path / "ext", say=print)
    build = tmp_path / "ext" / inputs.name
    assert load_finished(inputs.name, build, False) == str(build / f"{inputs.name}.so")
    with open(build / f"{inputs.name}.so", "ab") as library:
        library.write(b"\0")
    assert load_finished(inputs.name, build, False) is None


def test_a_build_says_so_before_it_starts_and_a_finished_one_loads_in_silence(tmp_path):
    """The compiler prints nothing while it works: a first start of the trainer sat silent for 2 min
    (DeepSpeed's op, then memlayers' CPU ops, on 2 loaded cores) after DeepSpeed's accelerator line.
    A build now says what it builds and where before it starts; a later load says nothing."""
    from kernels.shared_builds import BuildInputs, load_shared_op

    source, _ = checkout(tmp_path, "checkout", 5)
    inputs = BuildInputs("shared_build_test", [source])
    said = []
    load_shared_op(inputs, root=tmp_path / "ext", say=said.append)
    assert len(said) == 1 and said[0].startswith(f"building {inputs.name} in {tmp_path / 'ext' / inputs.name},")
    said.clear()
    load_shared_op(inputs, root=tmp_path / "ext", say=said.append)
    assert said == [] and links(tmp_path / "ext" / inputs.name) == 1


def test_deepspeed_loads_its_shm_op_from_the_shared_build(monkeypatch):
    """DeepSpeed's build_shm_op (run by init_distributed) gets the op from load_shared_op, under a
    name of its sources' digest, staged relative to their folder; DeepSpeed never builds it itself."""
    import torch.utils.cpp_extension

    from kernels import deepspeed_ops, shared_builds

    ds_comm, builder, cache = _deepspeed_shm_builder(monkeypatch)

    def own_build(**kwargs):
        raise AssertionError(f"DeepSpeed built {kwargs['name']} itself")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", own_build)
    requested, op = [], object()
    monkeypatch.setattr(shared_builds, "load_shared_op", lambda inputs, **kw: requested.append(inputs) or op)
    deepspeed_ops.share_deepspeed_op_builds()
    deepspeed_ops.share_deepspeed_op_builds()  # once per process: not wrapped twice
    try:
        assert ds_comm.build_shm_op() is op
    finally:
        cache.pop(builder.name, None)
    (inputs,) = requested
    assert inputs.name.startswith("deepspeed_shm_comm_torch") and inputs.is_python_module
    assert inputs.sources == ["shm_interface.cpp", "shm.cpp"] and "x86_64/shm.h" in inputs.files
    assert "-UC10_USE_GLOG" in inputs.cflags


def _deepspeed_shm_builder(monkeypatch):
    """DeepSpeed's shm comm builder with its loaded-op cache emptied for the test (or a skip)."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    from kernels import deepspeed_ops

    ds_comm = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(ds_comm, "build_shm_op", ds_comm.build_shm_op)  # restored afterwards
    builder = get_accelerator().create_op_builder(deepspeed_ops.SHM_BUILDER)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        pytest.skip("DeepSpeed has no shm comm op here")
    cache = deepspeed_ops._loaded_ops(builder)
    monkeypatch.delitem(cache, builder.name, raising=False)
    return ds_comm, builder, cache


def test_the_shm_ops_built_successfully_line_is_dropped_and_nothing_else(monkeypatch, capsys):
    """DeepSpeed printed 'DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully' on
    every init_distributed on CPU, a cached load included: noise in every run's output. Only that
    line goes; what the build prints (here DeepSpeed's own build, after the shared one failed)
    passes through, in order."""
    import torch.utils.cpp_extension

    from kernels import deepspeed_ops, shared_builds

    ds_comm, builder, cache = _deepspeed_shm_builder(monkeypatch)
    op = object()

    def shared_fails(inputs, **kw):
        raise OSError("read-only cache")

    def own_build(**kwargs):
        print("Emitting ninja build file", kwargs["name"], end="")  # a line in two writes
        print(" (compiling)")
        return op

    monkeypatch.setattr(shared_builds, "load_shared_op", shared_fails)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", own_build)
    deepspeed_ops.share_deepspeed_op_builds()
    try:
        with pytest.warns(UserWarning, match="could not be built in a folder shared"):
            assert ds_comm.build_shm_op() is op
    finally:
        cache.pop(builder.name, None)
    assert capsys.readouterr().out == f"Emitting ninja build file {builder.name} (compiling)\n"
    monkeypatch.setattr(shared_builds, "load_shared_op", lambda inputs, **kw: op)  # the usual path: a cached op
    try:
        assert ds_comm.build_shm_op() is op
    finally:
        cache.pop(builder.name, None)
    assert capsys.readouterr().out == ""


def test_a_failed_shm_op_build_still_raises_with_its_output(monkeypatch, capsys):
    import torch.utils.cpp_extension

    from kernels import deepspeed_ops, shared_builds

    ds_comm, builder, cache = _deepspeed_shm_builder(monkeypatch)

    def shared_fails(inputs, **kw):
        raise OSError("read-only cache")

    def own_build_fails(**kwargs):
        print("shm.cpp:1: error: expected ';'")
        raise RuntimeError(f"Error building extension '{kwargs['name']}'")

    monkeypatch.setattr(shared_builds, "load_shared_op", shared_fails)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", own_build_fails)
    deepspeed_ops.share_deepspeed_op_builds()
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="Error building extension"):
        ds_comm.build_shm_op()
    assert builder.name not in cache
    assert capsys.readouterr().out == "shm.cpp:1: error: expected ';'\n"


def test_a_build_a_signal_stopped_is_built_again_in_the_same_process(tmp_path, monkeypatch):
    """Ctrl-C reaches ninja while the trainer takes the press as a stop after the step and still needs
    the op: the shared build failed, and DeepSpeed built its shm op its own way from scratch (45 s on 2
    cores), the CPU ops fell back to torch's path. The build now runs again, once; torch's own record of
    the name is dropped first, without which its second load only imported a library never linked
    (ImportError, seen). The first ninja run here ends as a Ctrl-C ends it, status 2."""
    import subprocess

    import torch.utils.cpp_extension as cpp

    from kernels.shared_builds import BuildInputs, load_shared_op

    source, _ = checkout(tmp_path, "checkout", 77)
    real_run, runs = subprocess.run, []

    def ninja_stopped_once(command, *args, **kwargs):
        if command[0] == "ninja" and "--version" not in command:
            runs.append(command)
            if len(runs) == 1:
                raise subprocess.CalledProcessError(2, command, b"ninja: build stopped: interrupted by user.\n")
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(cpp.subprocess, "run", ninja_stopped_once)
    said = []
    inputs = BuildInputs("shared_build_test", [source])
    library = load_shared_op(inputs, root=tmp_path / "ext", say=said.append)
    assert len(runs) == 2 and said == [
        f"building {inputs.name} in {tmp_path / 'ext' / inputs.name}, once for every checkout of these sources",
        f"the build of {inputs.name} was stopped by a signal; building it again (ninja keeps what it compiled)",
    ]
    import ctypes

    assert ctypes.CDLL(library).memlayers_shared_build_test() == 77
    assert (tmp_path / "ext" / inputs.name / f"{inputs.name}.so.built").is_file()  # the next start loads it


@pytest.mark.parametrize(
    "prefix, what",
    [
        ("memlayers_cpu", "memlayers' compiled CPU ops (kernels/csrc; usually 15-35 s)"),
        ("deepspeed_shm_comm", "DeepSpeed's shared-memory comm op (usually 35-85 s)"),
    ],
)
def test_a_build_and_a_wait_for_one_are_each_said_in_one_line_on_stderr(tmp_path, capfd, prefix, what):
    """Waiting for another process's build of DeepSpeed's shm op was printed on stdout, of the CPU ops as a
    UserWarning on stderr (two lines, the second the warnings call's source), each naming only the build
    folder; a build itself said nothing. Now both ops, by default, say on stderr in one line what is built
    and how long that usually takes. A trivial op under each op's name; the other process's build is a
    flock held on the build's turn file here."""
    import fcntl
    import threading
    import time

    from kernels.shared_builds import TURN_FILE, BuildInputs, load_shared_op

    source, _ = checkout(tmp_path, "checkout", 5)
    inputs = BuildInputs(prefix, [source])
    build = tmp_path / "ext" / inputs.name
    build.mkdir(parents=True)
    turn = os.open(build / TURN_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(turn, fcntl.LOCK_EX)  # another process's build in progress
    loading = threading.Thread(target=load_shared_op, args=(inputs, tmp_path / "ext"))
    loading.start()
    waited = f"memlayers: waiting for another process's build of {what} in {build}\n"
    deadline = time.monotonic() + 60
    err = ""
    while waited not in err and time.monotonic() < deadline:
        time.sleep(0.05)
        err += capfd.readouterr().err
    os.close(turn)  # that build ends (without a library: this process builds it)
    loading.join(timeout=300)
    out, rest = capfd.readouterr()
    assert out == ""
    assert err + rest == waited + f"memlayers: building {what} in {build}, once for every checkout of these sources\n"
