"""The AMI lifecycle on small output directories (made from a plan, no build) against a
moto server on 127.0.0.1 (never AWS): publish, copy, share, deregister, dry runs. The
publish through a proxy that injects faults (slow: botocore backs off) is in
tests/integration/test_publish.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from builder.cli import main
from tests.awstools import (
    OTHER,
    REGION,
    assert_snapshot_holds,
    client,
    small_output,
)

pytestmark = pytest.mark.usefixtures("fake_credentials")


@pytest.fixture
def aws(capsys: pytest.CaptureFixture[str]):
    """The CLI in this process (the same code as `build publish ...`, without a Python
    start per call): returns the exit code, stdout and stderr."""
    def call(*args: str, url: str, region: str = REGION) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main([*args, "--region", region, "--endpoint-url", url])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return call


def images_named(url: str, name: str) -> list[dict]:
    return client("ec2", url).describe_images(
        Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])["Images"]


def test_publish_then_copy_and_deregister(aws, moto_url: str, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "lifecycle-image")
    result = aws("publish", str(out), url=moto_url)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "publish.json").read_text())
    assert set(state["snapshot_ids"]) == {"/dev/xvda", "/dev/sdf"}
    assert_snapshot_holds(moto_url, state["snapshot_ids"]["/dev/xvda"], out / "disk.raw")
    assert_snapshot_holds(moto_url, state["snapshot_ids"]["/dev/sdf"], out / "volume-sdf.raw")
    [image] = images_named(moto_url, "lifecycle-image")
    assert image["ImageId"] == state["image_id"]
    ec2 = client("ec2", moto_url)
    permissions = ec2.describe_image_attribute(ImageId=image["ImageId"],
                                               Attribute="launchPermission")
    assert {"UserId": "123456789012"} in permissions["LaunchPermissions"]

    again = aws("publish", str(out), url=moto_url)
    assert again.returncode == 0
    assert len(images_named(moto_url, "lifecycle-image")) == 1

    copied = aws("copy", state["image_id"], "--to-region", OTHER, url=moto_url)
    assert copied.returncode == 0, copied.stderr
    copy_id = json.loads(copied.stdout)[OTHER]
    other = client("ec2", moto_url, OTHER)
    assert other.describe_images(ImageIds=[copy_id])["Images"][0]["Name"] == "lifecycle-image"

    for image_id, region in ((state["image_id"], REGION), (copy_id, OTHER)):
        gone = aws("deregister", image_id, "--delete-snapshots", url=moto_url, region=region)
        assert gone.returncode == 0, gone.stderr
    for region, image_id in ((REGION, state["image_id"]), (OTHER, copy_id)):
        assert not [i for i in client("ec2", moto_url, region).describe_images(
            Owners=["self"])["Images"] if i["ImageId"] == image_id]
    snapshots = {s["SnapshotId"] for s in ec2.describe_snapshots()["Snapshots"]}
    assert not set(state["snapshot_ids"].values()) & snapshots


def test_an_image_changed_after_the_build_is_not_published(aws, moto_url: str,
                                                           tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "changed-image")
    with open(out / "volume-sdf.raw", "r+b") as handle:
        handle.write(b"tampered")
    result = aws("publish", str(out), url=moto_url)
    assert result.returncode == 2
    assert "volume-sdf.raw: changed since the build" in result.stderr
    assert not images_named(moto_url, "changed-image")


def test_share_public_and_private(aws, moto_url: str, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "share-test-image")
    assert aws("publish", str(out), url=moto_url).returncode == 0
    image_id = json.loads((out / "publish.json").read_text())["image_id"]
    ec2 = client("ec2", moto_url)
    assert aws("share", image_id, "--public", url=moto_url).returncode == 0
    attribute = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    assert {"Group": "all"} in attribute["LaunchPermissions"]
    assert aws("share", image_id, "--private", url=moto_url).returncode == 0
    attribute = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    assert attribute["LaunchPermissions"] == []


def test_dry_run_makes_no_calls(aws, moto_url: str, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "dry-run-image")
    result = aws("publish", str(out), "--dry-run", url=moto_url)
    assert result.returncode == 0, result.stderr
    assert "would call ec2.RegisterImage" in result.stdout
    assert "secret" not in (result.stdout + result.stderr).lower()
    assert not client("ec2", moto_url).describe_images(
        Owners=["self"], Filters=[{"Name": "name", "Values": ["dry-run-image"]}])["Images"]
    assert not (out / "publish.json").exists()
