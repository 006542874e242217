"""Finding an image's root and its mounts without libguestfs's inspection, as a stranger's
image could try to mislead it (the appliance's calls stood in for by a small table of
devices; tests/boot/test_audit.py and the diff tests run the real appliance)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from builder.audit import views
from builder.audit.guestmounts import fstab_entry, fstab_mounts, os_roots, safe_mountpoint


@dataclass
class Appliance:
    """devices: device -> (filesystem type, files it holds: path -> text; "#UUID" and
    "#LABEL" name the filesystem; "@link" entries are symlinks)."""
    devices: dict[str, tuple[str, dict[str, str]]]
    drives: list[str] = field(default_factory=lambda: ["/dev/sda"])
    mounts: dict[str, str] = field(default_factory=dict)  # mount point -> device
    closed: bool = False

    def list_partitions(self) -> list[str]:
        return [d for d in self.devices if d[-1].isdigit()]

    def list_devices(self) -> list[str]:
        return self.drives

    def part_to_dev(self, partition: str) -> str:
        return partition.rstrip("0123456789")

    def vfs_type(self, device: str) -> str:
        return self.devices[device][0] if device in self.devices else ""

    def mount_ro(self, device: str, where: str) -> None:
        if where != "/" and not self.is_dir(where):
            raise RuntimeError(f"mount: {where}: no such folder")
        self.mounts[where] = device

    def umount_all(self) -> None:
        self.mounts.clear()

    def _files(self) -> dict[str, str]:
        return self.devices[self.mounts["/"]][1]

    def exists(self, path: str) -> bool:
        return any(p == path or p.startswith(path + "/") for p in self._files())

    def is_dir(self, path: str, followsymlinks: bool = False) -> bool:
        return any(p.startswith(path + "/") for p in self._files()) and not self._link(path)

    def is_file(self, path: str, followsymlinks: bool = False) -> bool:
        return path in self._files() and (followsymlinks or not self._link(path))

    def _link(self, path: str) -> bool:
        parts = path.split("/")
        return any(f"@{'/'.join(parts[:n])}" in self._files() for n in range(2, len(parts) + 1))

    def realpath(self, path: str) -> str:
        return "/elsewhere" + path if self._link(path) else path

    def filesize(self, path: str) -> int:
        return len(self.read_file(path))

    def read_file(self, path: str) -> bytes:
        return self._files()[path].encode(errors="surrogateescape")

    def findfs_uuid(self, uuid: str) -> str:
        return self._find("UUID", uuid)

    def findfs_label(self, label: str) -> str:
        return self._find("LABEL", label)

    def _find(self, kind: str, value: str) -> str:
        for device, (_, files) in self.devices.items():
            if files.get(f"#{kind}") == value:
                return device
        raise RuntimeError(f"{kind}={value}: not found")

    def inspect_os(self) -> list[str]:
        raise AssertionError("inspection was not needed")

    def shutdown(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


FSTAB = """# written by amiforge
UUID=1111  /  ext4  defaults  0  1
UUID=AFE2-AEB7  /boot/efi  vfat  umask=0077,nofail  0  2
LABEL=data /srv/data ext4 nofail 0 2   # a data volume
LABEL=absent /srv/absent ext4 nofail 0 2
UUID=2222  none  swap  sw  0  0
proc /proc proc defaults 0 0
"""
ROOT_FILES = {"#UUID": "1111", "/usr/lib/os-release": "ID=debian\n", "/etc/hostname": "x\n",
              "/boot/efi/.keep": "", "/srv/data/.keep": "", "/root/.ssh/authorized_keys": "k"}


def image(fstab: str = FSTAB, **more: tuple[str, dict[str, str]]) -> Appliance:
    return Appliance({"/dev/sda1": ("", {}),   # BIOS boot partition: no filesystem
                      "/dev/sda2": ("vfat", {"#UUID": "AFE2-AEB7"}),
                      "/dev/sda3": ("ext4", {**ROOT_FILES, "/etc/fstab": fstab}),
                      "/dev/sda4": ("ext4", {"#LABEL": "data", "/README": "x"}), **more})


def mounted(appliance: Appliance) -> Appliance:
    appliance.mount_ro("/dev/sda3", "/")
    return appliance


def test_the_root_is_the_filesystem_with_an_os_release() -> None:
    appliance = image()
    assert os_roots(appliance) == ["/dev/sda3"]
    assert appliance.mounts == {}  # each one looked at is unmounted again


def test_fstab_names_the_mounts_by_uuid_and_label() -> None:
    # the root itself, swap, pseudo filesystems and what is not attached are left out
    assert fstab_mounts(mounted(image())) == {"/boot/efi": "/dev/sda2", "/srv/data": "/dev/sda4"}


@pytest.mark.parametrize("devices", [
    {"/dev/sda1": ("ext4", {"/etc/passwd": ""})},                       # no os-release
    {"/dev/sda1": ("vfat", {"/etc/x": "", "/etc/os-release": ""})},    # not Linux's
    {"/dev/sda1": ("ext4", {"/usr/lib/os-release": ""})},               # no /etc
    {},                                                                 # nothing at all
])
def test_no_root_found_leaves_it_to_inspection(devices: dict) -> None:
    assert os_roots(Appliance(devices)) == []


def test_a_volume_group_leaves_it_to_inspection() -> None:
    """A decoy root on a partition must not win over a real one inside LVM."""
    assert os_roots(image(**{"/dev/sda5": ("LVM2_member", {})})) == []


def test_a_disk_without_partitions_is_looked_at_whole() -> None:
    appliance = Appliance({"/dev/sda": ("xfs", {**ROOT_FILES, "/etc/x": ""}),
                           "/dev/sdb1": ("ext4", {**ROOT_FILES, "/etc/x": ""}),
                           # a stale signature on the partitioned disk itself: not looked at
                           "/dev/sdb": ("ext4", {**ROOT_FILES, "/etc/x": ""})},
                          drives=["/dev/sda", "/dev/sdb"])
    assert os_roots(appliance) == ["/dev/sdb1", "/dev/sda"]  # sdb itself: partitioned


@pytest.mark.parametrize(("line", "entry"), [
    ("LABEL=x /srv ext4 defaults 0 2", ("LABEL=x", "/srv")),
    ("  LABEL=x\t/srv", ("LABEL=x", "/srv")),
    ("LABEL=x /root#x ext4 defaults", ("LABEL=x", "/root#x")),    # "#" inside a field
    ("LABEL=x /root\x1c/x ext4 defaults", ("LABEL=x", "/root\x1c/x")),  # not a separator
    ("LABEL=x /my\\040data ext4 defaults", ("LABEL=x", "/my data")),
    ("# LABEL=x /srv ext4", None),
    ("LABEL=x /srv ext4 defaults,noauto 0 2", None),
    ("LABEL=x none swap sw", None),
    ("", None),
])
def test_fstab_lines_are_read_as_libmount_reads_them(line: str, entry) -> None:
    assert fstab_entry(line) == entry


def test_the_first_entry_for_a_mount_point_wins() -> None:
    fstab = "LABEL=data /srv/data ext4 defaults\nUUID=AFE2-AEB7 /srv/data vfat defaults\n"
    assert fstab_mounts(mounted(image(fstab))) == {"/srv/data": "/dev/sda4"}


def test_device_paths_are_left_to_inspection() -> None:
    assert fstab_mounts(mounted(image("/dev/xvda4 /root ext4 defaults 0 2\n"))) is None
    # but not the root's own line: the root is the one found by its os-release
    assert fstab_mounts(mounted(image("/dev/xvda3 / ext4 defaults 0 1\n"))) == {}


def test_an_oversized_or_linked_fstab() -> None:
    with pytest.raises(ValueError, match="larger than 100 KiB"):
        fstab_mounts(mounted(image("#" * (100 << 10) + "\n")))
    linked = image("LABEL=data /srv/data ext4 defaults\n")
    linked.devices["/dev/sda3"][1]["@/etc/fstab"] = ""  # a symlink (followed inside)
    assert fstab_mounts(mounted(linked)) == {"/srv/data": "/dev/sda4"}
    bytes_ = image("# \udcff not UTF-8\nLABEL=data /srv/data ext4 defaults\n")
    assert fstab_mounts(mounted(bytes_)) == {"/srv/data": "/dev/sda4"}


@pytest.mark.parametrize(("mountpoint", "safe"), [
    ("/srv/data", True),
    ("/", False), ("//", False), ("/.", False), ("/srv/..", False), ("/srv/data/", False),
    ("srv", False), ("/nonexistent", False),
    ("/opt/bin", False),   # /opt is a link (to /usr, say): the mount would leave the image
])
def test_mount_points_must_be_plain_folders_inside_the_image(mountpoint: str,
                                                             safe: bool) -> None:
    appliance = mounted(image())
    appliance.devices["/dev/sda3"][1].update({"@/opt": "", "/opt/bin/x": ""})
    assert safe_mountpoint(appliance, mountpoint) is safe


def test_guest_view_mounts_the_root_then_safe_fstab_entries(monkeypatch) -> None:
    fstab = FSTAB + "LABEL=data // ext4 defaults\nLABEL=data /opt/bin ext4 defaults\n"
    appliance = image(fstab)
    appliance.devices["/dev/sda3"][1].update({"@/opt": "", "/opt/bin/x": ""})
    monkeypatch.setattr(views, "appliance", lambda drives: appliance)
    views.GuestView(Path("disk.qcow2"), "qcow2")
    assert appliance.mounts == {"/": "/dev/sda3", "/boot/efi": "/dev/sda2",
                                "/srv/data": "/dev/sda4"}


def test_guest_view_refuses_two_roots_and_closes_the_appliance(monkeypatch) -> None:
    appliance = image(**{"/dev/sda5": ("ext4", {**ROOT_FILES, "/etc/x": ""})})
    monkeypatch.setattr(views, "appliance", lambda drives: appliance)
    with pytest.raises(ValueError, match="more than one operating system root"):
        views.GuestView(Path("disk.qcow2"), "qcow2")
    assert appliance.closed
