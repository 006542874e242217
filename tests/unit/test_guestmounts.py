"""Finding an image's root and its mounts without libguestfs's inspection, as a stranger's
image could try to mislead it (the appliance's calls stood in for by a small table of
devices; tests/boot/test_audit.py and the diff tests run the real appliance)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from builder.audit import views
from builder.audit.guestmounts import (
    Unauditable,
    fstab_entry,
    fstab_mounts,
    mount_checked,
    os_roots,
    read_fstab,
)


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

    inspected: dict[str, str] | None = None  # inspection's mount points, when it is asked

    def inspect_os(self) -> list[str]:
        assert self.inspected is not None, "inspection was not needed"
        self.mounts.clear()  # as libguestfs's inspection leaves things
        return ["/dev/sda3"]

    def inspect_get_mountpoints(self, root: str) -> dict[str, str]:
        assert self.inspected is not None and not self.mounts
        return self.inspected

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


def no_device_paths() -> dict[str, str]:
    raise AssertionError("every entry names its filesystem by UUID or label")


def test_fstab_names_the_mounts_by_uuid_and_label() -> None:
    # the root itself, swap, pseudo filesystems and what is not attached are left out
    assert fstab_mounts(mounted(image()), no_device_paths) == {
        "/boot/efi": "/dev/sda2", "/srv/data": "/dev/sda4"}


@pytest.mark.parametrize("devices", [
    {"/dev/sda1": ("ext4", {"/usr/lib/os-release": ""})},               # no /etc
    {"/dev/sda1": ("vfat", {"/etc/x": "", "/etc/os-release": ""})},    # not Linux's
    {},                                                                 # nothing at all
])
def test_no_root_found_leaves_it_to_inspection(devices: dict) -> None:
    assert os_roots(Appliance(devices)) == []


def test_a_volume_group_leaves_it_to_inspection() -> None:
    """A decoy root on a partition must not win over a real one inside LVM."""
    assert os_roots(image(**{"/dev/sda5": ("LVM2_member", {})})) == []


@pytest.mark.parametrize(("more", "message"), [
    ({"/dev/sda5": ("crypto_LUKS", {})}, "crypto_LUKS: the audit cannot see inside it"),
    ({"/dev/sda5": ("ext4", {**ROOT_FILES, "/etc/x": ""})}, "more than one filesystem"),
    # a second /etc without os-release (its os-release on a separate /usr, say)
    ({"/dev/sda5": ("xfs", {"/etc/passwd": ""})}, "more than one filesystem"),
])
def test_what_could_hide_the_real_root_is_refused(more: dict, message: str) -> None:
    with pytest.raises(Unauditable, match=message):
        os_roots(image(**more))


def test_each_drive_has_its_own_root() -> None:
    """build diff opens two images in one appliance: a root each is not two roots."""
    appliance = Appliance({"/dev/sda3": ("ext4", {**ROOT_FILES, "/etc/x": ""}),
                           "/dev/sdb3": ("ext4", {**ROOT_FILES, "/etc/x": ""})},
                          drives=["/dev/sda", "/dev/sdb"])
    assert os_roots(appliance) == ["/dev/sda3", "/dev/sdb3"]


def test_a_disk_without_partitions_is_looked_at_whole() -> None:
    appliance = Appliance({"/dev/sda": ("xfs", {**ROOT_FILES, "/etc/x": ""}),
                           "/dev/sdb1": ("ext4", {"/README": ""}),
                           # a stale signature on the partitioned disk itself: not looked at
                           "/dev/sdb": ("ext4", {**ROOT_FILES, "/etc/x": ""})},
                          drives=["/dev/sda", "/dev/sdb"])
    assert os_roots(appliance) == ["/dev/sda"]


@pytest.mark.parametrize(("line", "entry"), [
    ("LABEL=x /srv ext4 defaults 0 2", ("LABEL=x", "/srv")),
    ("  LABEL=x\t/srv", ("LABEL=x", "/srv")),
    ("LABEL=x /root#x ext4 defaults", ("LABEL=x", "/root#x")),    # "#" inside a field
    ("LABEL=x /my\\040data ext4 defaults", ("LABEL=x", "/my data")),
    ('UUID="1111" /srv ext4 defaults', ("UUID=1111", "/srv")),   # quotes, as systemd reads
    ("LABEL=x //root/./ ext4 defaults", ("LABEL=x", "/root")),   # as systemd tidies it
    ("LABEL=x /srv ext4 noauto,auto 0 2", ("LABEL=x", "/srv")),  # the last one counts
    ("LABEL=x /srv ext4 defaults,noauto 0 2", None),
    ("# LABEL=x /srv ext4", None),
    ("LABEL=x none swap sw", None),
    ("proc /proc proc defaults", None),
    ("", None),
])
def test_fstab_lines_are_read_as_boot_reads_them(line: str, entry) -> None:
    assert fstab_entry(line) == entry


@pytest.mark.parametrize(("line", "message"), [
    ("LABEL=x /root\x1c/x ext4 defaults", "printable ASCII"),   # libmount: part of the path
    ("LABEL=x /srv ext4 defaults,noauto\r", "printable ASCII"),  # glibc keeps the \r
    ("LABEL=x /srv ext4 " + "a," * 2100 + "noauto", "too long"),  # glibc cuts the line
    ("LABEL=x \\057root ext4 defaults", "escape"),               # libmount: /root
    ("LABEL=x /\\562oot ext4 defaults", "escape"),
    ("LABEL=x /etc/../root ext4 defaults", "not a plain absolute path"),
    ("LABEL=x root ext4 defaults", "not a plain absolute path"),
    ("/opt/k /root/.ssh none bind 0 0", "bind"),
    ("UUID=1111 /root btrfs subvol=@r 0 0", "subvolume"),
    ("lowerdir /usr overlay defaults", "overlay"),
    ("LABEL=x", "one field"),
])
def test_lines_read_differently_by_glibc_and_libmount_are_refused(line: str,
                                                                  message: str) -> None:
    with pytest.raises(Unauditable, match=message):
        fstab_entry(line)


def test_the_first_entry_for_a_mount_point_wins() -> None:
    fstab = "LABEL=data /srv/data/ ext4 defaults\nUUID=AFE2-AEB7 /srv/data vfat defaults\n"
    assert read_fstab(mounted(image(fstab))) == [("LABEL=data", "/srv/data")]


def test_device_paths_are_mapped_by_inspection() -> None:
    asked = []

    def inspected() -> dict[str, str]:
        asked.append(1)
        return {"/": "/dev/sda3", "/root/": "/dev/sda4", "/mnt": "/dev/sdz1"}

    fstab = "/dev/xvda3 / ext4 defaults\n/dev/xvda4 /root ext4 defaults\n" \
            "PARTUUID=ab-01 /mnt ext4 nofail\n/dev/xvdf /srv ext4 nofail\n"
    # /srv's device is not in the image (inspection does not know it): nothing to audit
    assert fstab_mounts(mounted(image(fstab)), inspected) == {"/root": "/dev/sda4",
                                                              "/mnt": "/dev/sdz1"}
    assert asked == [1]  # once


def test_an_oversized_linked_or_binary_fstab() -> None:
    with pytest.raises(Unauditable, match="larger than 100 KiB"):
        read_fstab(mounted(image("#" * (100 << 10) + "\n")))
    linked = image("LABEL=data /srv/data ext4 defaults\n")
    linked.devices["/dev/sda3"][1]["@/etc/fstab"] = ""  # a symlink (followed inside)
    assert read_fstab(mounted(linked)) == [("LABEL=data", "/srv/data")]
    with pytest.raises(Unauditable, match="printable ASCII"):
        read_fstab(mounted(image("# \udcff not UTF-8\n")))


@pytest.mark.parametrize(("mountpoint", "message"), [
    ("/nonexistent", "not a folder"),    # systemd would make it: the payload would mount
    ("/opt/bin", "not a folder"),        # /opt is a link (to /usr, say)
    ("/etc/hostname", "not a folder"),
])
def test_mount_points_must_be_plain_folders_inside_the_image(mountpoint: str,
                                                             message: str) -> None:
    appliance = mounted(image())
    appliance.devices["/dev/sda3"][1].update({"@/opt": "", "/opt/bin/x": ""})
    with pytest.raises(Unauditable, match=message):
        mount_checked(appliance, "/dev/sda4", mountpoint)
    mount_checked(appliance, "/dev/sda4", "/srv/data")
    assert appliance.mounts["/srv/data"] == "/dev/sda4"


def test_a_filesystem_that_does_not_mount_is_refused() -> None:
    appliance = mounted(image())

    def refuse(device: str, where: str) -> None:
        raise RuntimeError("mount: wrong fs type")

    appliance.mount_ro = refuse  # type: ignore[method-assign]
    with pytest.raises(Unauditable, match="does not mount on /srv/data"):
        mount_checked(appliance, "/dev/sda4", "/srv/data")


def test_guest_view_mounts_the_root_then_the_fstab_entries(monkeypatch) -> None:
    fstab = FSTAB + "LABEL=data // ext4 defaults\n"  # "/" again: the root is os_roots'
    appliance = image(fstab)
    monkeypatch.setattr(views, "appliance", lambda drives: appliance)
    views.GuestView(Path("disk.qcow2"), "qcow2")
    assert appliance.mounts == {"/": "/dev/sda3", "/boot/efi": "/dev/sda2",
                                "/srv/data": "/dev/sda4"}


def test_guest_view_after_inspection_mounts_the_root_again(monkeypatch) -> None:
    appliance = image("/dev/xvda4 /srv/data ext4 defaults\n")
    appliance.inspected = {"/": "/dev/sda3", "/srv/data": "/dev/sda4"}
    monkeypatch.setattr(views, "appliance", lambda drives: appliance)
    views.GuestView(Path("disk.qcow2"), "qcow2")
    assert appliance.mounts == {"/": "/dev/sda3", "/srv/data": "/dev/sda4"}


def test_guest_view_refuses_a_link_on_the_way_and_closes_the_appliance(monkeypatch) -> None:
    appliance = image(FSTAB + "LABEL=data /opt/bin ext4 defaults\n")
    appliance.devices["/dev/sda3"][1].update({"@/opt": "", "/opt/bin/x": ""})
    monkeypatch.setattr(views, "appliance", lambda drives: appliance)
    with pytest.raises(Unauditable, match="/opt/bin"):
        views.GuestView(Path("disk.qcow2"), "qcow2")
    assert appliance.closed
