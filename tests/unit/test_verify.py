"""Snapshots read back and compared with their images: `build verify-snapshot` and
`build publish --verify`, against moto behind the validating layer, which can serve a
block with one byte flipped (and a checksum matching the flipped bytes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.aws.snapshots import BLOCK
from tests.awstools import client, published, small_output

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
    with aws_rules.snapshots.lock:
        aws_rules.snapshots.corrupt.add((snapshot_id, 3))
    try:
        bad = aws("verify-snapshot", snapshot_id, str(out / "disk.raw"), "--json",
                  url=aws_rules.url)
    finally:
        aws_rules.snapshots.corrupt.clear()
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
    known = {s["SnapshotId"] for s in client("ec2", aws_rules.url).describe_snapshots(
        OwnerIds=["self"])["Snapshots"]}
    result = _publish_with_fault(aws, aws_rules, out, known)
    assert result.returncode == 1
    assert "/dev/xvda" in result.stderr and "index 2" in result.stderr
    state = published(out)
    assert "image_id" not in state and "/dev/xvda" not in state["snapshot_ids"]
    assert not state["verified"]["/dev/xvda"]["ok"]
    again = aws("publish", str(out), "--verify", url=aws_rules.url)
    assert again.returncode == 0, again.stderr[-3000:]
    state = published(out)
    assert state["image_id"] and state["verified"]["/dev/xvda"]["ok"]


def _publish_with_fault(aws, aws_rules, out: Path, known: set[str]):
    """publish --verify with block 2 of each new snapshot served corrupted."""
    import threading

    stop = threading.Event()
    ec2 = client("ec2", aws_rules.url)

    def corrupt_new_snapshots() -> None:
        while not stop.is_set():
            for snapshot in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]:
                if snapshot["SnapshotId"] not in known:
                    with aws_rules.snapshots.lock:
                        aws_rules.snapshots.corrupt.add((snapshot["SnapshotId"], 2))
            stop.wait(0.05)

    watcher = threading.Thread(target=corrupt_new_snapshots)
    watcher.start()
    try:
        return aws("publish", str(out), "--verify", "--workers", "2", url=aws_rules.url)
    finally:
        stop.set()
        watcher.join()
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
