"""Delta publish: block indexes, which blocks a child snapshot is sent, the layer's
incremental snapshots (tests/ebslineage.py), and `build publish --parent` against moto
behind the layer: only the changed blocks go, and the child reads as the new image."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from builder.aws.blockindex import (
    INDEX_TAG,
    ZERO,
    BlockIndex,
    after_writes,
    delta_writes,
    full_writes,
    image_blocks,
    index_digest,
    vouched_index,
)
from builder.aws.snapshots import BLOCK
from builder.errors import BuildFailed
from builder.plan import sha256_file
from tests import ebslineage
from tests.awstools import client, published, small_output, verify_with_a_corrupted_block

pytestmark = pytest.mark.usefixtures("fake_credentials")

A, B, C = ("a" * 64), ("b" * 64), ("c" * 64)


# --- which blocks a child is sent --------------------------------------------------------

def test_only_blocks_whose_hash_differs_are_sent() -> None:
    parent = BlockIndex("snap-00000001", (A, B, ZERO, None))
    assert delta_writes([A, C, ZERO, ZERO], parent, zeros_held=False) == [1]
    # an encrypted child must hold its zeros: where the parent holds nothing, they are sent
    assert delta_writes([A, C, ZERO, ZERO], parent, zeros_held=True) == [1, 3]


def test_a_block_that_became_zeros_is_written_as_zeros() -> None:
    parent = BlockIndex("snap-00000001", (A, B, C))
    assert delta_writes([A, ZERO, C], parent, zeros_held=False) == [1]
    index = after_writes("snap-00000002", [A, ZERO, C], [1], parent)
    assert index.blocks == (A, ZERO, C)


def test_a_parent_s_data_past_the_new_image_s_end_is_overwritten() -> None:
    parent = BlockIndex("snap-00000001", (A, B, C, ZERO, None))
    writes = delta_writes([A, B], parent, zeros_held=True)
    assert writes == [2]  # zeros over C; the parent's zero block and hole are fine
    assert after_writes("snap-00000002", [A, B], writes, parent).blocks == \
        (A, B, ZERO, ZERO, None)


def test_a_full_upload_sends_zeros_unless_asked_not_to() -> None:
    image = [A, ZERO, B]
    assert full_writes(image, zeros_held=True) == [0, 1, 2]
    assert full_writes(image, zeros_held=False) == [0, 2]
    assert after_writes("snap-00000001", image, [0, 2]).blocks == (A, None, B)


def test_image_blocks_hash_data_and_mark_zeros(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    with open(image, "wb") as handle:
        handle.truncate(3 * BLOCK + 10)
        handle.seek(BLOCK)
        handle.write(b"x" * BLOCK)
        handle.seek(2 * BLOCK)
        handle.write(bytes(BLOCK))  # written zeros are zeros too
        handle.seek(3 * BLOCK)
        handle.write(b"tail")
    blocks = image_blocks(image)
    assert blocks[0] == ZERO and blocks[2] == ZERO
    assert blocks[1] == hashlib.sha256(b"x" * BLOCK).hexdigest()
    assert blocks[3] == hashlib.sha256(b"tail".ljust(BLOCK, b"\0")).hexdigest()


# --- the layer's incremental snapshots ---------------------------------------------------

def test_a_child_reads_its_parent_s_blocks_unless_it_wrote_its_own() -> None:
    own = {"snap-p": {0: "p0", 1: "p1"}, "snap-c": {1: "c1", 2: "c2"}}
    parents = {"snap-c": "snap-p"}
    child = ebslineage.effective_blocks("snap-c", parents, own.__getitem__)
    assert child == {0: ("p0", "snap-p"), 1: ("c1", "snap-c"), 2: ("c2", "snap-c")}
    parent = ebslineage.effective_blocks("snap-p", parents, own.__getitem__)
    assert ebslineage.changed_blocks(parent, child) == [
        {"BlockIndex": 1, "FirstBlockToken": "p1", "SecondBlockToken": "c1"},
        {"BlockIndex": 2, "SecondBlockToken": "c2"}]
    assert ebslineage.holder("snap-c", 0, parents, {"snap-p": {0}, "snap-c": {1}}) == "snap-p"


def test_listings_are_paged_as_aws_pages_them() -> None:
    entries = [{"BlockIndex": i} for i in range(250)]
    first, token = ebslineage.page(entries, {"maxResults": ["100"]})
    assert [e["BlockIndex"] for e in first] == list(range(100))
    second, _ = ebslineage.page(entries, {"maxResults": ["100"], "pageToken": [token]})
    assert second[0]["BlockIndex"] == 100
    last, end = ebslineage.page(entries, {"startingBlockIndex": ["200"]})
    assert len(last) == 50 and end is None
    assert "between 100 and 10000" in ebslineage.page(entries, {"maxResults": ["5"]})


def test_start_snapshot_with_a_parent_follows_the_encryption_outcomes() -> None:
    problem = ebslineage.parent_problem
    assert "Encrypted" in problem({"Encrypted": True}, True, False)
    assert "encryption by default" in problem({}, False, True)
    assert "KmsKeyArn" in problem({"KmsKeyArn": "arn:aws:kms:r:1:key/k"}, True, False)
    assert problem({}, True, True) is None and problem({}, False, False) is None


def test_the_layer_refuses_what_aws_refuses_of_parents_and_listings(aws_rules) -> None:
    ebs, ec2 = client("ebs", aws_rules.url), client("ec2", aws_rules.url)
    parent = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    with pytest.raises(ClientError, match="pending"):  # not completed yet
        ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=parent)
    with pytest.raises(ClientError, match="pending"):
        ebs.list_snapshot_blocks(SnapshotId=parent)
    ebs.complete_snapshot(SnapshotId=parent, ChangedBlocksCount=0)
    with pytest.raises(ClientError, match="ValidationException"):
        ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=parent, Encrypted=True)
    with pytest.raises(ClientError, match="ResourceNotFoundException"):
        ebs.start_snapshot(VolumeSize=1, ParentSnapshotId="snap-0123456789abcdef0")
    child = ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=parent)["SnapshotId"]
    ebs.complete_snapshot(SnapshotId=child, ChangedBlocksCount=0)
    other = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    ebs.complete_snapshot(SnapshotId=other, ChangedBlocksCount=0)
    assert ebs.list_changed_blocks(FirstSnapshotId=parent,
                                   SecondSnapshotId=child)["ChangedBlocks"] == []
    with pytest.raises(ClientError, match="same lineage"):
        ebs.list_changed_blocks(FirstSnapshotId=other, SecondSnapshotId=child)
    with pytest.raises(ClientError, match="FirstSnapshotId"):
        ebs.list_changed_blocks(SecondSnapshotId=child)
    # a snapshot taken of a volume may be a parent too (writesnapshots: snapshot D)
    volume = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
    taken = ec2.create_snapshot(VolumeId=volume)["SnapshotId"]
    ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=taken)


def test_completion_is_checked_against_the_blocks_written() -> None:
    from tests.awsrules import completion_problem

    written = {0: base64.b64encode(hashlib.sha256(b"a").digest()).decode()}
    right = base64.b64encode(hashlib.sha256(base64.b64decode(written[0])).digest()).decode()
    assert completion_problem({"x-amz-ChangedBlocksCount": "1", "x-amz-Checksum": right},
                              written) is None
    assert "ChangedBlocksCount 7" in completion_problem({"x-amz-ChangedBlocksCount": "7"},
                                                        written)
    assert "aggregate" in completion_problem({"x-amz-ChangedBlocksCount": "1",
                                              "x-amz-Checksum": "AAAA"}, written)


# --- build publish --parent ---------------------------------------------------------------

def next_release(previous: Path, target: Path, name: str, edits: dict[int, bytes | None]
                 ) -> Path:
    """A copy of an output directory whose disk.raw has these blocks replaced (None: made
    zeros), under another AMI name: what a one-file change in a reproducible build gives."""
    shutil.copytree(previous, target, ignore=shutil.ignore_patterns("publish.json*"),
                    copy_function=lambda s, d: subprocess.run(
                        ["cp", "--sparse=always", s, d], check=True))
    with open(target / "disk.raw", "r+b") as handle:
        for index, data in edits.items():
            handle.seek(index * BLOCK)
            handle.write(data if data is not None else bytes(BLOCK))
    for name_file in ("register-image.json", "build-manifest.json"):
        document = json.loads((target / name_file).read_text())
        document["Name" if name_file == "register-image.json" else "name"] = name
        (target / name_file).write_text(json.dumps(document))
    listing = json.loads((target / "snapshots.json").read_text())
    for entry in listing["snapshots"]:
        entry["sha256"] = sha256_file(target / entry["image"])
    (target / "snapshots.json").write_text(json.dumps(listing))
    return target


def test_publish_parent_sends_only_the_changed_blocks(aws, aws_rules, tmp_path: Path) -> None:
    first = small_output(tmp_path / "r1", "delta-r1", encrypted_volume=False)
    assert aws("publish", str(first), url=aws_rules.url).returncode == 0
    # blocks 1 to 4 hold data: 3 changes, 4 becomes zeros, 1 and 2 stay
    second = next_release(first, tmp_path / "r2", "delta-r2", {3: b"\x01" * BLOCK, 4: None})
    result = aws("publish", str(second), "--parent", str(first), "--verify", url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-3000:]
    parent_id = published(first)["snapshot_ids"]["/dev/xvda"]
    record = published(second)
    child_id = record["snapshot_ids"]["/dev/xvda"]
    assert aws_rules.snapshots.parents[child_id] == parent_id
    assert aws_rules.snapshots.written[child_id] == {3, 4}  # PutSnapshotBlock calls
    assert record["uploads"]["/dev/xvda"]["blocks_written"] == 2
    assert record["verified"]["/dev/xvda"]["ok"]  # the whole volume, parent blocks included
    image = (second / "disk.raw").read_bytes()
    for index in range(len(image) // BLOCK):
        assert aws_rules.volume_block("us-east-1", child_id, index) == \
            image[index * BLOCK:(index + 1) * BLOCK], index
    changed = client("ebs", aws_rules.url).list_changed_blocks(
        FirstSnapshotId=parent_id, SecondSnapshotId=child_id)["ChangedBlocks"]
    assert [b["BlockIndex"] for b in changed] == [3, 4]
    # the unchanged data volume: a child with no block of its own
    sdf = record["snapshot_ids"]["/dev/sdf"]
    assert aws_rules.snapshots.written[sdf] == set()
    # each recorded index is what the snapshot holds: the image's blocks (all were sent)
    assert published(first)["uploads"]["/dev/xvda"]["block_index"]["blocks"] == \
        image_blocks(first / "disk.raw")
    assert record["uploads"]["/dev/xvda"]["block_index"]["blocks"] == \
        image_blocks(second / "disk.raw")
    assert record["uploads"]["/dev/xvda"]["block_index"]["blocks"][4] == ZERO
    # the parent's recorded index was used (its snapshot's tag holds its digest): no read
    assert "from its recorded block index" in result.stderr
    assert "ListSnapshotBlocks" not in result.stderr
    assert aws_rules.snapshots.completion_mismatches == []
    # verify covers the blocks the child inherits: one served corrupted is named
    bad = verify_with_a_corrupted_block(aws, aws_rules, child_id, second / "disk.raw", 1)
    assert bad.returncode == 1 and json.loads(bad.stdout)["differing"] == [1]


def test_a_child_that_differs_from_its_parent_elsewhere_fails_verify(aws_rules) -> None:
    """ListChangedBlocks must list exactly the blocks publish wrote (verify's lineage
    check): a child whose parent is not the one recorded, or with other writes, fails."""
    from builder.aws.verify import _lineage_problem

    ebs = client("ebs", aws_rules.url)
    parent = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    for index in (0, 1):
        _put(ebs, parent, index, bytes([index + 1]) * BLOCK)
    ebs.complete_snapshot(SnapshotId=parent, ChangedBlocksCount=2)
    child = ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=parent)["SnapshotId"]
    _put(ebs, child, 1, b"\x09" * BLOCK)
    ebs.complete_snapshot(SnapshotId=child, ChangedBlocksCount=1)
    assert _lineage_problem(ebs, parent, child, [1]) is None
    assert "lists 1 changed blocks, and publish wrote 2" in \
        _lineage_problem(ebs, parent, child, [0, 1])


def _put(ebs, snapshot_id: str, index: int, data: bytes) -> None:
    checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
    for attempt in range(3):  # the first PUT after StartSnapshot: not found yet (the layer)
        try:
            ebs.put_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockData=data,
                                   DataLength=len(data), ChecksumAlgorithm="SHA256",
                                   Checksum=checksum)
            return
        except ClientError:
            if attempt == 2:
                raise


def test_a_recorded_index_is_used_only_as_its_snapshot_s_tag_vouches() -> None:
    blocks = [A, ZERO, None]
    recorded = {"snapshot_id": "snap-00000001", "block_size": BLOCK, "blocks": blocks}
    snapshot = {"SnapshotId": "snap-00000001",
                "Tags": [{"Key": "team", "Value": "x"},
                         {"Key": INDEX_TAG, "Value": index_digest(blocks)}]}
    vouched = BlockIndex("snap-00000001", tuple(blocks))
    assert vouched_index(snapshot, [recorded]) == vouched
    assert vouched_index({**snapshot, "Tags": []}, [recorded]) is None  # no tag: not vouched
    for forged in ({**recorded, "blocks": [B, ZERO, None]},
                   {**recorded, "snapshot_id": "snap-00000002"},
                   {**recorded, "block_size": 4096}, {**recorded, "blocks": "not a list"},
                   None, [], "x"):
        assert vouched_index(snapshot, [forged]) is None
        assert vouched_index(snapshot, [forged, recorded]) == vouched  # the first that fits
    # an index read from EBS ends at its last block: the digest leaves trailing holes out
    assert index_digest([A, ZERO]) == index_digest([A, ZERO, None, None])
    assert index_digest([A, None, ZERO]) != index_digest([A, ZERO])


def test_a_tag_that_vouches_for_blocks_the_parent_lacks_is_not_trusted(
        aws, aws_rules, tmp_path: Path) -> None:
    """Whoever may tag snapshots could vouch for a forged index: EBS must still list the
    blocks it names (ListSnapshotBlocks), else the parent is read from EBS."""
    first = small_output(tmp_path / "r1", "forged-r1", encrypted_volume=False)
    assert aws("publish", str(first), "--skip-zero-blocks", url=aws_rules.url).returncode == 0
    record = json.loads((first / "publish.json").read_text())
    [target] = record["targets"].values()
    index = target["uploads"]["/dev/xvda"]["block_index"]
    hole = index["blocks"].index(None)  # a zero block publish skipped: the parent lacks it
    index["blocks"][hole] = ZERO
    (first / "publish.json").write_text(json.dumps(record))
    client("ec2", aws_rules.url).create_tags(
        Resources=[index["snapshot_id"]],
        Tags=[{"Key": INDEX_TAG, "Value": index_digest(index["blocks"])}])
    second = next_release(first, tmp_path / "r2", "forged-r2", {3: b"\x06" * BLOCK})
    result = aws("publish", str(second), "--parent", str(first), "--skip-zero-blocks",
                 "--verify", url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "does not hold the blocks its tag's index names" in result.stderr
    assert "ListSnapshotBlocks, checksums" in result.stderr
    assert published(second)["verified"]["/dev/xvda"]["ok"]


def test_an_image_changed_during_its_upload_fails_it(aws_rules, tmp_path: Path) -> None:
    """The tag says what the snapshot holds: a block read otherwise than it was indexed
    (the image changed meanwhile) stops the upload before it completes."""
    from builder.aws.snapshots import upload_image

    image = tmp_path / "image.raw"
    image.write_bytes(b"x" * BLOCK * 2)
    indexed = image_blocks(image)
    image.write_bytes(b"x" * BLOCK + b"y" * BLOCK)
    with pytest.raises(BuildFailed, match="block 1 changed while it was uploaded"):
        upload_image(client("ebs", aws_rules.url), image, description="t", tags={},
                     workers=1, expected=indexed)


def test_a_parent_is_read_from_ebs_not_from_a_file(aws, aws_rules, tmp_path: Path) -> None:
    """publish.json's block index is a claim: an edited one (here: claiming another
    snapshot's blocks are the new image's) changes nothing, for what the parent holds is
    read from EBS; --parent-snapshot names any parent of this account."""
    first = small_output(tmp_path / "r1", "api-r1", encrypted_volume=False)
    assert aws("publish", str(first), url=aws_rules.url).returncode == 0
    other = small_output(tmp_path / "other", "api-other", encrypted_volume=False)
    assert aws("publish", str(other), url=aws_rules.url).returncode == 0
    second = next_release(first, tmp_path / "r2", "api-r2", {2: b"\x02" * BLOCK})
    record = json.loads((other / "publish.json").read_text())
    for target in record["targets"].values():  # "other"'s snapshot, claimed to hold r2
        index = target["uploads"]["/dev/xvda"]["block_index"]
        index["blocks"] = list(after_writes(index["snapshot_id"],
                                            image_blocks(second / "disk.raw"), []).blocks)
    (other / "publish.json").write_text(json.dumps(record))
    result = aws("publish", str(second), "--parent", str(other), "--verify", url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ListSnapshotBlocks" in result.stderr
    child = published(second)["snapshot_ids"]["/dev/xvda"]
    assert len(aws_rules.snapshots.written[child]) >= 4  # other's data overwritten
    assert published(second)["verified"]["/dev/xvda"]["ok"]
    parent_id = published(first)["snapshot_ids"]["/dev/xvda"]
    third = next_release(second, tmp_path / "r3", "api-r3", {4: b"\x03" * BLOCK})
    result = aws("publish", str(third), "--parent-snapshot", f"/dev/xvda={parent_id}",
                 "--parent-index", str(first / "publish.json"), url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"what {parent_id} holds, from its recorded block index" in result.stderr
    assert aws_rules.snapshots.written[published(third)["snapshot_ids"]["/dev/xvda"]] == \
        {2, 4}
    assert aws_rules.snapshots.completion_mismatches == []


def test_what_aws_refuses_with_a_parent_is_refused_before_uploading(aws, aws_rules,
                                                                    tmp_path: Path) -> None:
    first = small_output(tmp_path / "r1", "refuse-r1", encrypted_volume=False)
    assert aws("publish", str(first), url=aws_rules.url).returncode == 0
    second = next_release(first, tmp_path / "r2", "refuse-r2", {3: b"\x04" * BLOCK})
    before = len(aws_rules.snapshots.written)
    key = client("kms", aws_rules.url).create_key()["KeyMetadata"]["Arn"]
    encrypted = aws("publish", str(second), "--parent", str(first), "--kms-key-id", key,
                    url=aws_rules.url)
    assert encrypted.returncode == 2
    assert "unencrypted, and a child snapshot cannot be encrypted" in encrypted.stderr
    ec2 = client("ec2", aws_rules.url)
    ec2.enable_ebs_encryption_by_default()
    try:
        by_default = aws("publish", str(second), "--parent", str(first), url=aws_rules.url)
    finally:
        ec2.disable_ebs_encryption_by_default()
    assert by_default.returncode == 2 and "encrypts new snapshots by default" in \
        by_default.stderr
    assert len(aws_rules.snapshots.written) == before  # nothing started
    bad = aws("publish", str(second), "--parent-snapshot", "/dev/xvda=snap-1;x",
              url=aws_rules.url)
    assert bad.returncode == 2 and "DEVICE=snap-ID" in bad.stderr


def test_an_encrypted_child_keeps_its_parent_s_key(aws, aws_rules, tmp_path: Path) -> None:
    kms = client("kms", aws_rules.url)
    key = kms.create_key()["KeyMetadata"]["Arn"]
    other = kms.create_key()["KeyMetadata"]["Arn"]
    first = small_output(tmp_path / "r1", "keyed-r1", encrypted_volume=False)
    assert aws("publish", str(first), "--kms-key-id", key, url=aws_rules.url).returncode == 0
    second = next_release(first, tmp_path / "r2", "keyed-r2", {3: b"\x05" * BLOCK})
    wrong = aws("publish", str(second), "--parent", str(first), "--kms-key-id", other,
                url=aws_rules.url)
    assert wrong.returncode == 2 and "its child would be too, not with" in wrong.stderr
    plain = aws("publish", str(second), "--parent", str(first), url=aws_rules.url)
    assert plain.returncode == 2 and "is to be unencrypted" in plain.stderr
    # encrypted with no key named (here: by default): the child keeps the parent's key
    # (a customer managed default key: the recipe shares the AMI with another account)
    ec2 = client("ec2", aws_rules.url)
    ec2.enable_ebs_encryption_by_default()
    ec2.modify_ebs_default_kms_key_id(KmsKeyId=other)
    try:
        kept = aws("publish", str(next_release(first, tmp_path / "r3", "keyed-r3", {})),
                   "--parent", str(first), url=aws_rules.url)
    finally:
        ec2.disable_ebs_encryption_by_default()
        ec2.reset_ebs_default_kms_key_id()
    assert kept.returncode == 0 and "its child keeps its key" in kept.stderr, kept.stderr
    right = aws("publish", str(second), "--parent", str(first), "--kms-key-id", key,
                "--verify", url=aws_rules.url)
    assert right.returncode == 0, right.stderr[-3000:]
    child = published(second)["snapshot_ids"]["/dev/xvda"]
    assert aws_rules.snapshots.encrypted[child] and aws_rules.snapshots.keys[child] == key
    assert aws_rules.snapshots.written[child] == {3}


def test_block_index_checksums_come_from_get_snapshot_block(aws_rules) -> None:
    from builder.aws.blockindex import index_from_api

    ebs = client("ebs", aws_rules.url)
    snapshot = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    data = b"\x07" * BLOCK
    for index, block in ((0, data), (2, bytes(BLOCK))):
        _put(ebs, snapshot, index, block)
    ebs.complete_snapshot(SnapshotId=snapshot, ChangedBlocksCount=2)
    index = index_from_api(ebs, snapshot)
    assert index.blocks == (hashlib.sha256(data).hexdigest(), None, ZERO)
