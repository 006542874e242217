"""The AMI recipes boot: the EBS recipe with its data volume attached as a second disk
(mounted by label), the instance-store recipe with BIOS."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.vm import VirtualMachine
from tests.conftest import bundle_args, needs_root_tools

pytestmark = [pytest.mark.boot, needs_root_tools()]


def test_ebs_image_mounts_its_data_volume(build_recipe, ssh_key: Path) -> None:
    built = build_recipe("debian-12-ebs.yaml")
    with VirtualMachine(built.artifact("disk.qcow2"), "uefi",
                        extra_disks=[built.artifact("volume-sdf.qcow2")]) as vm:
        vm.wait_for(timeout=300)
        mount = vm.ssh("admin", ssh_key, "findmnt -no SOURCE,FSTYPE /srv/data").split()
        assert mount[1] == "ext4"
        assert "built by amiforge" in vm.ssh("admin", ssh_key, "cat /srv/data/README")
        assert vm.ssh("admin", ssh_key, "hostname").strip() == "ebs"


def test_instance_store_image_boots_bios(build_recipe, bundle_keys, ssh_key: Path) -> None:
    built = build_recipe("debian-12-instance-store.yaml", *bundle_args(bundle_keys))
    with VirtualMachine(built.artifact("disk.raw"), "bios") as vm:
        vm.wait_for(timeout=300)
        assert vm.ssh("admin", ssh_key, "hostname").strip() == "instance-store"
        assert vm.ssh("admin", ssh_key, "test -d /sys/firmware/efi || echo bios").strip() == "bios"
