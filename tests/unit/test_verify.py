"""Snapshots read back and compared with their images: `build verify-snapshot` and
`build publish --verify`, against moto behind the validating layer, which can serve a
block with one byte flipped (and a checksum matching the flipped bytes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.aws.snapshots import BLOCK
from builder.aws.verify import verify_snapshot
from tests.awstools import client, published, small_output, verify_with_a_corrupted_block

pytestmark = pytest.mark.usefixtures("fake_credentials")


def test_publish_verify_records_every_snapshot_equal(aws, aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "verified-image", encrypted_volume=False)
    result = aws("publish", str(out), "--verify", url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-3000:]
    state = published(out)
    for device, snapshot_id in state["snapshot_ids"].items():
        verified = state["verified"][device]
        assert verified["ok"] and verified["snapshot_id"] == snapshot_id
        assert verified["blocks_read"] == verified["blocks_total"] > 0  # zeros read too
        assert verified["absent_zero"] == 0
    again = aws("publish", str(out), "--verify", url=aws_rules.url)
    assert again.returncode == 0 and "verified by an earlier run" in again.stderr


def test_verify_snapshot_names_the_corrupted_block(aws, aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "corrupted-image", encrypted_volume=False)
    assert aws("publish", str(out), url=aws_rules.url).returncode == 0
    snapshot_id = published(out)["snapshot_ids"]["/dev/xvda"]
    clean = aws("verify-snapshot", snapshot_id, str(out / "disk.raw"), url=aws_rules.url)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith(f"{snapshot_id} equals disk.raw")
    bad = verify_with_a_corrupted_block(aws, aws_rules, snapshot_id, out / "disk.raw", 3)
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["differing"] == [3] and not report["ok"]
    other = aws("verify-snapshot", snapshot_id, str(out / "volume-sdf.raw"), url=aws_rules.url)
    assert other.returncode == 1 and "differs from volume-sdf.raw" in other.stdout


def test_publish_verify_refuses_to_register_a_corrupted_snapshot(aws, aws_rules,
                                                                  tmp_path: Path) -> None:
    """The layer corrupts block 2 of whichever snapshot publish makes for the root: the
    AMI is not registered, the record forgets the snapshot, and publishing again (the
    fault gone) uploads the image anew."""
    out = small_output(tmp_path / "out", "refused-image", encrypted_volume=False)
    result = _publish_with_fault(aws, aws_rules, out)
    assert result.returncode == 1
    assert "/dev/xvda" in result.stderr and "index 2" in result.stderr
    state = published(out)
    assert "image_id" not in state and "/dev/xvda" not in state["snapshot_ids"]
    assert not state["verified"]["/dev/xvda"]["ok"]
    again = aws("publish", str(out), "--verify", url=aws_rules.url)
    assert again.returncode == 0, again.stderr[-3000:]
    state = published(out)
    assert state["image_id"] and state["verified"]["/dev/xvda"]["ok"]


def _publish_with_fault(aws, aws_rules, out: Path):
    """publish --verify with block 2 of every snapshot served corrupted (a watcher thread
    that marked each new one raced verify's first reads)."""
    with aws_rules.snapshots.lock:
        aws_rules.snapshots.corrupt.add(("*", 2))
    try:
        return aws("publish", str(out), "--verify", "--workers", "2", url=aws_rules.url)
    finally:
        aws_rules.snapshots.corrupt.clear()


def test_zero_blocks_an_unencrypted_snapshot_lacks_read_as_zeros(aws, aws_rules,
                                                                  tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "sparse-image", encrypted_volume=False)
    result = aws("publish", str(out), "--skip-zero-blocks", "--verify", url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-3000:]
    verified = published(out)["verified"]["/dev/xvda"]
    assert verified["ok"] and verified["absent_zero"] > 0
    size = (out / "disk.raw").stat().st_size
    assert verified["blocks_read"] + verified["absent_zero"] == -(-size // BLOCK)


def test_verify_snapshot_bad_input(aws, aws_rules, tmp_path: Path) -> None:
    result = aws("verify-snapshot", "not-a-snapshot", str(tmp_path), url=aws_rules.url)
    assert result.returncode == 2 and "not a snapshot id" in result.stderr
    missing = aws("verify-snapshot", "snap-0123456789abcdef0", str(tmp_path / "nothing"),
                  url=aws_rules.url)
    assert missing.returncode == 2 and "not an image file" in missing.stderr


def test_a_block_garbled_in_transfer_is_unreadable_not_different(aws, aws_rules,
                                                                 tmp_path: Path) -> None:
    """Read three times, never matching its checksum: reported as unreadable (try again),
    and publish keeps the snapshot in its record."""
    out = small_output(tmp_path / "out", "garbled-image", encrypted_volume=False)
    assert aws("publish", str(out), url=aws_rules.url).returncode == 0
    snapshot_id = published(out)["snapshot_ids"]["/dev/xvda"]
    with aws_rules.snapshots.lock:
        aws_rules.snapshots.garbled.add((snapshot_id, 1))
    try:
        result = aws("verify-snapshot", snapshot_id, str(out / "disk.raw"), "--json",
                     url=aws_rules.url)
        again = aws("publish", str(out), "--verify", url=aws_rules.url)
    finally:
        aws_rules.snapshots.garbled.clear()
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["unreadable"] == [1] and report["differing"] == []
    assert again.returncode == 1 and "could not be read whole" in again.stderr
    assert published(out)["snapshot_ids"]["/dev/xvda"] == snapshot_id  # kept


def test_public_snapshots_are_not_read(aws, aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "public-image", encrypted_volume=False)
    assert aws("publish", str(out), url=aws_rules.url).returncode == 0
    snapshot_id = published(out)["snapshot_ids"]["/dev/sdf"]
    client("ec2", aws_rules.url).modify_snapshot_attribute(
        SnapshotId=snapshot_id, Attribute="createVolumePermission",
        OperationType="add", GroupNames=["all"])
    result = aws("verify-snapshot", snapshot_id, str(out / "volume-sdf.raw"), url=aws_rules.url)
    assert result.returncode == 2 and "public" in result.stderr


def test_publish_is_strict_about_absent_blocks_unless_it_skipped_zeros(
        aws, aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "strict-image", encrypted_volume=False)
    assert aws("publish", str(out), "--skip-zero-blocks", url=aws_rules.url).returncode == 0
    snapshot_id = published(out)["snapshot_ids"]["/dev/xvda"]
    ebs, ec2 = client("ebs", aws_rules.url), client("ec2", aws_rules.url)
    strict = verify_snapshot(ebs, ec2, snapshot_id, out / "disk.raw", absent_zeros=False)
    assert strict.differing and not strict.ok  # what an all-blocks upload must not lack
    assert verify_snapshot(ebs, ec2, snapshot_id, out / "disk.raw").ok


def test_a_pending_snapshot_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """EBS reads only completed snapshots (ebsapi-faq); right after CompleteSnapshot one
    may still be pending. (botocore's Stubber answers the calls.)"""
    import boto3
    from botocore.stub import Stubber

    from builder.aws import verify

    monkeypatch.setattr(verify, "COMPLETED_WAIT", {"Delay": 0, "MaxAttempts": 3})
    ec2 = boto3.client("ec2", region_name="us-east-1")
    stub = Stubber(ec2)
    snapshot = {"SnapshotId": "snap-0123456789abcdef0", "Encrypted": False}
    for state in ("pending", "pending", "completed", "completed"):
        stub.add_response("describe_snapshots", {"Snapshots": [{**snapshot, "State": state}]})
    stub.add_response("describe_snapshot_attribute", {"CreateVolumePermissions": []})
    with stub:
        assert verify.completed_snapshot(ec2, snapshot["SnapshotId"])["State"] == "completed"
    stub.assert_no_pending_responses()
