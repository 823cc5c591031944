"""JIT builds of C++ ops that every checkout with the same sources shares (memlayers' CPU ops, DeepSpeed's).

torch.utils.cpp_extension builds an op in `<TORCH_EXTENSIONS_DIR>/<name>/` and runs ninja there at
every load, and ninja rebuilds whenever a compile or link line differs from the one it ran last.
Those lines name the sources and torch's headers by the paths this process sees: a checkout whose
`.venv` links a shared one sees its own (`/work/wt-x/.venv/.../torch/include`). An op built under a
fixed name, DeepSpeed's `deepspeed_shm_comm`, was therefore rebuilt from scratch (50-85 s on 2 busy
cores) whenever a process of another checkout loaded it, in place, beside processes loading it.

`load_shared_op()` gives each set of inputs one folder and one compilation:
* the name carries a digest of the files the build reads (their contents and layout), the flags,
  torch's version and its install resolved through links, and the Python: the same from every
  checkout of the same sources; other sources, flags or torch get another folder, so no build is
  rebuilt over another's;
* the sources, with the folders they include from, are copied into `<build>/src`, so the build's
  lines name no checkout;
* a finished build is recorded in `<build>/<name>.so.built` (the library's size and mtime); later
  processes load that library directly, without ninja, whatever paths they see;
* the processes building one folder take turns (an flock, released by the kernel when its holder
  dies), each looking for a finished build when its turn comes; the torch build lock inside is
  still cleared by `build_locks` when a killed build left it.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

SOURCE_SUFFIXES = {".c", ".cc", ".cpp", ".cxx", ".h", ".hh", ".hpp", ".hxx", ".inl", ".ipp", ".tcc"}
BUILT_SUFFIX = ".built"  # <build>/<name>.so.built: the finished library's "size mtime_ns"
TURN_FILE = ".memlayers-build-turn"  # what the builders of one folder flock to take turns

# this process's loads that found no finished build: (op name, time.perf_counter() at the start, seconds
# spent building it or waiting for another process's build), for whoever times work around them
_UNFINISHED_LOADS: list[tuple[str, float, float]] = []


def builds_since(start: float) -> list[tuple[str, float]]:
    """The ops this process built, or waited for another process to build, since `start` (a
    time.perf_counter() reading), each with its seconds: a first training step that loaded an op
    spent them building it."""
    return [(name, seconds) for name, began, seconds in _UNFINISHED_LOADS if began >= start]


class BuildInputs:
    """What a build reads from the checkout: the files (relative to the folder that holds them all)
    and the flags. `name` is the same for the same inputs whatever the checkout's path."""

    def __init__(
        self,
        prefix: str,
        sources: Sequence[Path],
        include_dirs: Sequence[Path] = (),
        cflags: Sequence[str] = (),
        ldflags: Sequence[str] = (),
        is_python_module: bool = False,
    ):
        sources = [Path(s).absolute() for s in sources]
        include_dirs = [Path(d).absolute() for d in include_dirs if Path(d).is_dir()]
        folders = sorted({s.parent for s in sources} | set(include_dirs))
        self.top = Path(os.path.commonpath([str(f) for f in folders]))
        files = {p for folder in folders for p in folder.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()}
        self.files = {p.relative_to(self.top).as_posix(): p.read_bytes() for p in sorted(files | set(sources))}
        self.sources = [s.relative_to(self.top).as_posix() for s in sources]
        self.include_dirs = [d.relative_to(self.top).as_posix() for d in include_dirs]
        self.cflags, self.ldflags, self.is_python_module = list(cflags), list(ldflags), is_python_module
        self.name = f"{prefix}_{_digest_name(self)}"


def _digest_name(inputs: BuildInputs) -> str:
    """`torch<version>_<digest>` of everything a build's result depends on besides the compiler."""
    import torch

    torch_install = os.path.realpath(Path(torch.__file__).parent)  # a linked venv is the one it links
    digest = hashlib.sha256(
        repr(
            (
                inputs.sources,
                inputs.include_dirs,
                inputs.cflags,
                inputs.ldflags,
                inputs.is_python_module,
                torch.__version__,
                torch_install,
                sys.version,
                os.environ.get("CXX", ""),
            )
        ).encode()
    )
    for relative, data in sorted(inputs.files.items()):
        digest.update(relative.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    version = re.sub(r"\W", "_", torch.__version__)
    return f"torch{version}_{digest.hexdigest()[:12]}"


def stage(inputs: BuildInputs, build_dir: Path) -> Path:
    """The files copied (atomically, once) under `build_dir/src`; returns that folder."""
    from pretrain.files import atomic_write  # temporaries distinct per host: TORCH_EXTENSIONS_DIR may be shared

    staged = build_dir / "src"
    for relative, data in inputs.files.items():
        target = staged / relative
        if not target.is_file():  # the name's digest covers the content: an existing copy is this one
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data)
    return staged


def library_path(name: str, build_dir: Path) -> Path:
    return build_dir / f"{name}.so"


def load_finished(name: str, build_dir: Path, is_python_module: bool):
    """The finished build's library loaded (a module, or its path for a library of torch ops);
    None when no build is recorded as finished, or the library is no longer the one recorded."""
    library = library_path(name, build_dir)
    try:
        recorded = (build_dir / f"{library.name}{BUILT_SUFFIX}").read_text().split()
        seen = library.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if recorded != [str(seen.st_size), str(seen.st_mtime_ns)]:
        return None
    if not is_python_module:
        import torch

        torch.ops.load_library(str(library))
        return str(library)
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, library)  # as torch.utils.cpp_extension imports it
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record_finished(name: str, build_dir: Path) -> None:
    from pretrain.files import atomic_write

    library = library_path(name, build_dir)
    if library.is_file():  # not when the build was faked (tests) or named its library otherwise
        seen = library.stat()
        atomic_write(build_dir / f"{library.name}{BUILT_SUFFIX}", f"{seen.st_size} {seen.st_mtime_ns}\n")


def load_shared_op(inputs: BuildInputs, root: Path | None = None, say: Callable[[str], None] | None = None):
    """The op of `inputs` loaded from `<root>/<inputs.name>` (TORCH_EXTENSIONS_DIR by default), built
    first when no finished build is there: a module (is_python_module) or the library's path. A build
    and a wait for another process's say so in a line (`say`; by default on stderr), naming the op
    and how long its build usually takes."""
    from kernels.build_locks import (
        build_described,
        clear_stale_build_locks,
        extensions_root,
        say_on_stderr,
        taking_turns,
    )

    say = say if say is not None else say_on_stderr
    root = root if root is not None else extensions_root()
    build_dir = root / inputs.name
    loaded = load_finished(inputs.name, build_dir, inputs.is_python_module)
    if loaded is not None:
        return loaded
    began = time.perf_counter()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        what = build_described(inputs.name)
        waiting = lambda: say(f"waiting for another process's build of {what} in {build_dir}")  # noqa: E731
        with taking_turns(build_dir / TURN_FILE, on_wait=waiting):
            loaded = load_finished(inputs.name, build_dir, inputs.is_python_module)
            if loaded is not None:
                return loaded
            clear_stale_build_locks(root, say=say, ops=[inputs.name])  # a killed build's torch lock
            say(f"building {what} in {build_dir}, once for every checkout of these sources")
            loaded = _build(inputs, build_dir, stage(inputs, build_dir), say)
            _record_finished(inputs.name, build_dir)
            return loaded
    finally:
        _UNFINISHED_LOADS.append((inputs.name, began, time.perf_counter() - began))


# ninja's exit status when a signal (Ctrl-C's SIGINT, a SIGTERM) stopped its build
NINJA_STOPPED = 2


def _stopped_by_signal(err: BaseException | None) -> bool:
    """Whether `err` is torch's failed build of an op whose ninja a signal stopped."""
    import subprocess

    while err is not None:
        if isinstance(err, subprocess.CalledProcessError) and err.returncode == NINJA_STOPPED:
            return True
        err = err.__cause__
    return False


def _build(inputs: BuildInputs, build_dir: Path, staged: Path, say: Callable[[str], None]):
    """torch's JIT build and load of the staged sources. A build a signal stopped runs once more: Ctrl-C
    reaches the compiler, while the trainer takes the press as a stop after the step and still needs
    the op. DeepSpeed then built its shm op its own way, from scratch, in a folder of its own (45 s on
    2 cores before the run could stop), and the next start built the shared one again; the memlayers
    CPU ops fell back to torch's slower path for the run."""
    import torch.utils.cpp_extension as cpp

    def build():
        return cpp.load(
            name=inputs.name,
            sources=[str(staged / s) for s in inputs.sources],
            extra_include_paths=[str(staged / d) for d in inputs.include_dirs],
            extra_cflags=inputs.cflags,
            extra_ldflags=inputs.ldflags,
            build_directory=str(build_dir),
            is_python_module=inputs.is_python_module,
        )

    try:
        return build()
    except Exception as err:
        if not _stopped_by_signal(err):
            raise
    say(f"the build of {inputs.name} was stopped by a signal; building it again (ninja keeps what it compiled)")
    # torch records a name's inputs at its first load in a process and skips the build of a name it has
    # seen (the second load of the stopped build only tried to import a library never linked)
    versioner = getattr(cpp, "JIT_EXTENSION_VERSIONER", None)
    if versioner is not None:
        versioner.entries.pop(inputs.name, None)
    return build()
