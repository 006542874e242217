"""Paths inside a root tree, resolved the way the image will see them.

A tree made by mmdebstrap has absolute symlinks (``var/run -> /run``), and a recipe's
scripts can add more (``var/tmp -> /tmp``, ``etc/machine-id -> /etc/shadow``). Joining
``tree / "var/run/x"`` and letting the host kernel follow those links writes onto the
build host. Every path amiforge touches inside a tree goes through :func:`in_root`, which
resolves it like openat2's ``RESOLVE_IN_ROOT``: absolute link targets are re-rooted at the
tree and ``..`` never climbs above it. Nothing else runs in the tree while amiforge works on
it (scripts run in a PID namespace that dies with them), so resolving first and then acting
is not racy.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import os
import shutil
import stat
from pathlib import Path

from builder.errors import BuildFailed
from builder.host.fsutil import read_regular_file

MAX_LINKS = 40  # as the kernel's path walk
MAX_TEXT = 256 << 20  # a dpkg status file of a large image is a few MiB


def in_root(root: Path, path: str, *, follow_last: bool = True) -> Path:
    """The host path of ``path`` (absolute inside the image) with every symlink on the way
    resolved inside ``root``. Without ``follow_last`` the last component is left as it is
    (a symlink there is the caller's to refuse or to remove)."""
    pending = [p for p in reversed(path.split("/")) if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while pending:
        name = pending.pop()
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        host = os.path.join(root, *resolved, name)
        if not pending and not follow_last:
            resolved.append(name)
            break
        try:
            info = os.lstat(host)
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(name)
            continue
        if not stat.S_ISLNK(info.st_mode):
            resolved.append(name)
            continue
        links += 1
        if links > MAX_LINKS:
            raise BuildFailed(f"{path}: too many levels of symbolic links in the image")
        target = os.readlink(host)
        if target.startswith("/"):
            resolved = []
        pending += [p for p in reversed(target.split("/")) if p not in ("", ".")]
    return Path(root, *resolved)


def make_dirs(root: Path, path: str, mode: int = 0o755) -> Path:
    """``mkdir -p`` of ``path`` inside ``root``; returns the host path of the folder."""
    host = in_root(root, path)
    try:
        host.mkdir(mode=mode, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BuildFailed(f"{path}: a file in the image is in the way of this folder") from None
    return host


def _open_new(root: Path, dest: str, mode: int) -> tuple[int, Path]:
    parent, name = dest.rstrip("/").rsplit("/", 1) if "/" in dest else ("", dest)
    folder = make_dirs(root, parent or "/")
    host = folder / name
    try:
        fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR):
            raise BuildFailed(f"{dest} is a symlink or folder in the image; "
                              "refusing to write through it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BuildFailed(f"{dest} is not a regular file in the image")
    return fd, host


def write_file(root: Path, dest: str, data: bytes | str, mode: int = 0o644,
               owner: tuple[int, int] | None = None, replace_link: bool = False) -> Path:
    """Write a regular file at ``dest`` inside ``root``, never through a symlink: a link at
    ``dest`` is refused, or replaced by the file with ``replace_link``."""
    if replace_link:
        remove(root, dest)
    fd, host = _open_new(root, dest, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        os.fchmod(handle.fileno(), mode)
        if owner is not None:
            os.fchown(handle.fileno(), *owner)
    return host


def copy_in(root: Path, source: Path, dest: str, mode: int,
            owner: tuple[int, int] | None = None, sha256: str | None = None) -> Path:
    """Copy a host file (already checked by the recipe loader) to ``dest`` in ``root``.
    With ``sha256`` (the digest the plan and the cache key hold), the bytes copied must be
    those bytes: a file changed since the plan was made fails the build."""
    fd, host = _open_new(root, dest, mode)
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
        while block := src.read(1 << 20):
            digest.update(block)
            out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise BuildFailed(f"{source} changed while the image was being built "
                              f"(sha256 {digest.hexdigest()[:12]}..., planned {sha256[:12]}...)")
        os.fchmod(out.fileno(), mode)
        if owner is not None:
            os.fchown(out.fileno(), *owner)
    return host


def read_text(root: Path, path: str, limit: int = MAX_TEXT) -> str:
    """A text file of the image (``/etc/passwd``), read inside the tree; a path the host
    cannot even look up (too long, a NUL byte) is refused like a missing file."""
    try:
        host = in_root(root, path)
        data = read_regular_file(host, limit, f"{path} in the image", BuildFailed,
                                 follow_links=False)
    except (OSError, ValueError) as exc:
        raise BuildFailed(f"{path!r} in the image: {exc}") from None
    return data.decode(errors="replace")


def remove(root: Path, path: str) -> None:
    """Remove ``path`` (a file, a link or a whole folder) inside ``root``; the link itself,
    never what it points to."""
    host = in_root(root, path, follow_last=False)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        if host.is_dir() and not host.is_symlink():
            shutil.rmtree(host)  # does not follow symlinks inside
        else:
            host.unlink()


def matching(root: Path, pattern: str) -> list[str]:
    """Image paths matching ``pattern`` (``/var/tmp/*``: wildcards in the last component
    only); the folder is resolved inside ``root``."""
    folder, name_pattern = pattern.rsplit("/", 1)
    host = in_root(root, folder or "/")
    if not host.is_dir():
        return []
    return [f"{folder}/{name}" for name in sorted(os.listdir(host))
            if fnmatch.fnmatchcase(name, name_pattern)]
