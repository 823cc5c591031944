"""pretrain.files: the one write-to-temporary-then-rename helper, for files and folders."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pretrain.files import (
    atomic_directory,
    atomic_path,
    atomic_write,
    file_sha256,
    flush_to_disk,
    readable_as_umask_allows,
    save_figure,
    temp_path_beside,
)
from tests.syscall_log import SyscallLog

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Crash(Exception):
    pass


def test_bytes_text_and_callback_land_whole(tmp_path):
    blob = os.urandom(3 << 20)  # several of file_sha256's 1 MiB blocks
    assert atomic_write(tmp_path / "a.bin", blob) == tmp_path / "a.bin"
    assert (tmp_path / "a.bin").read_bytes() == blob
    assert file_sha256(tmp_path / "a.bin") == hashlib.sha256(blob).hexdigest()
    atomic_write(tmp_path / "sub" / "b.txt", "héllo\n")  # missing parent folders are made
    assert (tmp_path / "sub" / "b.txt").read_text() == "héllo\n"
    seen = []
    atomic_write(tmp_path / "c.png", lambda tmp: (seen.append(tmp), tmp.write_bytes(b"png")))
    assert (tmp_path / "c.png").read_bytes() == b"png"
    # The callback writes a hidden sibling that keeps the suffix (savefig reads the format from it).
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(".c.png.tmp-") and tmp.suffix == ".png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "c.png", "sub"]


@pytest.mark.parametrize("error", [Crash, KeyboardInterrupt])
def test_failure_mid_write_keeps_old_file_and_leaves_no_temporary(tmp_path, error):
    target = tmp_path / "state.json"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("new but incomp")
        raise error()

    with pytest.raises(error):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_killed_writer_leaves_old_file_intact(tmp_path):
    """A process killed mid-write (no exception handler runs) never exposes a partial file."""
    target = tmp_path / "table.bin"
    target.write_bytes(b"old contents")
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO_ROOT!r})
        from pretrain.files import atomic_write
        def die_halfway(tmp):
            with open(tmp, "wb") as fh:
                fh.write(b"new")
                fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        atomic_write({str(target)!r}, die_halfway)
    """)
    result = subprocess.run([sys.executable, "-c", child], timeout=60, check=False)
    assert result.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old contents"
    # What remains is a hidden temporary that no reader of table.bin looks at.
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".table.bin.tmp-")


def test_directory_replaces_old_folder_only_when_complete(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def fill_then_fail(tmp):
        (tmp / "new.txt").write_text("new")
        raise Crash()

    with pytest.raises(Crash):
        atomic_write(out, fill_then_fail, directory=True)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]

    atomic_write(out, lambda tmp: (tmp / "new.txt").write_text("new"), directory=True)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    with atomic_directory(out) as tmp:
        (tmp / "nested").mkdir()
        (tmp / "nested" / "x").write_bytes(b"x")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["nested", "nested/x"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_a_failed_rename_of_the_new_folder_puts_the_old_one_back(tmp_path, monkeypatch):
    """The old folder is renamed aside before the new one is renamed in (a kill never leaves it half
    deleted, tests/export/test_export_crash.py); where the second rename fails, it is renamed back."""
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace = os.replace

    def refuse_the_new_folder(src, dst):
        if ".export.tmp-" in str(src) and "new.txt" in os.listdir(src):
            raise PermissionError(13, "Permission denied", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_the_new_folder)
    with pytest.raises(PermissionError):
        atomic_write(out, lambda tmp: (tmp / "new.txt").write_text("new"), directory=True)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # was: no export folder at all
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_a_file_reaches_the_disk_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    """Without the fsyncs a power cut after the rename could leave `target` empty: the filesystem may
    write the rename before the data (pretrain.files)."""
    target = tmp_path / "state.json"
    target.write_text("old")
    log = SyscallLog(monkeypatch)
    atomic_write(target, "new")
    commit = log.rename_onto(target)
    tmp = log.events[commit][1]
    assert ("fsync", tmp) in log.events[:commit]
    assert ("fsync", str(tmp_path)) in log.events[commit:]


def test_a_folder_reaches_the_disk_whole_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    log = SyscallLog(monkeypatch)
    with atomic_directory(out) as tmp:
        (tmp / "model.bin").write_bytes(b"weights")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "x").write_bytes(b"x")
    commit = log.rename_onto(out)
    tmp = Path(log.events[commit][1])
    before = log.synced(0, commit)
    assert {str(tmp / "model.bin"), str(tmp / "nested" / "x"), str(tmp / "nested"), str(tmp)} <= before
    # the files before the folders that hold them
    order = [e[1] for e in log.events[:commit] if e[0] == "fsync"]
    assert order.index(str(tmp / "nested" / "x")) < order.index(str(tmp / "nested")) < order.index(str(tmp))
    assert str(tmp_path) in log.synced(commit, len(log.events))
    assert sorted(p.name for p in out.iterdir()) == ["model.bin", "nested"]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EIO])
def test_a_filesystem_without_fsync_is_written_to_and_a_failed_flush_is_raised(tmp_path, monkeypatch, code):
    """EINVAL: the filesystem cannot flush (some FUSE and network mounts), nothing more can be done;
    EIO: the data did not reach the disk, so the write fails and the old file stays."""
    target = tmp_path / "state.json"
    target.write_text("old")

    def fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)
    if code == errno.EINVAL:
        atomic_write(target, "new")
        assert target.read_text() == "new"
        return
    with pytest.raises(OSError) as raised:
        atomic_write(target, "new")
    assert raised.value.errno == errno.EIO
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_flush_of_the_folder_after_the_rename_is_raised_with_the_new_version_in_place(tmp_path, monkeypatch):
    """The folder that holds the new name is flushed after the rename: an EIO there fails the write (the
    rename may not be on disk), but the new version is under the name already, and a folder's previous
    version is kept under its temporary name, not deleted. The node-crash passage (docs/faults.md) said a failed
    flush kept the old version, true only of the flushes before the rename."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    target, out = tmp_path / "state.json", tmp_path / "export"
    target.write_text("old")
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as raised:
        atomic_write(target, "new")
    assert raised.value.errno == errno.EIO and target.read_text() == "new"
    with pytest.raises(OSError) as raised:
        with atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert raised.value.errno == errno.EIO and [p.name for p in out.iterdir()] == ["new.txt"]
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(".export.tmp-")]
    assert (kept / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([kept.name, "export", "state.json"])


def test_directory_needs_a_callback(tmp_path):
    with pytest.raises(TypeError, match="callable"):
        atomic_write(tmp_path / "d", b"bytes", directory=True)
    assert not list(tmp_path.iterdir())


def test_concurrent_writers_use_distinct_temporaries_and_last_commit_wins(tmp_path):
    target = tmp_path / "latest"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_text("first")
        second.write_text("second")
    # Contexts exit inner first: `second` is committed, then `first` replaces it.
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
    assert temp_path_beside(target) != temp_path_beside(target)


def test_permissions_follow_the_umask_like_a_plain_write(tmp_path):
    """Temporaries are not made with mkstemp/mkdtemp's private 0600/0700 modes."""
    (tmp_path / "plain").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    atomic_write(tmp_path / "atomic", "x")
    atomic_write(tmp_path / "atomic_dir", lambda tmp: None, directory=True)
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("atomic") == mode("plain")
    assert mode("atomic_dir") == mode("plain_dir")


def test_a_writer_that_makes_its_file_private_gets_the_read_bits_of_the_umask(tmp_path):
    """safetensors' save_file writes 0600 whatever the umask: a slot table or an SMF export's
    model.safetensors was unreadable by the group a 0644 checkpoint folder is shared with."""
    from safetensors.torch import save_file

    old = os.umask(0o027)
    try:
        (tmp_path / "plain").write_text("x")
        atomic_write(tmp_path / "table.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))

        def private_folder(tmp):
            save_file({"a": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "run.sh", 0o700)

        atomic_write(tmp_path / "export", private_folder, directory=True)
    finally:
        os.umask(old)
    mode = lambda path: (tmp_path / path).stat().st_mode & 0o777  # noqa: E731
    assert mode("plain") == 0o640
    assert mode("table.safetensors") == mode("export/model.safetensors") == 0o640
    assert mode("export/run.sh") == 0o740  # read bits added, nothing else changed


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO])
def test_a_folder_that_cannot_be_listed_fails_the_read_bits(tmp_path, monkeypatch, code):
    """readable_as_umask_allows went through Path.rglob, which passes over a subfolder it cannot
    list: the private files in it kept mode 0600 without a word (seen as user nobody with a
    subfolder of mode 0300). The reference is the error naming that folder, as flush_to_disk raises."""
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("nested"):
            raise OSError(code, os.strerror(code), str(path))
        return real_scandir(path)

    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "model.safetensors").write_bytes(b"x")
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(OSError) as raised:
        readable_as_umask_allows(tmp_path)
    assert raised.value.errno == code and raised.value.filename == str(tmp_path / "nested")


def test_save_figure_format_follows_the_suffix_and_a_folder_is_refused(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def figure():
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        return fig

    # No suffix: PNG (matplotlib alone would take the temporary's random tail as the format).
    fig = figure()
    assert save_figure(fig, tmp_path / "plain") == tmp_path / "plain"
    assert (tmp_path / "plain").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)  # closed
    save_figure(figure(), tmp_path / "sub" / "plot.pdf")  # folder made, format from the suffix
    assert (tmp_path / "sub" / "plot.pdf").read_bytes()[:5] == b"%PDF-"
    (tmp_path / "folder").mkdir()
    fig = figure()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_figure(fig, tmp_path / "folder")
    assert not plt.fignum_exists(fig.number)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "plain", "sub"]
    assert list((tmp_path / "folder").iterdir()) == []


def test_temporary_names_carry_the_writers_pid_and_host(tmp_path):
    """Two hosts sharing the filesystem may run writers with one pid (containers start at the same
    pids): the host is part of the name, and the name says which process wrote it."""
    import re
    import socket

    name = temp_path_beside(tmp_path / "model.safetensors").name
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())
    assert re.fullmatch(rf"\.model\.safetensors\.tmp-{os.getpid()}@{re.escape(host)}-[0-9a-f]{{8}}\.safetensors", name)


def test_a_folder_write_removes_the_temporaries_killed_writers_left_on_this_host(tmp_path):
    """Each killed export left its whole temporary folder beside the target, and they piled up.
    The next atomic write of that folder removes those whose writer on this host is gone, naming
    them; another host's (its writer cannot be seen from here), a live writer's, another target's
    and an unrecognised name stay."""
    import re
    import socket

    out = tmp_path / "export"
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO_ROOT!r})
        from pretrain.files import atomic_directory
        with atomic_directory({str(out)!r}) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", child], timeout=60, check=False).returncode == -signal.SIGKILL
    (first,) = [p.name for p in tmp_path.iterdir()]
    assert first.startswith(".export.tmp-")
    dead_pid = int(first.split("tmp-")[1].split("@")[0])
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())
    killed = [first, f".export.tmp-{dead_pid}@{host}-deadbeef"]  # an earlier writer that had the same pid
    (tmp_path / killed[1]).mkdir()
    (tmp_path / killed[1] / "model.safetensors").write_bytes(b"half")
    kept = [
        f".export.tmp-{dead_pid}@not-{host}-0123abcd",  # another host's
        f".export.tmp-{os.getpid()}@{host}-0123abcd",  # a live writer's (this process)
        f".other.tmp-{dead_pid}@{host}-0123abcd",  # another target's
        f".export.tmp-{dead_pid}-0123abcd",  # no host in the name
    ]
    for name in kept:
        (tmp_path / name).mkdir()
    with pytest.warns(UserWarning, match="removed 2 temporaries of .*export left by killed writers") as said:
        atomic_write(out, lambda tmp: (tmp / "model.safetensors").write_bytes(b"whole"), directory=True)
    assert all(name in str(said[0].message) for name in killed)
    assert (out / "model.safetensors").read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", *kept])


def test_a_tools_warning_of_removed_temporaries_prints_as_one_plain_line(tmp_path):
    """The warning named contextlib as its origin (stacklevel 3 from remove_dead_temporaries is
    contextlib's __enter__ under atomic_directory), so plain_warnings kept Python's format: rerun after
    `kill -9`, tools/prepare_data.py printed `.../contextlib.py:137: UserWarning: memlayers: removed 1
    temporary ...` and then `  return next(self.gen)`. The reference is the tools' own form."""
    import warnings

    import pretrain.files as files
    from pretrain.cli import plain_warnings

    dead = tmp_path / f".data.tmp-{2**22 + 1}@{files._host()}-0123abcd"  # above any pid_max: no such process
    dead.mkdir()
    with warnings.catch_warnings(record=True) as said, plain_warnings():
        warnings.simplefilter("always")
        with files.atomic_directory(tmp_path / "data") as tmp:
            (tmp / "manifest.json").write_text("{}")
        (warned,) = said
        shown = warnings.formatwarning(warned.message, warned.category, warned.filename, warned.lineno, warned.line)
    assert shown == (
        f"warning: memlayers: removed 1 temporary of {tmp_path / 'data'} left by killed writers on this host "
        f"({files._host()}): {dead.name}\n"
    )
    assert not dead.exists()


def test_a_dead_writers_temporary_that_cannot_be_removed_is_not_called_removed(tmp_path, monkeypatch):
    """remove_dead_temporaries removed with errors ignored and warned 'removed' whatever happened: run as
    user nobody, a dead writer's temporary holding a subfolder of mode 0300 stayed, reported removed.
    The reference is the folder, still on disk: warned of as left, with the error, and not returned."""
    import shutil

    import pretrain.files as files

    dead = tmp_path / f".export.tmp-{2**22 + 1}@{files._host()}-0123abcd"  # above any pid_max: no such process
    (dead / "nested").mkdir(parents=True)

    def rmtree(path, ignore_errors=False, **kwargs):  # as the real one meets a subfolder it cannot list
        if not ignore_errors:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "nested")

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.warns(
        UserWarning, match=r"could not remove 1 temporary .* by hand: \.export\.tmp-.* \(Permission denied: nested\)"
    ):
        assert files.remove_dead_temporaries(tmp_path / "export") == []
    assert dead.is_dir()


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO])
def test_a_folder_that_cannot_be_listed_fails_the_flush(tmp_path, monkeypatch, code):
    """flush_to_disk's os.walk passed over a subfolder it could not list (os.walk's default): its
    files were never flushed, and the commit renamed the folder in without a word. The reference is
    the error and the old version, still whole."""
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("nested"):
            raise OSError(code, os.strerror(code), str(path))
        return real_scandir(path)

    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(OSError) as raised:
        with atomic_directory(out) as tmp:
            (tmp / "nested").mkdir()
            (tmp / "nested" / "x").write_text("new")
    assert raised.value.errno == code and raised.value.filename.endswith("nested")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["export"]
    (out / "nested").mkdir()  # a folder flushed in place (TensorBoard's log before a checkpoint)
    with pytest.raises(OSError) as raised:
        flush_to_disk(out)
    assert raised.value.errno == code and raised.value.filename == str(out / "nested")


def test_a_failed_write_whose_temporary_cannot_be_removed_raises_its_own_error(tmp_path, monkeypatch):
    """`discard` removed a temporary file with only a missing one ignored: where the cleanup's unlink was
    refused (a folder made read-only meanwhile), its PermissionError replaced the write's own error.
    It now returns that error, as it did for a folder; the reference is the writer's exception."""
    import pretrain.files as files

    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if files.TEMP_MARK in self.name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_unlink(self, missing_ok)

    def fill(tmp):
        tmp.write_text("half")
        raise ValueError("the writer's own error")

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(ValueError, match="the writer's own error"):
        files.atomic_write(tmp_path / "out.txt", fill)
    (left,) = tmp_path.iterdir()
    assert files.discard(left).errno == errno.EACCES  # reported to a caller that asks (remove_dead_temporaries)
    monkeypatch.undo()
    assert files.discard(left) is None and not left.exists()
    assert files.discard(left) is None  # gone already
