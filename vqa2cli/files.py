"""Writing files so that a crash, a kill or a second process never leaves a half-written one where a good
one was, with the permissions the user's umask asks for.

- `replacing(path)`: write a temporary file beside `path`; on success it is synced and renamed over it
  (`write_text` for the common case).
- `staged_dir(target)` / `install_dir(tmp, target)`: fill a temporary folder; on success it is synced and
  takes `target`'s place whole, or (`merge`) its files are moved into the existing `target` one by one.
- `FolderLock`: one process at a time in a folder, for as long as it runs; `remove_leftovers` then clears
  what killed writes left there.

Temporary files and folders are created private (0600/0700, by `tempfile` and by safetensors); they are
given the umask's modes (0644/0755 under umask 022) only once complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from vqa2cli.errors import SetupError


def umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which
    would briefly give files other threads create the wrong mode)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike):
    """A temporary path beside `path` to write to; renamed over `path` when the block ends without an
    exception, removed when it raises."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """`path` holds `text` (UTF-8), or, after a crash, what it held before."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def install_dir(tmp: Path, target: Path, merge: bool = False, last: tuple[str, ...] = ()) -> Path:
    """Put the complete folder `tmp` in place as `target`: it replaces `target` whole (an existing one is
    moved aside first and deleted after), or with `merge` its files are moved into the existing `target`
    one by one, those named in `last` last (a file that marks the folder as complete), and `tmp` removed."""
    for file in (p for p in tmp.rglob("*") if p.is_file()):
        os.chmod(file, 0o666 & ~umask())
        _fsync(file)
    if merge:
        for file in sorted(tmp.iterdir(), key=lambda p: p.name in last):
            os.replace(file, target / file.name)
        shutil.rmtree(tmp)
    else:
        os.chmod(tmp, 0o777 & ~umask())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(old / target.name)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    _fsync(target if merge else target.parent)  # the renames are durable once their folder is synced
    return target


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, merge: bool = False, last: tuple[str, ...] = ()):
    """A temporary folder to write `target`'s contents into; installed by `install_dir` when the block
    ends without an exception, removed when it raises. With `merge`, the temporary folder is made inside
    `target` (so on the same file system), and `target` made first if need be."""
    target = Path(target)
    parent = target if merge else target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        yield tmp
        install_dir(tmp, target, merge=merge, last=last)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_leftover(name: str) -> bool:
    """Whether a file name is one of the temporaries above (left behind when a write was killed)."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def remove_leftovers(folder: Path) -> None:
    """Delete what writes killed half-way left in `folder`; only for a folder no other process writes to
    (one this process holds a FolderLock on)."""
    for path in folder.iterdir():
        if not is_leftover(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class FolderLock:
    """An exclusive lock on a folder, held from `acquire()` until `release()` or the process's end.

    It is an flock on a file in the folder, so the kernel drops it when the holder dies however it dies
    (SIGKILL included): a lock file left by a killed process is free and is taken over. The file says who
    holds it (pid, host, start time), for the message a second process gets.
    """

    def __init__(self, folder: str | os.PathLike, name: str = ".lock", label: str | None = None,
                 holder: str = "another process"):
        self.path = Path(folder) / name
        self.label = label or str(folder)  # how messages name the folder
        self.holder = holder  # how messages name whoever holds it
        self.fd: int | None = None

    def acquire(self) -> dict | None:
        """Take the lock; SetupError naming the holder when another process has it. Returns what a dead
        holder left in the file (pid, host, started), or None."""
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                raise SetupError(f"{self.label} is in use by {self.holder} ({_describe(holder)}); wait for it to "
                                 "end, or choose another folder") from None
            try:  # a holder that released meanwhile unlinked the file we opened: lock the new one
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        left = _read_holder(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return left

    def release(self) -> None:
        if self.fd is None:
            return
        # unlinked before it is unlocked: a process waiting on this file then sees it is gone (see acquire)
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0))
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not isinstance(holder, dict):
        return "it has not said who it is yet"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
