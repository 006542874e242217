"""The root filesystems of several disk images, read in one libguestfs appliance (one
launch, ~20 s under TCG, for both sides of a diff): each image's root mounted read-only
under a folder of its own, its files listed with their metadata and SHA-256."""

from __future__ import annotations

import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import InputError

STATUS_LIMIT = 64 << 20  # a dpkg status file larger than this is not one amiforge reads


@dataclass(frozen=True)
class FileEntry:
    kind: str            # file, dir, link, other
    mode: int            # permission bits (and setuid/setgid/sticky)
    uid: int
    gid: int
    size: int
    sha256: str | None   # regular files
    target: str | None   # symlinks

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mode": f"{self.mode:04o}", "uid": self.uid,
                "gid": self.gid, "size": self.size, "sha256": self.sha256,
                "target": self.target}


def _kind(mode: int) -> str:
    return ("file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else
            "link" if stat.S_ISLNK(mode) else "other")


class Roots:
    """``images``: (path, format) each; ``mount(i)`` mounts image i's root at /i."""

    def __init__(self, images: list[tuple[Path, str]]):
        from builder.audit.views import appliance

        self.images = images
        self.g: Any = appliance(list(images))
        self.roots = self._roots()

    def _roots(self) -> list[str]:
        """Each drive's root filesystem (devices, not fstab: two releases of a recipe share
        their filesystem UUIDs): found by os-release, or by libguestfs's inspection when
        that finds none on some drive."""
        from builder.audit.guestmounts import os_roots

        drives = list(self.g.list_devices())
        on = lambda root, drive: root == drive or (  # noqa: E731
            root.startswith(drive) and root[len(drive):].isdigit())
        try:
            found = os_roots(self.g)
        except ValueError as exc:  # a sealed volume, several roots: name no guess
            raise InputError(f"{', '.join(str(p) for p, _ in self.images)}: {exc}") from None
        if not all(any(on(r, drive) for r in found) for drive in drives):
            found = self.g.inspect_os()
        roots = []
        for (path, _), drive in zip(self.images, drives, strict=True):
            mine = sorted(r for r in found if on(r, drive))
            if len(mine) != 1:
                raise InputError(f"{path}: {'no' if not mine else 'more than one'} "
                                 "operating system found in the image")
            roots.append(mine[0])
        return roots

    def mount(self, number: int) -> str:
        prefix = f"/{number}"
        self.g.mkmountpoint(prefix)
        self.g.mount_ro(self.roots[number], prefix)
        return prefix

    def close(self) -> None:
        self.g.shutdown()
        self.g.close()

    def read_inside(self, prefix: str, path: str) -> str | None:
        """A file of that image (None if absent), refusing a path whose links lead out of
        its root (into the other image's)."""
        full = prefix + path
        if not self.g.exists(full):
            return None
        real = self.g.realpath(full)
        if not real.startswith(prefix + "/") or not self.g.is_file(real):
            return None
        if self.g.filesize(real) > STATUS_LIMIT:
            raise InputError(f"{path} in the image is larger than {STATUS_LIMIT >> 20} MiB")
        return bytes(self.g.read_file(real)).decode(errors="replace")

    def inventory(self, prefix: str) -> dict[str, FileEntry]:
        """Every path of the root filesystem (absolute, as in the image)."""
        sums = self._checksums(prefix)
        entries: dict[str, FileEntry] = {}
        pending = [prefix]
        while pending:
            top = pending.pop()
            names = self.g.ls(top)
            if not names:
                continue
            stats = self.g.lstatnslist(top, names)
            links = {n: t for n, t, info in zip(names, self._targets(top, names, stats),
                                                 stats, strict=True)
                     if stat.S_ISLNK(info["st_mode"])}
            for name, info in zip(names, stats, strict=True):
                full = top.rstrip("/") + "/" + name
                inside = full[len(prefix):]
                mode = info["st_mode"]
                if stat.S_ISREG(mode) and inside not in sums:
                    raise InputError(f"{inside[:200]!r} in the image: no checksum read")
                entries[inside] = FileEntry(_kind(mode), stat.S_IMODE(mode), info["st_uid"],
                                            info["st_gid"], info["st_size"], sums.get(inside),
                                            links.get(name))
                if stat.S_ISDIR(mode):
                    pending.append(full)
        return entries

    def _targets(self, top: str, names: list[str], stats: list[dict[str, int]]) -> list[str]:
        if not any(stat.S_ISLNK(s["st_mode"]) for s in stats):
            return [""] * len(names)
        return list(self.g.readlinklist(top, names))

    def _checksums(self, prefix: str) -> dict[str, str]:
        """path -> SHA-256 of every regular file (one call: sha256sum in the appliance)."""
        with tempfile.NamedTemporaryFile(prefix="amiforge-sums-") as out:
            self.g.checksums_out("sha256", prefix, out.name)
            return parse_sha256sum(Path(out.name).read_bytes().decode(errors="surrogateescape"))


_UNESCAPE = {"\\": "\\", "n": "\n", "r": "\r"}


def parse_sha256sum(text: str) -> dict[str, str]:
    """sha256sum's lines ("HASH  ./path"); a name holding a newline or a backslash is
    escaped, and its line starts with a backslash."""
    sums = {}
    for line in text.split("\n"):
        if not line:
            continue
        escaped = line.startswith("\\")
        digest, _, name = line[escaped:].partition("  ")
        if escaped:  # coreutils escapes a backslash, a newline and a carriage return
            name = re.sub(r"\\(.)", lambda m: _UNESCAPE.get(m[1], m[0]), name)
        sums["/" + name.removeprefix("./")] = digest
    return sums
