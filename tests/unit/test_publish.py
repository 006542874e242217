"""The AMI lifecycle on small output directories (made from a plan, no build) against a
moto server on 127.0.0.1 (never AWS): publish, copy, share, deregister, dry runs. The
publish through a proxy that injects faults (slow: botocore backs off) is in
tests/integration/test_publish.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from builder.amiplan import LaunchPermissions
from builder.aws.snapshots import BLOCK
from tests.awstools import (
    OTHER,
    REGION,
    assert_snapshot_holds,
    client,
    published,
    small_output,
)

pytestmark = pytest.mark.usefixtures("fake_credentials")


def images_named(url: str, name: str) -> list[dict]:
    return client("ec2", url).describe_images(
        Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])["Images"]


def test_publish_then_copy_and_deregister(aws, aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "lifecycle-image", encrypted_volume=False)
    result = aws("publish", str(out), url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-3000:]
    state = published(out)
    assert set(state["snapshot_ids"]) == {"/dev/xvda", "/dev/sdf"}
    assert_snapshot_holds(aws_rules, state["snapshot_ids"]["/dev/xvda"], out / "disk.raw")
    assert_snapshot_holds(aws_rules, state["snapshot_ids"]["/dev/sdf"], out / "volume-sdf.raw")
    [image] = images_named(aws_rules.url, "lifecycle-image")
    assert image["ImageId"] == state["image_id"]
    ec2 = client("ec2", aws_rules.url)
    permissions = ec2.describe_image_attribute(ImageId=image["ImageId"],
                                               Attribute="launchPermission")
    assert {"UserId": "123456789012"} in permissions["LaunchPermissions"]

    again = aws("publish", str(out), url=aws_rules.url)
    assert again.returncode == 0
    assert len(images_named(aws_rules.url, "lifecycle-image")) == 1

    copied = aws("copy", state["image_id"], "--to-region", OTHER, url=aws_rules.url)
    assert copied.returncode == 0, copied.stderr
    copy_id = json.loads(copied.stdout)[OTHER]
    other = client("ec2", aws_rules.url, OTHER)
    assert other.describe_images(ImageIds=[copy_id])["Images"][0]["Name"] == "lifecycle-image"

    for image_id, region in ((state["image_id"], REGION), (copy_id, OTHER)):
        gone = aws("deregister", image_id, "--delete-snapshots", url=aws_rules.url, region=region)
        assert gone.returncode == 0, gone.stderr
    for region, image_id in ((REGION, state["image_id"]), (OTHER, copy_id)):
        assert not [i for i in client("ec2", aws_rules.url, region).describe_images(
            Owners=["self"])["Images"] if i["ImageId"] == image_id]
    snapshots = {s["SnapshotId"] for s in ec2.describe_snapshots()["Snapshots"]}
    assert not set(state["snapshot_ids"].values()) & snapshots


def test_an_image_changed_after_the_build_is_not_published(aws, aws_rules,
                                                           tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "changed-image")
    with open(out / "volume-sdf.raw", "r+b") as handle:
        handle.write(b"tampered")
    result = aws("publish", str(out), url=aws_rules.url)
    assert result.returncode == 2
    assert "volume-sdf.raw: changed since the build" in result.stderr
    assert not images_named(aws_rules.url, "changed-image")


def test_share_public_and_private(aws, aws_rules, tmp_path: Path) -> None:
    encrypted = small_output(tmp_path / "encrypted", "share-encrypted-image")
    assert aws("publish", str(encrypted), url=aws_rules.url).returncode == 0
    refused = aws("share", published(encrypted)["image_id"], "--public", url=aws_rules.url)
    assert refused.returncode == 2 and "encrypted snapshots" in refused.stderr
    out = small_output(tmp_path / "out", "share-test-image", encrypted_volume=False)
    assert aws("publish", str(out), url=aws_rules.url).returncode == 0
    image_id = published(out)["image_id"]
    ec2 = client("ec2", aws_rules.url)
    assert aws("share", image_id, "--public", url=aws_rules.url).returncode == 0
    attribute = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    assert {"Group": "all"} in attribute["LaunchPermissions"]
    assert aws("share", image_id, "--private", url=aws_rules.url).returncode == 0
    attribute = ec2.describe_image_attribute(ImageId=image_id, Attribute="launchPermission")
    assert attribute["LaunchPermissions"] == []


def test_dry_run_makes_no_calls(aws, aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "dry-run-image")
    result = aws("publish", str(out), "--dry-run", url=aws_rules.url)
    assert result.returncode == 0, result.stderr
    assert "would call ec2.RegisterImage" in result.stdout
    assert "secret" not in (result.stdout + result.stderr).lower()
    assert not client("ec2", aws_rules.url).describe_images(
        Owners=["self"], Filters=[{"Name": "name", "Values": ["dry-run-image"]}])["Images"]
    assert not (out / "publish.json").exists()


def read_volume(rules, snapshot_id: str, size: int, target: Path) -> Path:
    """The volume a snapshot makes, as an instance would read it (tests/awsrules.py)."""
    with open(target, "wb") as out:
        for index in range(-(-size // BLOCK)):
            out.write(rules.volume_block(REGION, snapshot_id, index))
        out.truncate(size)
    return target


def test_every_block_is_written_encrypted_or_not(aws, aws_rules, tmp_path: Path) -> None:
    """/dev/sdf encrypted by the recipe, the root plain: both are written whole (zero blocks
    too: a plain snapshot can still become an encrypted volume at launch), both read back
    as the image from an encrypted volume, the ext4 clean. publish.json says which."""
    out = small_output(tmp_path / "out", "encrypted-image")
    result = aws("publish", str(out), url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-3000:]
    record = published(out)
    volume = out / "volume-sdf.raw"
    uploads = record["uploads"]
    assert {k: uploads["/dev/sdf"][k] for k in ("encrypted", "blocks_skipped",
                                                 "blocks_written")} == {
        "encrypted": True, "blocks_skipped": 0,
        "blocks_written": volume.stat().st_size // BLOCK}
    assert uploads["/dev/xvda"]["encrypted"] is False
    assert uploads["/dev/xvda"]["blocks_skipped"] == 0
    assert_snapshot_holds(aws_rules, record["snapshot_ids"]["/dev/xvda"], out / "disk.raw")
    snapshot = record["snapshot_ids"]["/dev/sdf"]
    assert aws_rules.snapshots.encrypted[snapshot]
    assert_snapshot_holds(aws_rules, snapshot, volume)
    back = read_volume(aws_rules, snapshot, volume.stat().st_size, tmp_path / "back.img")
    subprocess.run(["e2fsck", "-fn", str(back)], check=True, capture_output=True)


def test_the_accounts_encryption_by_default_is_honoured(aws, aws_rules,
                                                        tmp_path: Path) -> None:
    """A plain recipe in an account that encrypts every new snapshot: publish asks
    GetEbsEncryptionByDefault and writes every block, so the filesystem reads back clean.
    Skipping zero blocks there (what publish did before) leaves random bytes where ext4
    was made to expect zeros (its unused inode tables, which e2fsck does not read but the
    kernel trusts when it allocates there): the volume no longer reads as the image.
    The recipe shares the AMI with an account: under the AWS managed key (the default
    key's) AWS would refuse that after the upload, so publish refuses it before."""
    from builder.aws.snapshots import Encryption, upload_image

    shared = small_output(tmp_path / "shared", "default-encrypted", encrypted_volume=False)
    out = small_output(tmp_path / "out", "default-encrypted", encrypted_volume=False,
                       launch_permissions=LaunchPermissions())
    volume = out / "volume-sdf.raw"
    ec2 = client("ec2", aws_rules.url)
    ec2.enable_ebs_encryption_by_default()
    try:
        refused = aws("publish", str(shared), url=aws_rules.url)
        result = aws("publish", str(out), url=aws_rules.url)
        skipped, _ = upload_image(client("ebs", aws_rules.url), volume, description="old",
                                  tags={}, encryption=Encryption(False),
                                  skip_zero_blocks=True)
    finally:
        ec2.disable_ebs_encryption_by_default()
    assert refused.returncode == 2 and "AWS managed key" in refused.stderr
    assert not (shared / "publish.json").exists()  # refused before any upload
    assert result.returncode == 0, result.stderr[-3000:]
    record = published(out)
    assert all(u["encrypted"] for u in record["uploads"].values())
    snapshot = record["snapshot_ids"]["/dev/sdf"]
    back = read_volume(aws_rules, snapshot, volume.stat().st_size, tmp_path / "back.img")
    subprocess.run(["e2fsck", "-fn", str(back)], check=True, capture_output=True)
    broken = read_volume(aws_rules, skipped, volume.stat().st_size, tmp_path / "broken.img")
    assert broken.read_bytes() != volume.read_bytes()


def test_a_recorded_ami_is_checked_and_each_target_has_its_own_record(
        aws, aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "target-image")
    assert aws("publish", str(out), url=aws_rules.url).returncode == 0
    first = published(out)["image_id"]
    assert aws("deregister", first, url=aws_rules.url).returncode == 0
    again = aws("publish", str(out), url=aws_rules.url)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "is gone" in again.stderr
    second = published(out)["image_id"]
    assert second != first and images_named(aws_rules.url, "target-image")[0]["ImageId"] == second
    other = aws("publish", str(out), url=aws_rules.url, region=OTHER)
    assert other.returncode == 0, other.stderr[-2000:]
    targets = json.loads((out / "publish.json").read_text())["targets"]
    assert sorted(t.split("/")[1].split("@")[0] for t in targets) == sorted([REGION, OTHER])


def test_skip_zero_blocks_is_for_plain_snapshots_only(aws, aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "skipping-image")
    result = aws("publish", str(out), "--skip-zero-blocks", url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-3000:]
    record = published(out)
    assert record["uploads"]["/dev/xvda"]["blocks_skipped"] > 0
    assert record["uploads"]["/dev/sdf"]["blocks_skipped"] == 0  # encrypted: whole
    assert_snapshot_holds(aws_rules, record["snapshot_ids"]["/dev/xvda"], out / "disk.raw",
                          skipped_zeros=True)


def test_a_kms_key_is_given_to_start_snapshot_as_its_arn(aws, aws_rules,
                                                         tmp_path: Path) -> None:
    """--kms-key-id takes an alias; StartSnapshot only an ARN (the layer refuses others)."""
    kms = client("kms", aws_rules.url)
    arn = kms.create_key()["KeyMetadata"]["Arn"]
    kms.create_alias(AliasName="alias/amiforge-test", TargetKeyId=arn)
    out = small_output(tmp_path / "out", "kms-image")
    result = aws("publish", str(out), "--kms-key-id", "alias/amiforge-test", url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-3000:]
    record = published(out)
    assert all(u["encrypted"] for u in record["uploads"].values())
    assert all(aws_rules.snapshots.encrypted[s] for s in record["snapshot_ids"].values())
    missing = aws("publish", str(small_output(tmp_path / "o2", "kms-missing")),
                  "--kms-key-id", "alias/nope", url=aws_rules.url)
    assert missing.returncode == 2 and "KMS key 'alias/nope'" in missing.stderr


def test_a_snapshot_made_otherwise_is_not_reused(aws, aws_rules, tmp_path: Path) -> None:
    """Published plain, deregistered, published again with a key: the snapshots are made
    again, encrypted, not taken from the first run."""
    kms = client("kms", aws_rules.url)
    arn = kms.create_key()["KeyMetadata"]["Arn"]
    out = small_output(tmp_path / "out", "reuse-image", encrypted_volume=False)
    assert aws("publish", str(out), url=aws_rules.url).returncode == 0
    first = published(out)
    assert aws("deregister", first["image_id"], url=aws_rules.url).returncode == 0
    again = aws("publish", str(out), "--kms-key-id", arn, url=aws_rules.url)
    assert again.returncode == 0, again.stderr[-2000:]
    second = published(out)
    assert "reusing" not in again.stderr
    assert set(second["snapshot_ids"].values()).isdisjoint(first["snapshot_ids"].values())
    assert all(aws_rules.snapshots.encrypted[s] for s in second["snapshot_ids"].values())


def test_an_older_publish_json_is_kept_and_started_over(aws, aws_rules,
                                                        tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "legacy-image")
    (out / "publish.json").write_text(json.dumps({"image_id": "ami-0123456789abcdef0",
                                                  "snapshot_ids": {}, "region": REGION}))
    assert aws("publish", str(out), url=aws_rules.url).returncode == 0
    data = json.loads((out / "publish.json").read_text())
    assert data["legacy"]["image_id"] == "ami-0123456789abcdef0"
    assert published(out)["image_id"] != "ami-0123456789abcdef0"
