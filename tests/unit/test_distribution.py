"""Distribution against moto behind the validating layer (tests/awsrules.py): copies to
several regions at once with per-region keys, deprecation, SSM parameters, snapshot
permissions, --force replacement, and the block public access check. Small output
directories made from a plan (no build)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from builder.amiplan import LaunchPermissions
from builder.outputs.manifest import remove_stale_manifests
from tests.awstools import REGION, client, published, small_output

pytestmark = pytest.mark.usefixtures("fake_credentials")
COPY_REGIONS = ("us-west-2", "eu-west-1", "ap-southeast-2")
PARAMETER = "/amiforge/test/latest"
SHARED_WITH = "210987654321"  # not moto's own account (123456789012)


def describe(url: str, image_id: str, region: str = REGION) -> dict:
    return client("ec2", url, region).describe_images(ImageIds=[image_id])["Images"][0]


def test_publish_then_copy_to_three_regions_with_their_own_keys(aws, aws_rules,
                                                                 tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "distributed-image", encrypted_volume=False,
                       deprecate_after_days=30, ssm_parameters=(PARAMETER,),
                       share_snapshots=True,
                       launch_permissions=LaunchPermissions(accounts=(SHARED_WITH,)))
    settings = json.loads((out / "distribution.json").read_text())
    assert settings["share_snapshots"] == {"accounts": [SHARED_WITH], "public": False}
    before = dt.datetime.now(dt.UTC)
    result = aws("publish", str(out), url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-3000:]
    record = published(out)
    image_id = record["image_id"]

    deprecate_at = dt.datetime.fromisoformat(record["deprecate_at"])
    assert deprecate_at.second == 0
    assert abs(deprecate_at - (before + dt.timedelta(days=30))) < dt.timedelta(minutes=2)
    assert describe(aws_rules.url, image_id)["DeprecationTime"] == record["deprecate_at"]
    ec2 = client("ec2", aws_rules.url)
    for snapshot_id in record["snapshot_ids"].values():
        permission = ec2.describe_snapshot_attribute(
            SnapshotId=snapshot_id, Attribute="createVolumePermission")
        assert permission["CreateVolumePermissions"] == [{"UserId": SHARED_WITH}]
    assert client("ssm", aws_rules.url).get_parameter(
        Name=PARAMETER)["Parameter"]["Value"] == image_id
    ec2.create_tags(Resources=[image_id], Tags=[{"Key": "release", "Value": "2026.11"}])

    keys = {region: client("kms", aws_rules.url, region).create_key()["KeyMetadata"]["Arn"]
            for region in COPY_REGIONS}
    args = [a for region in COPY_REGIONS for a in ("--to-region", region)]
    args += [f"--kms-key-id={region}={key}" for region, key in keys.items()]
    copied = aws("copy", str(out), *args, url=aws_rules.url)
    assert copied.returncode == 0, copied.stderr[-3000:]
    copies = json.loads(copied.stdout)
    assert sorted(copies) == sorted(COPY_REGIONS)
    assert {r: c["image_id"] for r, c in published(out)["copies"].items()} == copies
    for region, copy_id in copies.items():
        asked = aws_rules.images.copies[copy_id]
        assert asked == {"region": region, "source": image_id, "source_region": REGION,
                         "encrypted": True, "kms_key_id": keys[region]}
        image = describe(aws_rules.url, copy_id, region)
        assert image["SourceImageId"] == image_id
        copied = [m["Ebs"]["SnapshotId"] for m in image["BlockDeviceMappings"]
                  if "SnapshotId" in m.get("Ebs", {})]
        assert len(copied) == 2 and all(aws_rules.snapshots.encrypted[s] for s in copied)
        for snapshot_id in copied:  # the source's snapshot permissions, on the copy's
            assert client("ec2", aws_rules.url, region).describe_snapshot_attribute(
                SnapshotId=snapshot_id, Attribute="createVolumePermission"
            )["CreateVolumePermissions"] == [{"UserId": SHARED_WITH}]
        assert image["DeprecationTime"] == record["deprecate_at"]
        assert {"Key": "release", "Value": "2026.11"} in image["Tags"]  # CopyImageTags
        launch = client("ec2", aws_rules.url, region).describe_image_attribute(
            ImageId=copy_id, Attribute="launchPermission")["LaunchPermissions"]
        assert {"UserId": SHARED_WITH} in launch
        assert client("ssm", aws_rules.url, region).get_parameter(
            Name=PARAMETER)["Parameter"]["Value"] == copy_id


def test_a_copy_key_must_exist_in_its_region(aws, aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "copy-key-image")
    assert aws("publish", str(out), url=aws_rules.url).returncode == 0
    key = client("kms", aws_rules.url, "us-west-2").create_key()["KeyMetadata"]["Arn"]
    wrong = aws("copy", str(out), "--to-region", "eu-west-1", f"--kms-key-id=eu-west-1={key}",
                url=aws_rules.url)
    assert wrong.returncode == 2 and "in eu-west-1" in wrong.stderr
    unnamed = aws("copy", str(out), "--to-region", "eu-west-1", "--to-region", "us-west-2",
                  f"--kms-key-id={key}", url=aws_rules.url)
    assert unnamed.returncode == 2 and "REGION=KEY" in unnamed.stderr
    assert "copies" not in published(out)


def test_force_replaces_an_ami_of_the_same_name(aws, aws_rules, tmp_path: Path) -> None:
    first = small_output(tmp_path / "first", "replaced-image")
    assert aws("publish", str(first), url=aws_rules.url).returncode == 0
    old = published(first)
    second = small_output(tmp_path / "second", "replaced-image", root_data=3 << 20)
    refused = aws("publish", str(second), url=aws_rules.url)
    assert refused.returncode == 2 and "--force" in refused.stderr
    forced = aws("publish", str(second), "--force", url=aws_rules.url)
    assert forced.returncode == 0, forced.stderr[-3000:]
    new = published(second)
    ec2 = client("ec2", aws_rules.url)
    named = [i for i in ec2.describe_images(Owners=["self"], Filters=[
        {"Name": "name", "Values": ["replaced-image"]}])["Images"]
        if i.get("State") != "deregistered"]
    assert [i["ImageId"] for i in named] == [new["image_id"]]
    assert new["replaced"]["image_id"] == old["image_id"]
    left = {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    assert not set(old["snapshot_ids"].values()) & left


def test_a_public_ami_is_refused_before_the_upload_when_the_account_blocks_it(
        aws, aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "blocked-image", encrypted_volume=False,
                       launch_permissions=LaunchPermissions(public=True))
    aws_rules.images.block_public_access[REGION] = "block-new-sharing"
    try:
        result = aws("publish", str(out), url=aws_rules.url)
    finally:
        del aws_rules.images.block_public_access[REGION]
    assert result.returncode == 2
    assert "blocks public access for AMIs" in result.stderr
    assert not (out / "publish.json").exists()  # nothing uploaded
    assert aws("publish", str(out), url=aws_rules.url).returncode == 0


def test_deprecate_at_is_checked_before_anything(aws, aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "deprecated-image")
    past = aws("publish", str(out), "--deprecate-at", "2020-01-01", url=aws_rules.url)
    assert past.returncode == 2 and "in the past" in past.stderr
    far = aws("publish", str(out), "--deprecate-at", "2099-01-01", url=aws_rules.url)
    assert far.returncode == 2 and "at most 3650 days ahead" in far.stderr
    when = (dt.datetime.now(dt.UTC) + dt.timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = aws("publish", str(out), "--deprecate-at", when, url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-2000:]
    record = published(out)
    assert record["deprecate_at"] == when[:17] + "00Z"
    assert aws_rules.images.deprecations[record["image_id"]] == record["deprecate_at"]


def test_manifests_an_earlier_build_wrote_are_removed(tmp_path: Path) -> None:
    """A recipe that stopped sharing its AMI: its old launch-permission.json must not stay
    for publish to act on."""
    for name in ("register-image.json", "launch-permission.json", "distribution.json",
                 "disk.raw", "publish.json"):
        (tmp_path / name).write_text("{}")
    remove_stale_manifests(tmp_path, [tmp_path / "register-image.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "disk.raw", "publish.json", "register-image.json"]


def test_copy_resumes_rather_than_copying_twice(aws, aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "resumed-copy-image")
    assert aws("publish", str(out), url=aws_rules.url).returncode == 0
    image_id = published(out)["image_id"]
    same_region = aws("copy", str(out), "--to-region", REGION, url=aws_rules.url)
    assert same_region.returncode == 2 and "in that region already" in same_region.stderr
    first = aws("copy", str(out), "--to-region", "eu-central-1", url=aws_rules.url)
    assert first.returncode == 0, first.stderr[-2000:]
    again = aws("copy", image_id, "--to-region", "eu-central-1", url=aws_rules.url)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout) == json.loads(first.stdout)
    assert "a copy an earlier run started" in again.stderr
    named = client("ec2", aws_rules.url, "eu-central-1").describe_images(
        Owners=["self"], Filters=[{"Name": "name", "Values": ["resumed-copy-image"]}])
    assert len(named["Images"]) == 1


def test_share_private_also_unshares_the_snapshots(aws, aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "unshared-image", encrypted_volume=False,
                       share_snapshots=True,
                       launch_permissions=LaunchPermissions(accounts=(SHARED_WITH,)))
    assert aws("publish", str(out), url=aws_rules.url).returncode == 0
    record = published(out)
    ec2 = client("ec2", aws_rules.url)

    def grants() -> list:
        return [g for s in record["snapshot_ids"].values() for g in
                ec2.describe_snapshot_attribute(SnapshotId=s, Attribute="createVolumePermission")
                ["CreateVolumePermissions"]]
    assert grants() == [{"UserId": SHARED_WITH}] * 2
    assert aws("share", record["image_id"], "--private", url=aws_rules.url).returncode == 0
    assert grants() == []
    assert ec2.describe_image_attribute(ImageId=record["image_id"],
                                        Attribute="launchPermission")["LaunchPermissions"] == []


def test_force_deletes_only_the_old_amis_own_snapshots(aws, aws_rules, tmp_path: Path) -> None:
    """A snapshot someone tagged as the old AMI's (tags anyone may set) is not deleted."""
    first = small_output(tmp_path / "first", "forced-twice-image")
    assert aws("publish", str(first), url=aws_rules.url).returncode == 0
    old = published(first)["image_id"]
    ec2 = client("ec2", aws_rules.url)
    bystander = ec2.create_snapshot(VolumeId=ec2.create_volume(
        Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"])["SnapshotId"]
    ec2.create_tags(Resources=[bystander], Tags=[{"Key": "amiforge:image-id", "Value": old}])
    second = small_output(tmp_path / "second", "forced-twice-image", root_data=3 << 20)
    assert aws("publish", str(second), "--force", url=aws_rules.url).returncode == 0
    assert published(second)["replaced"]["done"] is True
    assert ec2.describe_snapshots(SnapshotIds=[bystander])["Snapshots"]


def test_an_edited_output_directory_is_refused(aws, aws_rules, tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "edited-image", encrypted_volume=False,
                       share_snapshots=True)
    settings = json.loads((out / "distribution.json").read_text())
    (out / "distribution.json").write_text(json.dumps(
        {**settings, "share_snapshots": {"accounts": ["all"], "public": False}}))
    result = aws("publish", str(out), url=aws_rules.url)
    assert result.returncode == 2 and "distribution.json: not what a build writes" in result.stderr
    (out / "distribution.json").write_text(json.dumps(settings))
    (out / "launch-permission.json").write_text(json.dumps(
        {"LaunchPermission": {"Add": [{"Group": "everyone"}]}}))
    result = aws("publish", str(out), url=aws_rules.url)
    assert result.returncode == 2 and "launch-permission.json" in result.stderr
    assert not (out / "publish.json").exists()


def test_a_disabled_kms_key_is_refused_before_the_upload(aws, aws_rules,
                                                         tmp_path: Path) -> None:
    kms = client("kms", aws_rules.url)
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.disable_key(KeyId=key)
    out = small_output(tmp_path / "out", "disabled-key-image")
    result = aws("publish", str(out), "--kms-key-id", key, url=aws_rules.url)
    assert result.returncode == 2 and "its state is Disabled" in result.stderr


def test_an_ssm_parameter_is_not_rolled_back_to_an_older_ami(aws_rules) -> None:
    import time

    from builder.aws.distribute import write_parameters

    ec2, ssm = client("ec2", aws_rules.url), client("ssm", aws_rules.url)
    mapping = [{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 1}}]
    older = ec2.register_image(Name="ssm-older", RootDeviceName="/dev/xvda",
                               BlockDeviceMappings=mapping)["ImageId"]
    time.sleep(1.1)  # CreationDate has seconds
    newer = ec2.register_image(Name="ssm-newer", RootDeviceName="/dev/xvda",
                               BlockDeviceMappings=mapping)["ImageId"]
    said: list[str] = []
    write_parameters(ec2, ssm, newer, ("/amiforge/test/rollback",), said.append)
    write_parameters(ec2, ssm, older, ("/amiforge/test/rollback",), said.append)
    assert ssm.get_parameter(Name="/amiforge/test/rollback")["Parameter"]["Value"] == newer
    assert "newer than" in said[0]


def test_provenance_tags_packer_manifest_and_the_json_summary(aws, aws_rules,
                                                              tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "provenance-image")
    result = aws("publish", str(out), "--json", url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    image_id = published(out)["image_id"]
    assert summary["image_ids"] == {REGION: image_id}
    build = json.loads((out / "build-manifest.json").read_text())
    expected = {"amiforge:recipe-sha256": build["recipe"]["sha256"],
                "amiforge:build-id": build["build_id"],
                "amiforge:version": build["amiforge_version"],
                "amiforge:git-commit": build["recipe"]["git_commit"]}
    assert build["recipe"]["git_commit"]  # the tests run in a git checkout
    tags = {t["Key"]: t["Value"] for t in describe(aws_rules.url, image_id)["Tags"]}
    assert expected.items() <= tags.items()
    ec2 = client("ec2", aws_rules.url)
    for snapshot_id in published(out)["snapshot_ids"].values():
        [snapshot] = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
        assert expected.items() <= {t["Key"]: t["Value"] for t in snapshot["Tags"]}.items()

    copied = aws("copy", str(out), "--to-region", "us-west-1", "--to-region", "sa-east-1",
                 url=aws_rules.url)
    assert copied.returncode == 0, copied.stderr[-2000:]
    copies = json.loads(copied.stdout)
    packer = json.loads((out / "packer-manifest.json").read_text())
    [entry] = packer["builds"]
    assert entry["artifact_id"].split(",") == [
        f"{REGION}:{image_id}", f"sa-east-1:{copies['sa-east-1']}",
        f"us-west-1:{copies['us-west-1']}"]
    assert entry["builder_type"] == "amiforge" and packer["last_run_uuid"] == entry[
        "packer_run_uuid"]
    assert entry["custom_data"]["amiforge:recipe-sha256"] == build["recipe"]["sha256"]
    quiet = aws("publish", str(out), "--quiet", url=aws_rules.url)
    assert quiet.returncode == 0 and quiet.stdout == f"{image_id}\n"


def test_sweep_deletes_only_abandoned_amiforge_snapshots(aws_rules) -> None:
    from builder.aws.session import Aws
    from builder.aws.sweep import MARK, sweep

    ebs, ec2 = client("ebs", aws_rules.url), client("ec2", aws_rules.url)
    mine = ebs.start_snapshot(VolumeSize=1, Tags=[{"Key": MARK, "Value": "x"}])["SnapshotId"]
    other = ebs.start_snapshot(VolumeSize=1, Tags=[{"Key": "team", "Value": "x"}])["SnapshotId"]
    aws = Aws(region=REGION, endpoint_url=aws_rules.url)
    assert mine not in sweep(aws)  # pending, but within StartSnapshot's timeout
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    assert mine in sweep(Aws(region=REGION, endpoint_url=aws_rules.url, dry_run=True), later)
    assert ec2.describe_snapshots(SnapshotIds=[mine])["Snapshots"]  # a dry run deletes none
    assert mine in sweep(aws, later)
    left = {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    assert mine not in left and other in left


def test_a_crafted_publish_json_cannot_reach_other_resources(aws, aws_rules,
                                                             tmp_path: Path) -> None:
    """publish.json naming someone else's AMI (to be made public) or a snapshot to delete
    (as a replaced AMI's): refused, and the snapshot kept."""
    ec2 = client("ec2", aws_rules.url)
    victim_image = ec2.register_image(Name="victim-image", RootDeviceName="/dev/xvda",
                                      BlockDeviceMappings=[{"DeviceName": "/dev/xvda",
                                                            "Ebs": {"VolumeSize": 1}}])["ImageId"]
    victim_snapshot = ec2.create_snapshot(VolumeId=ec2.create_volume(
        Size=1, AvailabilityZone=f"{REGION}a")["VolumeId"])["SnapshotId"]
    out = small_output(tmp_path / "out", "crafted-image", encrypted_volume=False,
                       launch_permissions=LaunchPermissions(public=True))
    target = f"123456789012/{REGION}@{aws_rules.url}"
    (out / "publish.json").write_text(json.dumps({"targets": {target: {
        "image_id": victim_image, "snapshot_ids": {}, "finished": False}}}))
    result = aws("publish", str(out), url=aws_rules.url)
    assert result.returncode == 2 and "not this build's AMI" in result.stderr
    assert ec2.describe_image_attribute(ImageId=victim_image, Attribute="launchPermission")[
        "LaunchPermissions"] == []

    (out / "publish.json").write_text(json.dumps({"targets": {target: {
        "replaced": {"image_id": "ami-00000000", "snapshot_ids": [victim_snapshot],
                     "done": False}}}}))
    result = aws("publish", str(out), url=aws_rules.url)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{victim_snapshot} was not made by publish" in result.stderr
    assert ec2.describe_snapshots(SnapshotIds=[victim_snapshot])["Snapshots"]


def test_a_copy_encrypted_by_the_regions_default_cannot_stay_public(aws, aws_rules,
                                                                    tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "public-copy-image", encrypted_volume=False,
                       launch_permissions=LaunchPermissions(public=True))
    assert aws("publish", str(out), url=aws_rules.url).returncode == 0
    other = client("ec2", aws_rules.url, "ca-central-1")
    other.enable_ebs_encryption_by_default()
    try:
        result = aws("copy", str(out), "--to-region", "ca-central-1", url=aws_rules.url)
    finally:
        other.disable_ebs_encryption_by_default()
    assert result.returncode == 2 and "would be encrypted" in result.stderr
    assert "copies" not in published(out)


ORG = "arn:aws:organizations::123456789012:organization/o-abcdef1234"
OU = "arn:aws:organizations::123456789012:ou/o-abcdef1234/ou-ab12-cdef5678"


def test_organizations_and_ous_in_publish_share_and_copy(aws, aws_rules,
                                                         tmp_path: Path) -> None:
    out = small_output(tmp_path / "out", "org-image", encrypted_volume=False,
                       launch_permissions=LaunchPermissions(organization_arns=(ORG,),
                                                            organizational_unit_arns=(OU,)))
    assert aws("publish", str(out), url=aws_rules.url).returncode == 0
    image_id = published(out)["image_id"]

    def launch(image: str, region: str = REGION) -> list:
        return client("ec2", aws_rules.url, region).describe_image_attribute(
            ImageId=image, Attribute="launchPermission")["LaunchPermissions"]
    assert {"OrganizationArn": ORG} in launch(image_id)
    assert {"OrganizationalUnitArn": OU} in launch(image_id)
    other_org = ORG.replace("o-abcdef1234", "o-zyxwvu9876")
    assert aws("share", image_id, "--organization-arn", other_org,
               url=aws_rules.url).returncode == 0
    assert {"OrganizationArn": other_org} in launch(image_id)
    bad = aws("share", image_id, "--ou-arn", ORG, url=aws_rules.url)
    assert bad.returncode == 2 and "--ou-arn" in bad.stderr
    copied = aws("copy", str(out), "--to-region", "eu-north-1", url=aws_rules.url)
    assert copied.returncode == 0, copied.stderr[-2000:]
    copy_id = json.loads(copied.stdout)["eu-north-1"]
    assert {"OrganizationalUnitArn": OU} in launch(copy_id, "eu-north-1")
