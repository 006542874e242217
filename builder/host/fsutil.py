"""File helpers: atomic writes, sparse-aware copies, allocated sizes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from builder.errors import InputError


def read_regular_file(path: Path, limit: int, label: str,
                      error: type[Exception] = OSError, follow_links: bool = True) -> bytes:
    """The bytes of ``path``, refused (``error``, messages starting with ``label``) unless
    it is a regular file of at most ``limit`` bytes: no FIFO that blocks, no /dev/zero
    that never ends, no folder; without ``follow_links``, no symlink either."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(f"{label}: cannot read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{label}: not a regular file")
        if info.st_size > limit:
            raise error(f"{label}: larger than {limit} bytes")
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(limit + 1)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_replace(path: Path, mode: int) -> Iterator[BinaryIO]:
    """A stream to a new file of a random hidden name beside ``path`` (created exclusively),
    synced and renamed to ``path`` when the block ends; removed if it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary name beside ``path`` and rename it into place."""
    with _atomic_replace(path, mode) as handle:
        handle.write(data)


def atomic_copy(source: Path, path: Path, mode: int = 0o644) -> None:
    """Copy ``source`` to a temporary name beside ``path`` and rename it into place."""
    with _atomic_replace(path, mode) as handle, source.open("rb") as stream:
        shutil.copyfileobj(stream, handle, 1 << 20)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    """A JSON file a build wrote (or someone edited): a one-line InputError if it is
    missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not found (is this a build output directory?)") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, nesting, huge numbers
        raise InputError(f"{path}: not valid JSON ({str(exc)[:100]})") from None


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each data region of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after offset
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        offset = end


def copy_sparse(src: Path, dst: Path, dst_offset: int = 0) -> None:
    """Copy the data regions of ``src`` into ``dst`` at ``dst_offset``, leaving holes."""
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        size = os.fstat(fin.fileno()).st_size
        for start, length in data_extents(fin.fileno(), size):
            copied = 0
            while copied < length:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), length - copied,
                                       start + copied, dst_offset + start + copied)
                if n == 0:
                    raise OSError(f"short copy from {src}")
                copied += n


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def create_sparse(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        handle.truncate(size)


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512
