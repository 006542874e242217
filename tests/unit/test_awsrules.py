"""The validating layer in front of moto (tests/awsrules.py) enforces what it says."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib

import pytest
from botocore.exceptions import ClientError

from builder.aws.snapshots import upload_image, while_snapshot_appears
from tests.awsrules import BLOCK, copy_image_problem, deprecation_problem, register_image_problem
from tests.awstools import REGION, client

pytestmark = pytest.mark.usefixtures("fake_credentials")


def test_a_snapshot_mapping_with_encryption_fields_is_refused() -> None:
    form = {"Action": ["RegisterImage"], "BlockDeviceMapping.1.DeviceName": ["/dev/xvda"],
            "BlockDeviceMapping.1.Ebs.SnapshotId": ["snap-1"],
            "BlockDeviceMapping.1.Ebs.Encrypted": ["true"],
            "BlockDeviceMapping.2.Ebs.VolumeSize": ["4"],
            "BlockDeviceMapping.2.Ebs.Encrypted": ["true"]}
    assert "Encrypted cannot be specified" in register_image_problem(form)
    del form["BlockDeviceMapping.1.Ebs.Encrypted"]
    assert register_image_problem(form) is None  # an empty volume may be encrypted


def test_a_copy_key_needs_encrypted() -> None:
    form = {"Action": ["CopyImage"], "KmsKeyId": ["arn:aws:kms:eu-west-1:1:key/k"]}
    assert "requires Encrypted=true" in copy_image_problem(form)
    assert copy_image_problem({**form, "Encrypted": ["true"]}) is None


def test_deprecation_must_be_ahead_and_within_ten_years() -> None:
    now = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    assert "in the past" in deprecation_problem({"DeprecateAt": ["2026-11-01T00:00:00Z"]}, now)
    assert "10 years" in deprecation_problem({"DeprecateAt": ["2037-01-01T00:00:00Z"]}, now)
    assert deprecation_problem({"DeprecateAt": ["2027-11-30T00:00:00Z"]}, now) is None


def test_deprecation_and_block_public_access_through_the_layer(aws_rules) -> None:
    ec2 = client("ec2", aws_rules.url)
    image = ec2.register_image(Name="rules-deprecated", RootDeviceName="/dev/xvda",
                               BlockDeviceMappings=[{"DeviceName": "/dev/xvda",
                                                     "Ebs": {"VolumeSize": 1}}])["ImageId"]
    with pytest.raises(ClientError, match="in the past"):
        ec2.enable_image_deprecation(ImageId=image, DeprecateAt=dt.datetime(2020, 1, 1))
    with pytest.raises(ClientError, match=r"InvalidAMIID\.NotFound"):
        ec2.enable_image_deprecation(ImageId="ami-0123456789abcdef0",
                                     DeprecateAt=dt.datetime(2027, 12, 1))
    assert ec2.enable_image_deprecation(ImageId=image, DeprecateAt=dt.datetime(2027, 12, 1))
    assert ec2.describe_images(ImageIds=[image])["Images"][0]["DeprecationTime"] == \
        "2027-12-01T00:00:00Z"
    state = ec2.get_image_block_public_access_state()["ImageBlockPublicAccessState"]
    assert state == "unblocked"


def test_register_image_through_the_layer(aws_rules) -> None:
    ec2 = client("ec2", aws_rules.url)
    snapshot = ec2.create_snapshot(VolumeId=ec2.create_volume(
        Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"])["SnapshotId"]
    mapping = {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snapshot, "Encrypted": True}}
    with pytest.raises(ClientError, match="InvalidParameterCombination"):
        ec2.register_image(Name="rules-refused", RootDeviceName="/dev/xvda",
                           BlockDeviceMappings=[mapping])
    del mapping["Ebs"]["Encrypted"]
    assert ec2.register_image(Name="rules-accepted", RootDeviceName="/dev/xvda",
                              BlockDeviceMappings=[mapping])["ImageId"].startswith("ami-")


def _snapshot_with_one_block(url: str, **start: object) -> str:
    ebs = client("ebs", url)
    snapshot = ebs.start_snapshot(VolumeSize=1, **start)["SnapshotId"]
    data = b"x" * BLOCK
    while_snapshot_appears(lambda: ebs.put_snapshot_block(
        SnapshotId=snapshot, BlockIndex=1, BlockData=data, DataLength=BLOCK,
        ChecksumAlgorithm="SHA256",
        Checksum=base64.b64encode(hashlib.sha256(data).digest()).decode()), first_delay=0)
    return snapshot


def test_unwritten_blocks_of_an_encrypted_volume_are_not_zeros(aws_rules) -> None:
    plain = _snapshot_with_one_block(aws_rules.url)
    assert aws_rules.volume_block(REGION, plain, 0, encrypted_volume=False) == bytes(BLOCK)
    assert aws_rules.volume_block(REGION, plain, 0, encrypted_volume=True) != bytes(BLOCK)
    assert aws_rules.volume_block(REGION, plain, 1) == b"x" * BLOCK
    encrypted = _snapshot_with_one_block(aws_rules.url, Encrypted=True)
    assert aws_rules.volume_block(REGION, encrypted, 0) != bytes(BLOCK)
    assert aws_rules.volume_block(REGION, encrypted, 1) == b"x" * BLOCK


def test_encryption_by_default_encrypts_every_new_snapshot(aws_rules) -> None:
    ec2 = client("ec2", aws_rules.url)
    ec2.enable_ebs_encryption_by_default()
    try:
        snapshot = _snapshot_with_one_block(aws_rules.url)  # no Encrypted asked
    finally:
        ec2.disable_ebs_encryption_by_default()
    assert aws_rules.snapshots.encrypted[snapshot] is True
    assert aws_rules.volume_block(REGION, snapshot, 0) != bytes(BLOCK)


def test_start_snapshot_takes_a_key_arn_only(aws_rules) -> None:
    ebs = client("ebs", aws_rules.url)
    with pytest.raises(ClientError, match="KmsKeyArn must be a key ARN"):
        ebs.start_snapshot(VolumeSize=1, Encrypted=True, KmsKeyArn="alias/mine")
    arn = "arn:aws:kms:us-east-1:123456789012:key/0a1b2c3d-0000-0000-0000-000000000000"
    assert ebs.start_snapshot(VolumeSize=1, Encrypted=True, KmsKeyArn=arn)["SnapshotId"]


def test_register_image_takes_no_kms_key_id() -> None:
    form = {"Action": ["RegisterImage"], "BlockDeviceMapping.1.Ebs.VolumeSize": ["4"],
            "BlockDeviceMapping.1.Ebs.KmsKeyId": ["alias/k"]}
    assert "KmsKeyId is not recognized" in register_image_problem(form)


def test_a_new_snapshot_is_not_found_at_first_and_upload_waits_for_it(aws_rules,
                                                                       tmp_path) -> None:
    ebs = client("ebs", aws_rules.url)
    snapshot = ebs.start_snapshot(VolumeSize=1, Timeout=60)["SnapshotId"]
    data = bytes(BLOCK)
    checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
    put = {"SnapshotId": snapshot, "BlockIndex": 0, "BlockData": data, "DataLength": BLOCK,
           "Checksum": checksum, "ChecksumAlgorithm": "SHA256"}
    with pytest.raises(ClientError, match="ResourceNotFoundException"):
        ebs.put_snapshot_block(**put)
    ebs.put_snapshot_block(**put)  # visible now

    image = tmp_path / "image.raw"
    image.write_bytes(b"x" * BLOCK * 3)
    before = aws_rules.snapshots.not_found_answers
    snapshot, stats = upload_image(ebs, image, description="t", tags={}, workers=2)
    assert aws_rules.snapshots.not_found_answers == before + 1
    assert stats.blocks_sent == 3
    assert aws_rules.volume_block(REGION, snapshot, 2) == b"x" * BLOCK


def test_encrypted_snapshots_are_neither_public_nor_shared_under_the_aws_key(aws_rules) -> None:
    ec2 = client("ec2", aws_rules.url)
    snapshot = _snapshot_with_one_block(aws_rules.url, Encrypted=True)
    for change in ({"GroupNames": ["all"]}, {"UserIds": ["210987654321"]}):
        with pytest.raises(ClientError, match="InvalidParameter"):
            ec2.modify_snapshot_attribute(SnapshotId=snapshot, Attribute="createVolumePermission",
                                          OperationType="add", **change)
    key = client("kms", aws_rules.url).create_key()["KeyMetadata"]["Arn"]
    ec2.modify_ebs_default_kms_key_id(KmsKeyId=key)
    try:  # under the account's own default key it may be shared, still not made public
        assert ec2.get_ebs_default_kms_key_id()["KmsKeyId"] == key
        # (a snapshot's key is the one when it was made: the first stays under aws/ebs)
        keyed = _snapshot_with_one_block(aws_rules.url, Encrypted=True)
        ec2.modify_snapshot_attribute(SnapshotId=keyed, Attribute="createVolumePermission",
                                      OperationType="add", UserIds=["210987654321"])
        with pytest.raises(ClientError, match="InvalidParameter"):
            ec2.modify_snapshot_attribute(SnapshotId=snapshot, OperationType="add",
                                          Attribute="createVolumePermission",
                                          UserIds=["210987654321"])
    finally:
        aws_rules.images.default_keys.clear()
    plain = _snapshot_with_one_block(aws_rules.url)
    ec2.modify_snapshot_attribute(SnapshotId=plain, Attribute="createVolumePermission",
                                  OperationType="add", GroupNames=["all"])


def test_a_snapshot_is_pending_until_completed(aws_rules) -> None:
    ebs, ec2 = client("ebs", aws_rules.url), client("ec2", aws_rules.url)
    snapshot = _snapshot_with_one_block(aws_rules.url)
    pending = ec2.describe_snapshots(Filters=[{"Name": "status", "Values": ["pending"]}])
    assert snapshot in {s["SnapshotId"] for s in pending["Snapshots"]}
    ebs.complete_snapshot(SnapshotId=snapshot, ChangedBlocksCount=1)
    [listed] = ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"]
    assert listed["State"] == "completed"


def test_block_lists_say_aws_block_size(aws_rules) -> None:
    ebs = client("ebs", aws_rules.url)
    snapshot_id = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    data = bytes(BLOCK)
    while_snapshot_appears(lambda: ebs.put_snapshot_block(
        SnapshotId=snapshot_id, BlockIndex=0, BlockData=data, DataLength=BLOCK,
        Checksum=base64.b64encode(hashlib.sha256(data).digest()).decode(),
        ChecksumAlgorithm="SHA256"))
    ebs.complete_snapshot(SnapshotId=snapshot_id, ChangedBlocksCount=1)  # none read pending
    listed = ebs.list_snapshot_blocks(SnapshotId=snapshot_id)
    assert listed["BlockSize"] == BLOCK == 524288
    assert [b["BlockIndex"] for b in listed["Blocks"]] == [0]
