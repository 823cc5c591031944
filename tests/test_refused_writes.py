"""pretrain.refused_writes reads the errno behind each writer's own error: torch.save through a
file object, safetensors, torch.save to a path (no errno: the free space decides)."""

from __future__ import annotations

import errno
import io
import resource
import signal

import pytest
import torch

from pretrain.refused_writes import describe, errno_of, is_write_failure, mib


class _FullFile(io.RawIOBase):
    """A file that takes `room` bytes, then refuses as a full disk does."""

    def __init__(self, room: int):
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return len(data)


def _under_file_size_limit(fn, limit: int = 4096):
    """fn() with the kernel refusing writes past `limit` bytes in any file (EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        fn()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_torch_through_a_file_object_keeps_the_errno(tmp_path):
    with pytest.raises(RuntimeError, match="inline_container") as raised:
        torch.save({"w": torch.zeros(10_000)}, _FullFile(room=1000))
    assert is_write_failure(raised.value)
    assert errno_of(raised.value) == errno.ENOSPC
    refused = describe(raised.value, tmp_path, room="give train.run_dir a filesystem with room", needed=3 << 20)
    assert refused.reason.startswith("its filesystem is full: ") and refused.reason.endswith(" free there")
    assert refused.fix == "Free space there (it needs about 3.0 MiB), or give train.run_dir a filesystem with room"
    assert refused.detail.startswith("The writer's own words: [enforce fail at inline_container.cc")


def test_safetensors_names_its_errno_in_its_text(tmp_path):
    from safetensors.torch import save_file

    failed = []

    def write():
        try:
            save_file({"w": torch.zeros(10_000)}, str(tmp_path / "t.safetensors"))
        except Exception as err:  # safetensors' own SafetensorError
            failed.append(err)

    _under_file_size_limit(write)
    assert failed and is_write_failure(failed[0])
    assert errno_of(failed[0]) == errno.EFBIG
    assert describe(failed[0], tmp_path).reason == "a file grew past the size limit of this process (ulimit -f)"


def test_torch_to_a_path_has_no_errno_and_room_left_is_not_called_full(tmp_path):
    """torch's C++ file writer drops the errno: with room on the filesystem (a quota, a limit) the
    message must not claim the disk is full."""
    failed = []

    def write():
        try:
            torch.save({"w": torch.zeros(10_000)}, str(tmp_path / "t.pt"))
        except RuntimeError as err:
            failed.append(err)

    _under_file_size_limit(write)
    assert failed and is_write_failure(failed[0]) and errno_of(failed[0]) is None
    refused = describe(failed[0], tmp_path)
    assert refused.reason.startswith("the filesystem refused a write (") and "full" not in refused.reason


def test_an_oserror_keeps_only_its_file_as_detail(tmp_path):
    err = OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "x"))
    refused = describe(err, tmp_path / "not" / "yet" / "made")  # the space of the nearest existing folder
    assert refused.reason.startswith("your disk quota there is used up (") and "unknown" not in refused.reason
    assert refused.detail == f"The file: {tmp_path / 'x'}"
    assert not is_write_failure(ValueError("I/O error"))  # a fault of the code, whatever its words


def test_sizes_read_as_people_read_them():
    assert [mib(n) for n in (0, 3000, 1536 * 1024, 12 << 20, 4821 << 20)] == [
        "0 MiB",
        "3 KiB",
        "1.5 MiB",
        "12 MiB",
        "4,821 MiB",
    ]
