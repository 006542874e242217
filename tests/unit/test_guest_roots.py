"""Finding an image's root and its mounts without libguestfs's inspection (the appliance
calls stood in for by a small table of devices; tests/boot/test_audit.py and the diff tests
run the real appliance)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from builder.audit.views import fstab_mounts, os_roots


@dataclass
class Appliance:
    """devices: device -> (filesystem type, files it holds: path -> text)."""
    devices: dict[str, tuple[str, dict[str, str]]]
    drives: list[str] = field(default_factory=lambda: ["/dev/sda"])
    mounted: str | None = None

    def list_partitions(self) -> list[str]:
        return [d for d in self.devices if d[-1].isdigit()]

    def list_devices(self) -> list[str]:
        return self.drives

    def part_to_dev(self, partition: str) -> str:
        return partition.rstrip("0123456789")

    def vfs_type(self, device: str) -> str:
        if device not in self.devices:
            raise RuntimeError(f"{device}: no filesystem")
        return self.devices[device][0]

    def mount_ro(self, device: str, where: str) -> None:
        assert where == "/" and self.mounted is None
        self.mounted = device

    def umount_all(self) -> None:
        self.mounted = None

    def _files(self) -> dict[str, str]:
        assert self.mounted is not None
        return self.devices[self.mounted][1]

    def exists(self, path: str) -> bool:
        return any(p == path or p.startswith(path + "/") for p in self._files())

    def is_dir(self, path: str) -> bool:
        return any(p.startswith(path + "/") for p in self._files())

    def is_file(self, path: str) -> bool:
        return path in self._files()

    def read_lines(self, path: str) -> list[str]:
        return self._files()[path].splitlines()

    def findfs_uuid(self, uuid: str) -> str:
        return self._find("UUID", uuid)

    def findfs_label(self, label: str) -> str:
        return self._find("LABEL", label)

    def _find(self, kind: str, value: str) -> str:
        for device, (_, files) in self.devices.items():
            if files.get(f"#{kind}") == value:
                return device
        raise RuntimeError(f"{kind}={value}: not found")


FSTAB = """# written by amiforge
UUID=1111  /  ext4  defaults  0  1
UUID=AFE2-AEB7  /boot/efi  vfat  umask=0077,nofail  0  2
LABEL=data /srv/data ext4 nofail 0 2   # a data volume
LABEL=absent /srv/absent ext4 nofail 0 2
/dev/xvdb  /mnt  auto  nofail  0  2
UUID=2222  none  swap  sw  0  0
"""
ROOT = {"#UUID": "1111", "/etc/fstab": FSTAB, "/usr/lib/os-release": "ID=debian\n",
        "/etc/hostname": "debian\n"}


def test_the_root_is_the_filesystem_with_an_os_release() -> None:
    appliance = Appliance({"/dev/sda1": ("unknown", {}),   # BIOS boot partition
                           "/dev/sda2": ("vfat", {"#UUID": "AFE2-AEB7"}),
                           "/dev/sda3": ("ext4", ROOT),
                           "/dev/sda4": ("ext4", {"#LABEL": "data", "/README": "x"})})
    assert os_roots(appliance) == ["/dev/sda3"]
    assert appliance.mounted is None  # each one looked at is unmounted again


def test_fstab_names_the_mounts_by_uuid_and_label() -> None:
    appliance = Appliance({"/dev/sda2": ("vfat", {"#UUID": "AFE2-AEB7"}),
                           "/dev/sda3": ("ext4", ROOT),
                           "/dev/sdb": ("ext4", {"#LABEL": "data"})},
                          drives=["/dev/sda", "/dev/sdb"])
    appliance.mount_ro("/dev/sda3", "/")
    # the root itself, swap, device paths and what is not attached are left out
    assert fstab_mounts(appliance) == {"/boot/efi": "/dev/sda2", "/srv/data": "/dev/sdb"}


@pytest.mark.parametrize("devices", [
    {"/dev/sda1": ("ext4", {"/etc/passwd": ""})},                       # no os-release
    {"/dev/sda1": ("vfat", {"/etc/x": "", "/etc/os-release": ""})},    # not Linux's
    {"/dev/sda1": ("ext4", {"/usr/lib/os-release": ""})},               # no /etc
    {},                                                                 # nothing at all
])
def test_no_root_found_leaves_it_to_inspection(devices: dict) -> None:
    assert os_roots(Appliance(devices)) == []


def test_a_disk_without_partitions_is_looked_at_whole() -> None:
    appliance = Appliance({"/dev/sda": ("xfs", ROOT)})
    assert os_roots(appliance) == ["/dev/sda"]
