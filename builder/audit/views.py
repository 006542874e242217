"""Read-only views of a root filesystem: a tree on the host, or a disk image via guestfs."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from builder.audit.guestmounts import Unauditable, fstab_mounts, mount_checked, os_roots


@dataclass(frozen=True)
class Node:
    path: str      # absolute inside the image
    mode: int
    uid: int
    size: int

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class View(Protocol):
    def walk(self) -> Iterator[Node]: ...
    def read(self, path: str, limit: int = 1 << 20) -> bytes | None: ...
    def listdir(self, path: str) -> list[str]: ...
    def is_symlink(self, path: str) -> bool: ...


class TreeView:
    """A root tree on the host (the build's configured tree)."""

    def __init__(self, root: Path):
        self.root = root

    def _host(self, path: str) -> Path:
        """Folders on the way are resolved inside the tree (an image's ``root -> /root``
        link must not make the audit read the host's files); the last component is not."""
        from builder.host.treepath import in_root

        return in_root(self.root, path, follow_last=False)

    def walk(self) -> Iterator[Node]:
        for top, dirs, files in os.walk(self.root):
            dirs.sort()
            for name in sorted(dirs + files):
                host = os.path.join(top, name)
                info = os.lstat(host)
                yield Node("/" + os.path.relpath(host, self.root), info.st_mode, info.st_uid,
                           info.st_size)

    def read(self, path: str, limit: int = 1 << 20) -> bytes | None:
        host = self._host(path)
        if host.is_symlink() or not host.is_file():
            return None
        with open(host, "rb") as handle:
            return handle.read(limit)

    def listdir(self, path: str) -> list[str]:
        host = self._host(path)
        return sorted(os.listdir(host)) if host.is_dir() and not host.is_symlink() else []

    def is_symlink(self, path: str) -> bool:
        return self._host(path).is_symlink()


def appliance(drives: list[tuple[Path, str | None]]) -> Any:
    """A launched libguestfs appliance with these disk images attached read-only (each in
    its format, when known): TCG, as these machines have no working KVM."""
    import guestfs  # Debian's python3-guestfs; the venv sees system site-packages

    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    handle = guestfs.GuestFS(python_return_dict=True)
    for image, fmt in drives:
        handle.add_drive_opts(str(image), readonly=True, **({"format": fmt} if fmt else {}))
    handle.launch()
    return handle


class GuestView:
    """A disk image opened read-only with libguestfs, its filesystems mounted as the
    guest would mount them: its root, then what its fstab mounts (builder.audit.guestmounts),
    each on a mount point checked inside the image."""

    def __init__(self, image: Path, fmt: str | None = None):
        self.g: Any = appliance([(image, fmt)])
        try:
            self._mount_all()
        except BaseException:
            self.close()
            raise

    def _mount_all(self) -> None:
        roots = os_roots(self.g)
        if not roots:  # LVM, RAID, or an OS without os-release: inspection's turn
            roots = list(self.g.inspect_os())
            if len(roots) > 1:
                raise Unauditable(f"more than one operating system ({', '.join(roots)})")
        if not roots:
            raise ValueError("no operating system found in the image")
        self.g.mount_ro(roots[0], "/")
        mounts = fstab_mounts(self.g, lambda: self._inspected_mounts(roots[0]))
        for mountpoint in sorted(mounts, key=len):
            mount_checked(self.g, mounts[mountpoint], mountpoint)

    def _inspected_mounts(self, root: str) -> dict[str, str]:
        """Inspection's mount points (it maps fstab's device paths to the appliance's);
        inspect_os unmounts everything, so the root is mounted again."""
        self.g.inspect_os()
        mounts = self.g.inspect_get_mountpoints(root)
        self.g.umount_all()
        self.g.mount_ro(root, "/")
        return mounts

    def close(self) -> None:
        self.g.shutdown()
        self.g.close()

    def walk(self) -> Iterator[Node]:
        for top in self._dirs("/"):
            names = self.g.ls(top)
            if not names:
                continue
            stats = self.g.lstatnslist(top, names)
            for name, info in zip(names, stats, strict=True):
                path = (top.rstrip("/") + "/" + name)
                yield Node(path, info["st_mode"], info["st_uid"], info["st_size"])

    def _dirs(self, top: str) -> Iterator[str]:
        yield top
        names = self.g.ls(top)
        if not names:
            return
        for name, info in zip(names, self.g.lstatnslist(top, names), strict=True):
            if stat.S_ISDIR(info["st_mode"]) and not (top == "/" and name in ("proc", "sys")):
                yield from self._dirs(top.rstrip("/") + "/" + name)

    def read(self, path: str, limit: int = 1 << 20) -> bytes | None:
        if not self.g.is_file(path, followsymlinks=False):
            return None
        return self.g.pread(path, limit, 0)

    def listdir(self, path: str) -> list[str]:
        if not self.g.is_dir(path, followsymlinks=False):
            return []
        return sorted(self.g.ls(path))

    def is_symlink(self, path: str) -> bool:
        return bool(self.g.exists(path) and self.g.is_symlink(path))
