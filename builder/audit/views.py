"""Read-only views of a root filesystem: a tree on the host, or a disk image via guestfs."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


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


LINUX_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs"})
OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")


def os_roots(g: Any) -> list[str]:
    """The devices (partitions, or whole disks without a partition table) that hold an
    operating system's root: a Linux filesystem with an os-release file. Each is mounted
    read-only for a moment to look. About 3 s under TCG, where libguestfs's inspect_os
    takes about 35 s (it probes every filesystem for every kind of OS); callers fall back
    to inspect_os when this finds nothing (LVM, other systems)."""
    partitions = list(g.list_partitions())
    parted = {g.part_to_dev(p) for p in partitions}
    roots = []
    for device in [*partitions, *(d for d in g.list_devices() if d not in parted)]:
        with contextlib.suppress(RuntimeError):
            if g.vfs_type(device) not in LINUX_FILESYSTEMS:
                continue
            g.mount_ro(device, "/")
            try:
                if g.is_dir("/etc") and any(g.exists(path) for path in OS_RELEASE):
                    roots.append(device)
            finally:
                g.umount_all()
    return roots


def fstab_mounts(g: Any) -> dict[str, str]:
    """mount point -> device, from the mounted root's /etc/fstab: the entries named by
    filesystem UUID or label (what amiforge writes, and what a cloud image uses), resolved
    to the appliance's devices. Other entries (swap, device paths) are left out."""
    if not g.is_file("/etc/fstab"):
        return {}
    mounts = {}
    for line in g.read_lines("/etc/fstab"):
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or not fields[1].startswith("/") or fields[1] == "/":
            continue
        kind, _, value = fields[0].partition("=")
        find = {"UUID": g.findfs_uuid, "LABEL": g.findfs_label}.get(kind)
        if find is not None and value:
            with contextlib.suppress(RuntimeError):
                mounts[fields[1]] = find(value)
    return mounts


class GuestView:
    """A disk image opened read-only with libguestfs, its filesystems mounted as the
    guest would mount them (its root, then what its fstab names)."""

    def __init__(self, image: Path, fmt: str | None = None):
        self.g: Any = appliance([(image, fmt)])
        roots = os_roots(self.g)
        if roots:
            self.g.mount_ro(roots[0], "/")
            mounts = fstab_mounts(self.g)
        else:
            inspected = self.g.inspect_os()
            if not inspected:
                raise ValueError(f"{image}: no operating system found in the image")
            mounts = self.g.inspect_get_mountpoints(inspected[0])
        for mountpoint in sorted(mounts, key=len):
            # e.g. swap or an absent data volume: audit what mounts
            with contextlib.suppress(RuntimeError):
                self.g.mount_ro(mounts[mountpoint], mountpoint)

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
