"""Where an image's filesystems mount, read inside a libguestfs appliance: its root (the
filesystem with an os-release file) and what its /etc/fstab mounts, or libguestfs's own
inspection where the image is not that simple. The image is a stranger's: an fstab read
differently from the way the booted system reads it, or a mount point that leads through a
symlink, would let it show the audit other files than it boots with."""

from __future__ import annotations

import contextlib
import posixpath
import re
from typing import Any

LINUX_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs"})
# what only inspection sees into (an LVM volume group, a RAID array, an encrypted volume)
CONTAINERS = frozenset({"LVM2_member", "linux_raid_member", "crypto_LUKS"})
OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")
FSTAB_LIMIT = 100 << 10  # libguestfs's inspection reads no larger fstab either
PSEUDO = frozenset({"swap", "proc", "sysfs", "tmpfs", "devpts", "none", "nfs", "nfs4",
                    "cifs", "9p", "fuse", "efivarfs", "debugfs", "securityfs"})


def os_roots(g: Any) -> list[str]:
    """The devices (partitions, or whole disks without a partition table) that hold an
    operating system's root: a Linux filesystem with /etc and an os-release file, each
    mounted read-only for a moment to look. About 3 s under TCG, where inspect_os takes
    about 35 s (it probes every filesystem for every kind of OS). Empty when the image
    has a container only inspection opens (LVM, RAID, LUKS): callers fall back to it."""
    partitions = list(g.list_partitions())
    parted = {g.part_to_dev(p) for p in partitions}
    roots = []
    for device in [*partitions, *(d for d in g.list_devices() if d not in parted)]:
        kind = g.vfs_type(device)
        if kind in CONTAINERS:
            return []
        if kind in LINUX_FILESYSTEMS and _holds_os_release(g, device):
            roots.append(device)
    return roots


def _holds_os_release(g: Any, device: str) -> bool:
    try:
        g.mount_ro(device, "/")
    except RuntimeError:
        return False
    try:
        return bool(g.is_dir("/etc") and any(g.exists(path) for path in OS_RELEASE))
    finally:
        g.umount_all()


def fstab_mounts(g: Any) -> dict[str, str] | None:
    """mount point -> device for the mounted root's /etc/fstab, read as libmount reads it
    (a comment is a line that starts with #; fields split at spaces and tabs; \\ooo escapes),
    without noauto, swap and network entries, the first entry for a mount point winning
    (as systemd's fstab generator does). None when an entry names its device other than by
    filesystem UUID or label (device paths, PARTUUID): inspection maps those. An fstab
    larger than 100 KiB is refused."""
    path = "/etc/fstab"
    if not g.is_file(path, followsymlinks=True):
        return {}
    if g.filesize(path) > FSTAB_LIMIT:
        raise ValueError(f"{path} is larger than {FSTAB_LIMIT >> 10} KiB")
    text = bytes(g.read_file(path)).decode(errors="surrogateescape")
    mounts: dict[str, str] = {}
    found: dict[str, str | None] = {}
    for line in text.split("\n"):
        entry = fstab_entry(line)
        if entry is None:
            continue
        spec, mountpoint = entry
        if mountpoint == "/":  # the root is the one os_roots found
            continue
        kind, _, value = spec.partition("=")
        if kind not in ("UUID", "LABEL") or not value:
            return None
        if spec not in found:
            find = g.findfs_uuid if kind == "UUID" else g.findfs_label
            try:
                found[spec] = find(value)
            except RuntimeError:  # not attached (a volume of the mapping): nothing to audit
                found[spec] = None
        if found[spec] is not None:
            mounts.setdefault(mountpoint, found[spec])  # type: ignore[arg-type]
    return mounts


def fstab_entry(line: str) -> tuple[str, str] | None:
    """(device, mount point) of an fstab line that mounts a local filesystem, or None."""
    fields = re.split(r"[ \t]+", line.strip(" \t\r"))
    if not fields[0] or fields[0].startswith("#") or len(fields) < 2:
        return None
    spec, mountpoint = (_unescape(f) for f in fields[:2])
    kind = fields[2] if len(fields) > 2 else "auto"
    options = fields[3].split(",") if len(fields) > 3 else []
    if kind in PSEUDO or "noauto" in options or mountpoint in ("none", "swap"):
        return None
    return spec, mountpoint


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def safe_mountpoint(g: Any, mountpoint: str) -> bool:
    """A mount point the audit may mount on: absolute, written plainly (not / again as //,
    /. or /x/..), and an existing folder reached without symlinks inside the image (a link
    on the way would lead the appliance's mount outside the image's tree)."""
    plain = (mountpoint.startswith("/") and not mountpoint.startswith("//")
             and posixpath.normpath(mountpoint) == mountpoint and mountpoint != "/")
    if not plain:
        return False
    with contextlib.suppress(RuntimeError):
        return bool(g.realpath(mountpoint) == mountpoint
                    and g.is_dir(mountpoint, followsymlinks=False))
    return False
