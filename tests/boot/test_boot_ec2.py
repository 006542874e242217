"""The images on an EC2-like machine: disks on NVMe with EBS-like serials (as Nitro shows
EBS volumes), EC2's SMBIOS, the root volume larger than the image, and an IMDSv2 metadata
service at 169.254.169.254. The initramfs must hold the NVMe driver to boot at all; ENA's
driver is in the image for the real thing. First-boot work (growing the root, host keys,
cloud-init's per-instance modules) happens once: a reboot changes nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from builder.ec2layout import INSTANCE_STORE_SIZE, attach, mapping_layout
from builder.host.run import run
from builder.imds import GUEST_ADDRESS, Instance
from builder.vm import VirtualMachine, ebs_serial, instance_store_serial
from tests.boot.test_boot_web import check_cyclonedx, check_web_page
from tests.conftest import needs_root_tools

pytestmark = [pytest.mark.boot, needs_root_tools()]
VOLUME = 4 << 30  # the EBS volume; the images are 2 GiB (web: 3 GiB)


def grown_root(ssh) -> tuple[int, int]:
    """(root partition, root filesystem) sizes in bytes."""
    partition = int(ssh("lsblk -bno SIZE $(findmnt -no SOURCE /)"))
    filesystem = int(ssh("df -B1 --output=size / | tail -1"))
    return partition, filesystem


def host_key(ssh) -> str:
    return ssh("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub")


def check_nvme_and_grows_once(vm: VirtualMachine, key: Path) -> None:
    """On an EC2-like machine (``ec2=True``, root volume VOLUME): the root is on NVMe with
    an EBS serial, the initramfs holds the NVMe driver, the first boot grew the root into
    the volume, and a reboot changes nothing. (test_boot_minimal boots the default recipe
    so, as its UEFI boot.)"""
    ssh = lambda command: vm.ssh("admin", key, command).strip()  # noqa: E731
    root = ssh("findmnt -no SOURCE /")
    assert re.fullmatch(r"/dev/nvme\dn1p3", root), root
    disk = root.removesuffix("p3")
    assert ssh(f"lsblk -dno SERIAL {disk}") == ebs_serial(0)
    assert int(ssh(f"lsblk -bdno SIZE {disk}")) == VOLUME  # the EBS volume's
    assert ssh("cat /sys/class/dmi/id/sys_vendor") == "Amazon EC2"
    where = {module: ssh(f"/usr/sbin/modinfo -n {module}") for module in ("nvme", "ena")}
    assert all(w.endswith((".ko", ".ko.xz", "(builtin)")) for w in where.values()), where
    if not where["nvme"].endswith("(builtin)"):  # else the kernel itself holds it
        listed = ssh("sudo -n lsinitramfs /boot/initrd.img-$(uname -r) | grep -c /nvme")
        assert int(listed) > 0
    # the first boot grew the root partition and filesystem into the volume
    partition, filesystem = grown_root(ssh)
    assert partition > VOLUME - 300 * 2**20 and filesystem > VOLUME - 400 * 2**20, \
        (partition, filesystem)
    first = host_key(ssh), ssh("cat /etc/machine-id")
    vm.reboot("admin", key)
    # nothing more to do on the second boot: same sizes, same host keys, same machine
    assert grown_root(ssh) == (partition, filesystem)
    assert (host_key(ssh), ssh("cat /etc/machine-id")) == first
    assert "No changes." in ssh("sudo -n journalctl -b -o cat -u systemd-repart")


def test_cloud_init_configures_the_instance_from_imdsv2(build_recipe, ssh_key: Path,
                                                       tmp_path: Path) -> None:
    """The web recipe's cloud-init on an EC2-like machine: the EC2 datasource over IMDSv2
    sets the hostname, installs the key pair's key and runs the user data, once; and the
    recipe's nginx serves its page (test_boot_web's checks: this is the Debian 13 web
    image's boot)."""
    built = build_recipe("debian-13-web.yaml")
    instance_key = tmp_path / "instance_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "key-pair", "-f",
         str(instance_key)])
    user_data = b"#!/bin/sh\necho \"user-data ran on $(hostname)\" | tee -a /var/tmp/ud.log\n"
    instance = Instance(ssh_key=instance_key.with_suffix(".pub").read_text().strip(),
                        user_data=user_data)
    with VirtualMachine(built.artifact("disk.qcow2"), "uefi", ec2=True, root_size=VOLUME,
                        instance=instance, guest_ports=(22, 80)) as vm:
        ran = vm.wait_for(r"user-data ran on (\S+)", timeout=500)
        hostname = f"ip-{GUEST_ADDRESS.replace('.', '-')}"
        print(f"user data ran {ran:.0f}s after power-on")
        assert f"user-data ran on {hostname}" in vm.console()
        vm.wait_for(timeout=300)
        # the key from the metadata, not the recipe's: this log-in is the proof
        ssh = lambda command: vm.ssh("admin", instance_key, command).strip()  # noqa: E731
        assert ssh("hostname") == hostname
        data = json.loads(ssh("sudo -n cat /run/cloud-init/instance-data.json"))
        assert (data["v1"]["cloud_name"], data["v1"]["platform"]) == ("aws", "ec2")
        assert data["v1"]["instance_id"] == instance.instance_id
        partition, _ = grown_root(ssh)
        assert partition > VOLUME - 300 * 2**20
        # Amazon's own IMDSv2 client, from amazon-ec2-utils, finds the service too; that
        # package's udev rules name EBS volumes by their mapping (they match only EBS's
        # NVMe model and vendor data, which QEMU's NVMe cannot present)
        assert ssh("ec2-metadata --instance-id") == f"instance-id: {instance.instance_id}"
        assert ssh("test -f /usr/lib/udev/rules.d/70-ec2-nvme-devices.rules && echo ok") == "ok"
        gets = [r for r in vm.imds.requests if r.method == "GET"]
        assert any(r.method == "PUT" and r.status == 200 for r in vm.imds.requests)
        assert gets and all(r.token == "valid" for r in gets), \
            [r for r in gets if r.token != "valid"]
        check_web_page(vm, instance_key)
        check_cyclonedx(vm, instance_key, built.artifact("sbom.cdx.json"))
        vm.reboot("admin", instance_key)
        assert ssh("cat /var/tmp/ud.log").splitlines() == [f"user-data ran on {hostname}"]
        assert "user-data ran" not in vm.console()


def test_ebs_image_boots_as_an_instance_of_its_mapping(build_recipe, ssh_key: Path,
                                                       tmp_path: Path) -> None:
    """The EBS recipe's output laid out as `build boot OUT --ec2` does: the 8 GiB root
    volume, the data volume amiforge filled (mounted by label), the instance store."""
    built = build_recipe("debian-13-ebs.yaml")
    layout = mapping_layout(built.output_dir)
    ebs, instance_store, devices = attach(layout, tmp_path)
    with VirtualMachine(layout.root, "uefi", ec2=True, extra_disks=ebs,
                        instance_store=instance_store, root_size=layout.root_size,
                        instance=Instance(block_devices=devices)) as vm:
        vm.wait_for(timeout=400)
        ssh = lambda command: vm.ssh("admin", ssh_key, command).strip()  # noqa: E731
        # NVMe names follow the order the controllers are found in, on EC2 as here: the
        # volume is told by its serial, and the image mounts it by label
        source, fstype = ssh("findmnt -no SOURCE,FSTYPE /srv/data").split()
        assert source.startswith("/dev/nvme") and fstype == "ext4"
        assert ssh("hostname") == "ebs"
        assert ssh(f"lsblk -dno SERIAL {source}") == ebs_serial(1)
        assert "built by amiforge" in ssh("cat /srv/data/README")
        assert grown_root(ssh)[0] > 8 * 2**30 - 300 * 2**20  # the mapping's 8 GiB
        serials = dict(line.split() for line in ssh("lsblk -dnbo SERIAL,SIZE").splitlines())
        assert serials[instance_store_serial(0)] == str(INSTANCE_STORE_SIZE)
