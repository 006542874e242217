"""The AMI recipes boot: the EBS recipe with its data volume attached as a second disk
(mounted by label), the instance-store recipe with BIOS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.vm import VirtualMachine
from tests.conftest import bundle_args, copy_recipes, needs_root_tools, run_build

pytestmark = [pytest.mark.boot, needs_root_tools()]


def test_ebs_image_mounts_its_data_volume(build_recipe, ssh_key: Path) -> None:
    """Debian 12's EBS recipe. (Debian 13's boots as an instance of its block device
    mapping: test_boot_ec2.)"""
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


def test_xfs_volume_and_a_package_added_to_a_cached_bootstrap(
        tmp_path: Path, suite_cache: Path, ssh_key: Path) -> None:
    """Two paths no shipped recipe takes: a package added to a recipe whose bootstrap is
    cached is installed into a copy of it with apt ("extended"), and an xfs data volume is
    made from a protofile; both work in the booted image."""
    recipes = copy_recipes(tmp_path / "recipes")
    public = ssh_key.with_suffix(".pub").read_text().strip()
    common = ["--cache-dir", str(suite_cache), "--var", f"admin_key={public}"]
    base = run_build(str(recipes / "debian-12-minimal.yaml"), *common,
                     "-o", str(tmp_path / "base"))
    assert base.returncode == 0, base.stderr[-2000:]
    (recipes / "more.yaml").write_text(
        "extends: debian-12-minimal.yaml\nname: more-image\nroot_volume:\n"
        "  packages: [tree]\n"
        "block_device_mappings:\n  - device: /dev/sdf\n    ebs:\n      volume_size: 1\n"
        "      content:\n        filesystem: xfs\n        label: xdata\n"
        "        mount_point: /srv/xdata\n"
        "        files: [{src: files/data/README, dest: /docs/README, mode: \"0640\"}]\n")
    result = run_build(str(recipes / "more.yaml"), *common, "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "out/build-manifest.json").read_text())
    assert manifest["stages"]["bootstrap"]["source"] == "extended"
    assert "tree" in {p["name"] for p in manifest["packages"]}
    out = tmp_path / "out"
    with VirtualMachine(out / "disk.qcow2", "uefi", extra_disks=[out / "volume-sdf.raw"]) as vm:
        vm.wait_for(timeout=300)
        assert vm.ssh("admin", ssh_key, "tree --version").startswith("tree v")
        mount = vm.ssh("admin", ssh_key, "findmnt -no FSTYPE,LABEL /srv/xdata").split()
        assert mount == ["xfs", "xdata"]
        listing = vm.ssh("admin", ssh_key, "sudo -n stat -c '%a %n' /srv/xdata/docs/README")
        assert listing.strip() == "640 /srv/xdata/docs/README"
        assert "built by amiforge" in vm.ssh("admin", ssh_key,
                                             "sudo -n cat /srv/xdata/docs/README")
