"""Boot the default recipe's images under QEMU (TCG): disk.raw with SeaBIOS, disk.qcow2 with
OVMF, and check over SSH that the recipe's user, key, file, script and service are there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from builder.plan import sha256_file
from builder.stages import native_tools
from builder.vm import VirtualMachine
from tests.boot.test_boot_ec2 import VOLUME, check_nvme_and_grows_once
from tests.conftest import needs_root_tools

pytestmark = [pytest.mark.boot, needs_root_tools()]
RECIPES = ("debian-13-minimal.yaml", "debian-12-minimal.yaml")
RELEASES = {"debian-13-minimal.yaml": "13", "debian-12-minimal.yaml": "12"}


def check_configured(vm: VirtualMachine, key: Path) -> None:
    assert vm.ssh("admin", key, "id -un").strip() == "admin"
    groups = vm.ssh("admin", key, "id -Gn").split()
    assert "sudo" in groups
    assert vm.ssh("admin", key, "sudo -n id -u").strip() == "0"
    assert "built by amiforge" in vm.ssh("admin", key, "cat /etc/motd")
    assert vm.ssh("admin", key, "cat /etc/amiforge-configured").startswith("configured by amiforge")
    assert vm.ssh("admin", key, "systemctl is-enabled ssh.service").strip() == "enabled"
    assert vm.ssh("admin", key, "systemctl is-active ssh.service").strip() == "active"
    status = vm.ssh("admin", key, "sudo -n passwd -S admin").split()
    assert status[1] == "L", f"admin's password must be locked: {status}"
    root_fs = vm.ssh("admin", key, "findmnt -no FSTYPE,OPTIONS /").split()
    assert root_fs[0] == "ext4" and "rw" in root_fs[1].split(",")
    # the bootstrap's shortcuts are gone: update-initramfs is dpkg's own again, and dpkg
    # syncs its writes on the instance
    assert "amiforge" not in vm.ssh("admin", key, "dpkg-divert --list")
    assert "amiforge" not in vm.ssh("admin", key, "cat /var/lib/dpkg/diversions*")
    # (arm64) perl, diverted aside while the tree was made, is back with its other name
    versioned = "$(dpkg -L perl-base | grep -x '/usr/bin/perl5[.0-9]*')"
    assert vm.ssh("admin", key, f'test /usr/bin/perl -ef "{versioned}" && echo same') == \
        "same\n"
    # (by dpkg and size, not --version: Debian 12's update-initramfs has no --version)
    assert vm.ssh("admin", key, "dpkg -S /usr/sbin/update-initramfs").startswith(
        "initramfs-tools")
    assert int(vm.ssh("admin", key, "stat -c %s /usr/sbin/update-initramfs")) > 1000
    assert "unsafe-io" not in vm.ssh("admin", key, "cat /etc/dpkg/dpkg.cfg.d/*")
    # (arm64) the host's stand-ins are gone, the packages' own programs back (the docs the
    # recipe leaves out are "missing"; a changed file's line starts "??5")
    packages = " ".join(native_tools.PACKAGES)
    changed = [line for line in vm.ssh("admin", key, f"dpkg --verify {packages} || true")
               .splitlines() if not line.startswith("missing ")]
    assert changed == []
    assert vm.ssh("admin", key, "ls -d /amiforge-native 2>&1 || true").count("No such") == 1


def check_sbom(vm: VirtualMachine, key: Path, built) -> None:
    """sbom.spdx.json lists what dpkg-query lists inside the booted image, version for
    version, and describes the image by its sha256."""
    assert validate_full_spdx_document(parse_file(str(built.artifact("sbom.spdx.json")))) == []
    sbom = json.loads(built.artifact("sbom.spdx.json").read_text())
    image, *packages = sbom["packages"]
    assert image["checksums"][0]["checksumValue"] == sha256_file(built.artifact("disk.raw"))
    listed = vm.ssh("admin", key, "dpkg-query -W -f '${Package} ${Version}\\n'").splitlines()
    assert sorted(listed) == sorted(f"{p['name']} {p['versionInfo']}" for p in packages)


@pytest.fixture(scope="module")
def identities() -> dict[str, tuple[str, str]]:
    """(recipe, firmware) -> (SSH host key, machine id) of each VM booted below."""
    return {}


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize(("artifact", "firmware"), [("disk.raw", "bios"),
                                                     ("disk.qcow2", "uefi")])
def test_boots_and_is_configured(build_recipe, ssh_key: Path, artifact: str, firmware: str,
                                 recipe: str, identities: dict) -> None:
    built = build_recipe(recipe)
    # the UEFI boot's disk is a volume larger than the image: the root grows into it
    # (Debian 13's systemd-repart package, Debian 12's systemd). Debian 13's UEFI boot is
    # on an EC2-like machine (NVMe, EC2's SMBIOS, a 4 GiB EBS-like volume), and reboots.
    ec2 = firmware == "uefi" and recipe == "debian-13-minimal.yaml"
    volume = VOLUME if ec2 else 3 << 30 if firmware == "uefi" else None
    with VirtualMachine(built.artifact(artifact), firmware, root_size=volume, ec2=ec2) as vm:
        seconds = vm.wait_for(timeout=300)
        print(f"{artifact} ({firmware}): login prompt after {seconds:.1f}s")
        check_configured(vm, ssh_key)
        efi = vm.ssh("admin", ssh_key, "test -d /sys/firmware/efi && echo uefi || echo bios")
        assert efi.strip() == firmware
        cmdline = vm.ssh("admin", ssh_key, "cat /proc/cmdline")
        assert "console=ttyS0" in cmdline and "console=tty0" in cmdline
        check_sbom(vm, ssh_key, built)
        root = int(vm.ssh("admin", ssh_key, "df -B1 --output=size / | tail -1"))
        assert root > (volume or 0) - (400 << 20) and root < (volume or 2 << 30), root
        host_key = vm.ssh("admin", ssh_key, "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub")
        machine_id = vm.ssh("admin", ssh_key, "cat /etc/machine-id").strip()
        assert len(machine_id) == 32
        release = vm.ssh("admin", ssh_key, ". /etc/os-release; echo $VERSION_ID").strip()
        assert release == RELEASES[recipe]
        identities[recipe, firmware] = (host_key, machine_id)
        if ec2:
            check_nvme_and_grows_once(vm, ssh_key)


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_instances_of_one_image_have_their_own_identity(identities: dict,
                                                            recipe: str) -> None:
    """disk.raw and disk.qcow2 hold the same image: the two VMs above made their own SSH
    host keys and machine ids at first boot. (Run with the boots above; alone it fails.)"""
    both = [identities.get((recipe, firmware)) for firmware in ("bios", "uefi")]
    assert None not in both, "both boots above must have run first"
    (key_a, id_a), (key_b, id_b) = both  # type: ignore[misc]
    assert key_a != key_b and id_a != id_b
