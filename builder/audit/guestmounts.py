"""Where an image's filesystems mount, read inside a libguestfs appliance: its root (the
filesystem with /etc and an os-release file) and what its /etc/fstab mounts.

The image is a stranger's, and the audit must see the files the booted instance sees at
the same paths. So wherever readers could disagree, the image is refused (Unauditable)
rather than guessed about: an fstab line glibc's getmntent (systemd up to 257) and libmount
would read differently, bind and overlay mounts, btrfs subvolumes, encrypted volumes, two
candidate roots, a mount point that is not a plain folder of the image, a filesystem of the
image that does not mount. Device paths in fstab (/dev/xvda1) are mapped by libguestfs's
inspection; UUID= and LABEL= by blkid in the appliance."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

LINUX_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs"})
CONTAINERS = frozenset({"LVM2_member", "linux_raid_member"})  # inspection opens these
SEALED = frozenset({"crypto_LUKS", "zfs_member", "BitLocker"})  # nothing here does
OS_RELEASE = ("/etc/os-release", "/usr/lib/os-release")
FSTAB = "/etc/fstab"
FSTAB_LIMIT = 100 << 10  # libguestfs's inspection reads no larger fstab either
LINE_LIMIT = 4094        # glibc's getmntent drops the rest of a longer line
ESCAPES = {"040": " ", "011": "\t", "012": "\n", "134": "\\"}  # what glibc decodes
PSEUDO = frozenset({"swap", "proc", "sysfs", "tmpfs", "devpts", "devtmpfs", "none", "nfs",
                    "nfs4", "cifs", "9p", "efivarfs", "debugfs", "securityfs", "cgroup2"})


class Unauditable(ValueError):
    """The image could show the audit other files than the instance boots with."""


def os_roots(g: Any) -> list[str]:
    """The devices (partitions, or whole disks without a partition table) that hold an
    operating system's root: a Linux filesystem with /etc and an os-release file, each
    mounted read-only for a moment to look. About 3 s under TCG, where inspect_os takes
    about 35 s. Empty when the image has LVM or RAID (callers ask inspection)."""
    partitions = list(g.list_partitions())
    parted = {g.part_to_dev(p) for p in partitions}
    roots, with_etc = [], {}  # drive -> its filesystems with /etc
    for device in [*partitions, *(d for d in g.list_devices() if d not in parted)]:
        kind = g.vfs_type(device)
        if kind in SEALED:
            raise Unauditable(f"{device} is {kind}: the audit cannot see inside it")
        if kind in CONTAINERS:
            return []
        if kind in LINUX_FILESYSTEMS:
            has_etc, has_release = _look(g, device)
            if has_etc:
                drive = g.part_to_dev(device) if device in partitions else device
                with_etc.setdefault(drive, []).append(device)
                if has_release:
                    roots.append(device)
    for devices in with_etc.values():
        if len(devices) > 1:  # which one boots is the bootloader's choice
            raise Unauditable(f"more than one filesystem holds /etc ({', '.join(devices)}): "
                              "which one boots is not the audit's guess")
    return roots


def _look(g: Any, device: str) -> tuple[bool, bool]:
    try:
        g.mount_ro(device, "/")
    except RuntimeError:
        return False, False
    try:
        return bool(g.is_dir("/etc")), any(g.exists(path) for path in OS_RELEASE)
    finally:
        g.umount_all()


def read_fstab(g: Any) -> list[tuple[str, str]]:
    """(device, mount point) of each local filesystem the mounted root's /etc/fstab mounts
    at boot, the first entry for a mount point winning (as systemd's generator does)."""
    if not g.is_file(FSTAB, followsymlinks=True):
        return []
    if g.filesize(FSTAB) > FSTAB_LIMIT:
        raise Unauditable(f"{FSTAB} is larger than {FSTAB_LIMIT >> 10} KiB")
    text = bytes(g.read_file(FSTAB)).decode(errors="surrogateescape")
    entries: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):
        entry = fstab_entry(line, number)
        if entry is not None:
            entries.setdefault(entry[1], entry[0])
    return [(spec, mountpoint) for mountpoint, spec in entries.items()]


def fstab_entry(line: str, number: int = 1) -> tuple[str, str] | None:
    """(device, tidied mount point) of an fstab line that mounts a local filesystem at
    boot, None for comments, swap, pseudo and noauto entries; Unauditable where glibc and
    libmount would read the line differently, or amiforge could not follow it."""
    where = f"{FSTAB} line {number}"
    if len(line) > LINE_LIMIT or re.search(r"[^\t\x20-\x7e]", line):
        raise Unauditable(f"{where}: too long, or characters other than printable ASCII "
                          "(glibc and libmount read such lines differently)")
    fields = re.split(r"[ \t]+", line.strip(" \t"))
    if not fields[0] or fields[0].startswith("#"):
        return None
    if len(fields) < 2:
        raise Unauditable(f"{where}: one field only")
    spec, mountpoint = (_unescape(field, where) for field in fields[:2])
    kind = fields[2] if len(fields) > 2 else "auto"
    options = fields[3].split(",") if len(fields) > 3 else []
    if kind == "overlay" or {"bind", "rbind"} & set(options) or any(
            o.startswith(("subvol=", "subvolid=")) for o in options):
        raise Unauditable(f"{where}: bind, overlay and subvolume mounts are not audited")
    automatic = [o for o in options if o in ("auto", "noauto")]
    if kind in PSEUDO or automatic[-1:] == ["noauto"] or mountpoint in ("none", "swap"):
        return None
    return _unquote(spec), tidy_mountpoint(mountpoint, where)


def _unescape(field: str, where: str) -> str:
    if re.search(r"\\(?!040|011|012|134)", field):
        raise Unauditable(f"{where}: an escape glibc and libmount read differently")
    return re.sub(r"\\(040|011|012|134)", lambda m: ESCAPES[m.group(1)], field)


def _unquote(spec: str) -> str:
    kind, equals, value = spec.partition("=")
    if equals and len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return f"{kind}={value[1:-1]}"
    return spec


def tidy_mountpoint(mountpoint: str, where: str) -> str:
    """The mount point as systemd reads it (//x, /./x and x/ are /x); .. is refused."""
    parts = [p for p in mountpoint.split("/") if p not in ("", ".")]
    if not mountpoint.startswith("/") or ".." in parts:
        raise Unauditable(f"{where}: mount point {mountpoint!r} is not a plain absolute path")
    return "/" + "/".join(parts)


def fstab_mounts(g: Any, by_device_path: Callable[[], dict[str, str]]) -> dict[str, str]:
    """mount point -> appliance device, for what the image's fstab mounts, leaving out
    what is not in the image (a volume of the mapping, attached at launch).
    ``by_device_path()`` gives inspection's mount points, asked only when an entry names
    its device by path (/dev/xvda1) or by partition UUID."""
    mounts: dict[str, str] = {}
    inspected: dict[str, str] | None = None
    for spec, mountpoint in read_fstab(g):
        if mountpoint == "/":  # the root is the one os_roots found
            continue
        kind, _, value = spec.partition("=")
        device: str | None = None
        if kind in ("UUID", "LABEL") and value:
            find = g.findfs_uuid if kind == "UUID" else g.findfs_label
            try:
                device = find(value)
            except RuntimeError:  # not in the image
                device = None
        else:
            if inspected is None:
                inspected = {tidy_mountpoint(m, FSTAB): d for m, d in by_device_path().items()}
            device = inspected.get(mountpoint)
        if device is not None:
            mounts[mountpoint] = device
    return mounts


def mount_checked(g: Any, device: str, mountpoint: str) -> None:
    """Mount ``device`` read-only on ``mountpoint``, an existing folder of the image reached
    without symlinks (a link on the way would lead the appliance's mount outside the
    image's tree, or elsewhere than systemd mounts it); Unauditable if not, or if the
    filesystem does not mount (the instance would see it, the audit would not)."""
    try:
        plain = g.realpath(mountpoint) == mountpoint and g.is_dir(mountpoint,
                                                                   followsymlinks=False)
    except RuntimeError:
        plain = False
    if not plain:
        raise Unauditable(f"fstab mounts {device} on {mountpoint}, which is not a folder of "
                          "the image reached without symlinks")
    try:
        g.mount_ro(device, mountpoint)
    except RuntimeError as exc:
        raise Unauditable(f"{device} does not mount on {mountpoint}: {exc}") from None
