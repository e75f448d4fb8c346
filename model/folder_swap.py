"""Replacing a folder so that, killed at any instant, its name still holds a complete one.

    write_folder_atomically(folder, write)     # write(tmp) fills a fresh temp folder, then it is swapped in

Design choices:
- A checkpoint is a folder, and no single rename(2) replaces a non-empty
  folder. Moving the old one aside, then the new one in, leaves an instant
  with no folder at the name: a SIGKILL (OOM killer, a scheduler's kill)
  there lost the checkpoint. On Linux the two are swapped with one
  `renameat2(RENAME_EXCHANGE)` call, so the name always points at a complete
  folder, old or new. Where that call does not exist (macOS, old kernels,
  some filesystems), the two renames are used and the gap is repaired on the
  next save: a folder missing beside a `.NAME.old-PID` gets it back.
- Every file is fsynced before the swap and the parent directory after it,
  so the new folder is on disk before it becomes visible.
- A writer killed mid-save leaves `.NAME.tmp-PID` / `.NAME.old-PID` behind;
  the next save removes those whose process is gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from pathlib import Path
from typing import Callable

AT_FDCWD = -100
RENAME_EXCHANGE = 2  # linux/fs.h


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_renameat2 = _libc_renameat2()


def exchange(first: Path, second: Path) -> bool:
    """Atomically swap two existing paths; False where the system cannot (then nothing changed)."""
    if _renameat2 is None:
        return False
    result = _renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE)
    if result == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(second))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(folder: Path) -> list[Path]:
    """Temp and set-aside copies of `folder` left by writers that no longer run."""
    found = []
    for kind in ("tmp", "old"):
        for path in folder.parent.glob(f".{folder.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                found.append(path)
    return found


def repair_interrupted_swap(folder: Path) -> None:
    """A writer killed between its two renames left `folder` missing and the old copy aside: put it back."""
    if folder.exists():
        return
    set_aside = sorted((p for p in leftovers(folder) if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if set_aside:
        os.rename(set_aside[-1], folder)


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_directory(folder)


def fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def swap_in(tmp: Path, folder: Path, old: Path) -> Path | None:
    """Make `tmp` visible as `folder`; returns where the previous contents went (to delete), if any."""
    if not folder.exists():
        os.rename(tmp, folder)
        return None
    if exchange(tmp, folder):
        return tmp
    os.rename(folder, old)  # no exchange here: a gap, repaired by the next save (repair_interrupted_swap)
    os.rename(tmp, folder)
    return old


def write_folder_atomically(folder: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) on a fresh temp folder beside `folder`, then swap it into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    repair_interrupted_swap(folder)
    for stale in leftovers(folder):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    previous = None
    try:
        write(tmp)
        fsync_tree(tmp)  # data on disk before the swap makes it visible
        previous = swap_in(tmp, folder, old)
        fsync_directory(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return folder
