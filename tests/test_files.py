"""vqa2cli.files: atomic writes with the umask's modes, and the folder lock."""

import os
import stat

import pytest

from vqa2cli.errors import SetupError
from vqa2cli.files import FolderLock, remove_leftovers, replacing, staged_dir, write_text


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path, umask_027):
    target = tmp_path / "labels.csv"
    write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["labels.csv"]
    write_text(target, "new\n")
    assert target.read_text() == "new\n" and mode(target) == 0o640


def test_staged_dir_installs_whole_or_merges_with_the_umask_modes(tmp_path, umask_027):
    target = tmp_path / "model"
    with staged_dir(target) as tmp:
        (tmp / "weights").write_bytes(b"1")
        os.chmod(tmp / "weights", 0o600)  # as safetensors writes its files
    assert mode(target) == 0o750 and mode(target / "weights") == 0o640
    with pytest.raises(OSError):
        with staged_dir(target) as tmp:
            (tmp / "weights").write_bytes(b"2")
            raise OSError("disk full")
    assert (target / "weights").read_bytes() == b"1" and [p.name for p in tmp_path.iterdir()] == ["model"]
    (target / "log").write_text("mine")
    with staged_dir(target, merge=True, last=("config.json",)) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "weights").write_bytes(b"3")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "log", "weights"]
    assert (target / "weights").read_bytes() == b"3" and (target / "log").read_text() == "mine"


def test_one_lock_holder_at_a_time_and_leftovers(tmp_path):
    first, second = FolderLock(tmp_path, holder="another run"), FolderLock(tmp_path, holder="another run")
    assert first.acquire() is None
    with pytest.raises(SetupError, match=rf"^{tmp_path} is in use by another run \(pid {os.getpid()} on .*, started "):
        second.acquire()
    first.release()
    assert not (tmp_path / ".lock").exists()
    second.acquire()
    second.release()
    (tmp_path / ".model.tmp-x1").mkdir()
    (tmp_path / ".meta.json.tmp-y2").write_text("half")
    (tmp_path / "keep.tmp-z").write_text("a user's")
    remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.tmp-z"]
