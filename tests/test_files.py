"""fedrg.files: the one helper for atomic writes and key files."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrg import files


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@settings(max_examples=25, deadline=None)
@given(old=st.binary(max_size=64), new=st.binary(max_size=64) | st.text(max_size=32))
def test_atomic_write_replaces_the_whole_content(tmp_path_factory, old, new):
    path = tmp_path_factory.mktemp("aw") / "sub" / "f.bin"
    files.atomic_write(path, old)
    files.atomic_write(path, new)
    assert path.read_bytes() == (new.encode() if isinstance(new, str) else new)
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]  # no temporary left


@pytest.mark.parametrize("mode", [files.PRIVATE_MODE, files.PUBLIC_MODE, 0o700])
def test_atomic_write_sets_the_mode_and_a_secret_is_never_readable_by_others(tmp_path, monkeypatch, mode):
    seen = []
    real_fsync = os.fsync

    def fsync(fd):  # the temporary file's mode while the data is in it
        if stat.S_ISREG(os.fstat(fd).st_mode):
            seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = files.atomic_write(tmp_path / "k", b"secret", mode=mode)
    assert _mode(path) == mode and seen == [0o600]


def test_a_failed_replace_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    files.atomic_write(path, b"old")

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["ledger.jsonl"]


def test_create_private_is_0600_and_never_overwrites_a_key(tmp_path):
    key = files.create_private(tmp_path / "state" / "key.pem", b"k1")
    assert _mode(key) == 0o600 and key.read_bytes() == b"k1"
    with pytest.raises(FileExistsError):
        files.create_private(key, b"k2")
    assert key.read_bytes() == b"k1"
