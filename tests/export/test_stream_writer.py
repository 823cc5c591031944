"""pretrain/export/safetensors_io.py StreamWriter as a context manager: the file appears whole
(read back by the safetensors library, an independent reader) or not at all."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pretrain.export.safetensors_io import StreamWriter

SPECS = [("a", (3, 2), torch.float32), ("b", (4,), torch.bfloat16)]


def test_rows_written_in_blocks_read_back_whole(tmp_path):
    a, b = torch.arange(6, dtype=torch.float32).view(3, 2), torch.tensor([1.5, -2, 0, 7], dtype=torch.bfloat16)
    with StreamWriter(tmp_path / "w.safetensors", SPECS, metadata={"step": 3}) as writer:
        writer.write(a[:2])
        writer.write(a[2:])
        writer.write(b)
    got = load_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_an_error_inside_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="disk"):
        with StreamWriter(tmp_path / "w.safetensors", SPECS) as writer:
            writer.write(torch.zeros(3, 2))
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_an_incomplete_file_is_refused_naming_the_tensor_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="tensor b was not written completely"):
        with StreamWriter(tmp_path / "w.safetensors", SPECS) as writer:
            writer.write(torch.zeros(3, 2))
    assert list(tmp_path.iterdir()) == []


def test_a_failing_close_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    """The file's last bytes or its rename meeting a full disk at close: the file it would replace
    stays as it was, and the unfinished temporary is removed."""
    import errno

    import pretrain.export.safetensors_io as io

    target = tmp_path / "w.safetensors"
    target.write_bytes(b"previous")

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "replace_with", full_disk)
    with pytest.raises(OSError, match="No space left"):
        with StreamWriter(target, SPECS) as writer:
            writer.write(torch.zeros(3, 2))
            writer.write(torch.zeros(4, dtype=torch.bfloat16))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"] and target.read_bytes() == b"previous"


def test_a_full_disk_during_a_write_is_raised_as_it_was_and_leaves_nothing(tmp_path):
    """A write meeting a full disk: the abort's close, flushing what was buffered, met it again and
    raised its own error from inside the first one's handling, before the unfinished temporary was
    removed (measured: tools/export.py onto a full 120 KiB tmpfs printed the close's traceback)."""
    import errno

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device (write)")

        def close(self):
            self.fh.close()
            raise OSError(errno.ENOSPC, "No space left on device (close)")

    with pytest.raises(OSError, match=r"\(write\)"):
        with StreamWriter(tmp_path / "w.safetensors", SPECS) as writer:
            writer._fh = FullDisk(writer._fh)
            writer.write(torch.zeros(3, 2))
    assert list(tmp_path.iterdir()) == []
