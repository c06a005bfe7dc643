"""Atomic file writes and directory swaps, shared by every stage that writes output others may read."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it onto `path`: readers,
    and reruns after a crash, never see a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_can_create_dir(path: str | Path, what: str = "output directory") -> None:
    """Before any work: `path` is a directory already, or one that can be made (its nearest existing
    parent is a directory this process may write in)."""
    path = Path(path).absolute()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{what} {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{what} {path} is not writable")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot create {what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {what} {path}: {parent} is not writable")


def first_line(err: BaseException) -> str:
    """An error's message cut to its first line (libraries' messages run on with advice), or its type."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def new_staging_dir(parent: Path, prefix: str) -> Path:
    """A fresh directory under parent to assemble output in, with the mode a plain mkdir would give
    (tempfile's are private, 0700, which others on shared storage could not read once it is renamed)."""
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(staging, 0o777 & ~current_umask())
    return staging


def replace_directory(new: Path, final: Path) -> None:
    """Put the directory `new` where `final` is, the old `final` staying in place until the new one
    is: one atomic exchange where the kernel offers it (Linux's renameat2 with RENAME_EXCHANGE), else
    the old one renamed aside first. Then the old one is removed."""
    if not final.exists():
        new.rename(final)
        return
    if not _exchange(new, final):
        aside = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-old-"))
        aside.rmdir()
        final.rename(aside)
        new.rename(final)
        new = aside
    shutil.rmtree(new)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where this system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # not supported here
        return False
    raise OSError(ctypes.get_errno(), f"cannot swap {a} and {b}: {os.strerror(ctypes.get_errno())}")
