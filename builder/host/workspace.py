"""The output directory and the temporary workspace beside it.

Everything a build writes goes to a workspace inside the output directory (same filesystem,
so results are renamed into place atomically) and is only moved over earlier outputs when
the whole build succeeded. The workspace is removed on success, failure or interrupt. A
lock on the output directory refuses a second build of the same directory."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from builder.errors import InputError

log = logging.getLogger("amiforge.workspace")

WORKSPACE_PREFIX = ".amiforge-tmp-"


@contextlib.contextmanager
def output_directory(path: Path) -> Iterator[Path]:
    """Create (if needed) and lock ``path``; remove it again if we created it and the
    build left nothing in it."""
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{path}: the output directory is a file (or below one)") from None
    except PermissionError as exc:
        raise InputError(f"{path}: cannot create the output directory: {exc.strerror}") from None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise InputError(f"{path}: another amiforge build is using this output "
                                 "directory; wait for it or pick another --output-dir") from None
            raise
        remove_stale_workspaces(path)
        try:
            yield path
        finally:
            if created and not any(path.iterdir()):
                path.rmdir()
    finally:
        os.close(fd)


def remove_stale_workspaces(output_dir: Path) -> None:
    """Workspaces left by a build that was killed outright (SIGKILL, power loss); safe to
    remove because we hold the directory's lock."""
    for stale in output_dir.glob(WORKSPACE_PREFIX + "*"):
        remove_tree(stale)


@contextlib.contextmanager
def workspace(output_dir: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=WORKSPACE_PREFIX, dir=output_dir))
    try:
        yield path
    finally:
        remove_tree(path)


def remove_tree(path: Path, attempts: int = 20) -> None:
    """Remove a tree that an interrupted tool may still be writing to for a moment."""
    for _ in range(attempts):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.5)
    shutil.rmtree(path)  # the last try reports what could not be removed


@contextlib.contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """SIGINT and SIGTERM are noted, not acted on, for the duration: once results start to
    land in the output directory, landing them and removing the workspace finish, and the
    build has succeeded. Yields the signals that arrived."""
    arrived: list[int] = []
    previous = {signum: signal.signal(signum, lambda n, _frame: arrived.append(n))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield arrived
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if arrived:
            log.warning("interrupted while the results were landing: finished landing them")


_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def land(files: dict[Path, str], output_dir: Path) -> None:
    """Move finished files and folders (workspace path -> final name) into the output
    directory. A previous output of the same name is swapped with the new one, so it ends
    up in the workspace (removed afterwards) and there is no moment without either: and
    renaming over it would make ext4 write the new file out at once (auto_da_alloc), a
    large part of a warm rebuild for multi-GiB images."""
    for source, name in files.items():
        target = output_dir / name
        if not (target.exists() or target.is_symlink()):
            os.rename(source, target)
        elif not _exchange(source, target):
            os.rename(target, source.parent / f".replaced-{name}")
            os.rename(source, target)
