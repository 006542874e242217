"""The EBS-backed and instance-store-backed recipes build and produce their manifests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from builder.plan import sha256_file
from tests.conftest import bundle_args, needs_root_tools, run_build

pytestmark = [pytest.mark.integration, needs_root_tools()]


def qemu_format(path: Path) -> str:
    info = subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                          capture_output=True, check=True, text=True).stdout
    return json.loads(info)["format"]


def test_ebs_outputs(build_recipe) -> None:
    built = build_recipe("debian-12-ebs.yaml")
    names = {p.name for p in built.output_dir.iterdir()}
    assert {"disk.raw", "disk.qcow2", "disk.vmdk", "disk.vhd", "volume-sdf.raw",
            "volume-sdf.qcow2", "register-image.json", "snapshots.json",
            "launch-permission.json", "build-manifest.json"} <= names
    assert qemu_format(built.artifact("disk.vmdk")) == "vmdk"
    vhd = built.artifact("disk.vhd")  # fixed VHD: the raw disk plus a 512-byte footer
    with open(vhd, "rb") as handle:
        handle.seek(-512, 2)
        footer = handle.read(512)
    assert footer[:8] == b"conectix" and footer[60:64] == (2).to_bytes(4, "big")  # fixed
    assert vhd.stat().st_size == (2 << 30) + 512
    request = json.loads(built.artifact("register-image.json").read_text())
    assert request["BootMode"] == "uefi-preferred"
    snapshots = json.loads(built.artifact("snapshots.json").read_text())["snapshots"]
    by_device = {s["device"]: s for s in snapshots}
    assert set(by_device) == {"/dev/xvda", "/dev/sdf"}
    for entry in snapshots:
        assert entry["sha256"] == sha256_file(built.artifact(entry["image"]))
        mapping = next(m for m in request["BlockDeviceMappings"]
                       if m["DeviceName"] == entry["device"])
        assert mapping["Ebs"]["SnapshotId"] == entry["placeholder"]
    assert by_device["/dev/sdf"]["size"] == 1 << 30
    permission = json.loads(built.artifact("launch-permission.json").read_text())
    assert permission["LaunchPermission"]["Add"] == [{"UserId": "123456789012"}]


def test_data_volume_is_a_labelled_filesystem(build_recipe) -> None:
    built = build_recipe("debian-12-ebs.yaml")
    blkid = subprocess.run(["blkid", "-p", "-o", "export", str(built.artifact("volume-sdf.raw"))],
                           capture_output=True, text=True, check=True).stdout
    assert "LABEL=data" in blkid and "TYPE=ext4" in blkid
    readme = subprocess.run(["debugfs", "-R", "cat /README", str(built.artifact("volume-sdf.raw"))],
                            capture_output=True, text=True, check=True).stdout
    assert "built by amiforge" in readme


def test_instance_store_bundle_round_trips(build_recipe, bundle_keys, tmp_path: Path) -> None:
    built = build_recipe("debian-12-instance-store.yaml", *bundle_args(bundle_keys))
    bundle = built.output_dir / "bundle"
    assert (bundle / "image.manifest.xml").is_file()
    parts = sorted(p.name for p in bundle.glob("image.part.*"))
    assert parts and all(len(p.split(".")[-1]) == len(str(len(parts))) for p in parts)
    restored = tmp_path / "restored.raw"
    result = run_build("unbundle", str(bundle / "image.manifest.xml"), "--user-key",
                       f"{bundle_keys['user']}-key.pem", "--output", str(restored))
    assert result.returncode == 0, result.stderr
    assert sha256_file(restored) == sha256_file(built.artifact("disk.raw"))
    request = json.loads(built.artifact("register-image.json").read_text())
    assert request["RootDeviceName"] == "/dev/sda1" and "ImageLocation" in request


def test_instance_store_without_keys_is_bad_input(tmp_path: Path) -> None:
    result = run_build("recipes/debian-12-instance-store.yaml", "-o", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "instance-store backing needs --user-cert" in result.stderr
    assert not (tmp_path / "o").exists()
