"""The images on an EC2-like machine: disks on NVMe with EBS-like serials (as Nitro shows
EBS volumes), EC2's SMBIOS, the root volume larger than the image. The initramfs must hold
the NVMe driver to boot at all; ENA's driver is in the image for the real thing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from builder.vm import VirtualMachine, ebs_serial
from tests.conftest import needs_root_tools

pytestmark = [pytest.mark.boot, needs_root_tools()]


def test_minimal_image_boots_from_nvme(build_recipe, ssh_key: Path) -> None:
    built = build_recipe("debian-13-minimal.yaml")
    with VirtualMachine(built.artifact("disk.qcow2"), "uefi", ec2=True,
                        root_size=4 << 30) as vm:
        vm.wait_for(timeout=400)
        ssh = lambda command: vm.ssh("admin", ssh_key, command).strip()  # noqa: E731
        root = ssh("findmnt -no SOURCE /")
        assert re.fullmatch(r"/dev/nvme\dn1p3", root), root
        disk = root.removesuffix("p3")
        assert ssh(f"lsblk -dno SERIAL {disk}") == ebs_serial(0)
        assert int(ssh(f"lsblk -bdno SIZE {disk}")) == 4 << 30  # the EBS volume's
        assert ssh("cat /sys/class/dmi/id/sys_vendor") == "Amazon EC2"
        where = {module: ssh(f"/usr/sbin/modinfo -n {module}") for module in ("nvme", "ena")}
        assert all(w.endswith((".ko", ".ko.xz", "(builtin)")) for w in where.values()), where
        if not where["nvme"].endswith("(builtin)"):  # else the kernel itself holds it
            listed = ssh("sudo -n lsinitramfs /boot/initrd.img-$(uname -r) | grep -c /nvme")
            assert int(listed) > 0


def test_ebs_image_mounts_its_data_volume_from_nvme(build_recipe, ssh_key: Path) -> None:
    built = build_recipe("debian-13-ebs.yaml")
    with VirtualMachine(built.artifact("disk.qcow2"), "uefi", ec2=True,
                        extra_disks=[built.artifact("volume-sdf.qcow2")]) as vm:
        vm.wait_for(timeout=400)
        # NVMe names follow the order the controllers are found in, on EC2 as here: the
        # volume is told by its serial, and the image mounts it by label
        source = vm.ssh("admin", ssh_key, "findmnt -no SOURCE /srv/data").strip()
        assert source.startswith("/dev/nvme")
        serial = vm.ssh("admin", ssh_key, f"lsblk -dno SERIAL {source}").strip()
        assert serial == ebs_serial(1)
        assert "built by amiforge" in vm.ssh("admin", ssh_key, "cat /srv/data/README")
