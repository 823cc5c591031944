"""tools/bench_shard_check.py: its --dir is checked when parsed, and made when missing."""

from __future__ import annotations

import pytest

from tools import bench_shard_check


def test_dir_that_is_a_file_is_refused_and_a_missing_one_is_made(tmp_path, capsys):
    """--dir naming a file crashed with NotADirectoryError, a folder not made yet with
    FileNotFoundError (tempfile.TemporaryDirectory), both as tracebacks."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as exit_:
        bench_shard_check.main(["--dir", str(a_file), "--shards", "3", "--repeats", "1"])
    assert exit_.value.code == 2 and f"argument --dir: {a_file} is a file, not a folder" in capsys.readouterr().err
    missing = tmp_path / "new" / "bench"
    assert bench_shard_check.main(["--dir", str(missing), "--shards", "3", "--repeats", "1"]) == 0
    assert "3 shards: first check" in capsys.readouterr().out
    assert missing.is_dir() and list(missing.iterdir()) == []  # the temporary dataset is removed
