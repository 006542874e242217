"""build copy: an AMI into other regions, all copies started at once, then waited for.

Each copy gets what CopyImage does not carry: the source's launch permissions, its
snapshots' createVolumePermission, its deprecation time (or --deprecate-at), and the
build's SSM parameters (distribution.json, when the source is an output directory). What
AWS would refuse once the copies are done is refused before any is started. A copy is
resumed, not made twice: the one recorded in publish.json, or an AMI of the same name in
the region that is a copy of the source (AMI names are unique per region)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError, WaiterError

from builder.aws import state
from builder.aws.distribute import (
    Distribution,
    SnapshotSharing,
    check_public_sharing,
    default_key_is_aws_managed,
    deprecation_problem,
    encrypts_by_default,
    finish_image,
    parse_time,
)
from builder.aws.job import say
from builder.aws.kms import usable_key_arn
from builder.aws.provenance import write_packer_manifest
from builder.aws.publish import (
    current_target,
    find_image,
    has_encrypted_snapshots,
    mapped_snapshots,
)
from builder.aws.session import Aws
from builder.errors import BuildFailed, InputError
from builder.host.fsutil import read_json

# CopyImage of a large AMI takes long; the waiter gives it two hours per region
WAIT = {"Delay": 15, "MaxAttempts": 480}


@dataclass(frozen=True)
class CopyOptions:
    regions: tuple[str, ...]
    kms_keys: dict[str, str] = field(default_factory=dict)  # region -> key (id, alias, ARN)
    deprecate_at: dt.datetime | None = None


@dataclass(frozen=True)
class Source:
    image: dict[str, Any]
    launch: list[dict[str, str]]  # its launch permissions
    sharing: SnapshotSharing      # who may create volumes from its snapshots
    encrypted: bool               # any of its snapshots
    region: str

    @property
    def image_id(self) -> str:
        return str(self.image["ImageId"])

    @property
    def public(self) -> bool:
        return {"Group": "all"} in self.launch

    @property
    def shared(self) -> bool:
        return any("Group" not in entry for entry in self.launch) or bool(
            self.sharing.accounts)


def copy_image(source: str, aws: Aws, options: CopyOptions) -> dict[str, str]:
    """Copy SOURCE (an AMI id, or a published build's output directory) into every region
    of ``options``; returns region -> copy id."""
    output_dir = Path(source) if Path(source).is_dir() else None
    if aws.dry_run:
        for region in options.regions:
            aws.would("ec2.CopyImage", SourceImageId=source, SourceRegion=aws.region,
                      region=region, KmsKeyId=options.kms_keys.get(region))
        return {}
    if aws.region in options.regions:
        raise InputError(f"--to-region {aws.region}: the AMI is in that region already")
    record, save = _record(output_dir, aws)
    image_id = record.get("image_id") if output_dir else source
    if not image_id:
        raise InputError(f"{source}: not published to {current_target(aws)} yet "
                         "(build publish first)")
    src = _read_source(aws.client("ec2"), image_id)
    if output_dir is not None:
        _check_recorded(src, output_dir, current_target(aws))
    deprecate_at = _deprecation(options, src)
    keys = {region: usable_key_arn(aws.client("kms", region), key,
                                   f"--kms-key-id {region}={key}")
            for region, key in options.kms_keys.items()}
    for region in options.regions:
        _refuse_what_aws_would(aws.client("ec2", region), src, keys.get(region), deprecate_at)
    copies = {region: _start(aws.client("ec2", region), src, keys.get(region), record, save)
              for region in options.regions}
    distribution, failed = Distribution.of_output(output_dir), {}
    for region, copy_id in copies.items():
        try:
            _finish(aws, region, copy_id, src, distribution, deprecate_at)
        except (WaiterError, ClientError, BuildFailed) as exc:  # the others still finish
            failed[region] = f"{copy_id}: {exc}"
    if output_dir is not None:
        write_packer_manifest(output_dir, read_json(output_dir / "build-manifest.json"),
                              state.all_targets(output_dir))
    if failed:
        raise BuildFailed("copies not finished (run build copy again to resume): " +
                          "; ".join(f"{r}: {why}" for r, why in failed.items()))
    return copies


def _record(output_dir: Path | None, aws: Aws) -> tuple[dict[str, Any], Callable[[], None]]:
    if output_dir is None:
        return {}, lambda: None
    target = current_target(aws)
    record = state.load(output_dir, target)
    return record, lambda: state.save(output_dir, target, record)


def _check_recorded(src: Source, output_dir: Path, target: str) -> None:
    """The AMI publish.json records is copied (and its permissions with it) only if it is
    this account's and of the build's name: the file may have been edited."""
    name = read_json(output_dir / "register-image.json").get("Name")
    if src.image.get("OwnerId") != target.split("/", 1)[0] or src.image.get("Name") != name:
        raise InputError(f"{output_dir}: publish.json records {src.image_id}, which is not "
                         "this build's AMI in this account")


def _read_source(ec2: Any, image_id: str) -> Source:
    """The source AMI and what CopyImage leaves behind, read before any copy starts."""
    try:
        image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    except (ClientError, IndexError):
        raise InputError(f"{image_id}: no such image in {ec2.meta.region_name}") from None
    try:
        launch = ec2.describe_image_attribute(
            ImageId=image_id, Attribute="launchPermission")["LaunchPermissions"]
    except ClientError:  # an AMI shared with this account: its permissions are not ours
        say(f"{image_id} is not this account's: its copies get no launch permissions")
        return Source(image, [], SnapshotSharing(), has_encrypted_snapshots(image),
                      ec2.meta.region_name)
    accounts, public = set(), False
    for snapshot_id in mapped_snapshots(image).values():
        granted = ec2.describe_snapshot_attribute(
            SnapshotId=snapshot_id, Attribute="createVolumePermission")
        for grant in granted.get("CreateVolumePermissions", []):
            accounts |= {grant["UserId"]} if "UserId" in grant else set()
            public |= grant.get("Group") == "all"
    return Source(image, launch, SnapshotSharing(tuple(sorted(accounts)), public),
                  has_encrypted_snapshots(image), ec2.meta.region_name)


def _deprecation(options: CopyOptions, src: Source) -> dt.datetime | None:
    """--deprecate-at, else the source's own deprecation time (when still ahead)."""
    if options.deprecate_at:
        return options.deprecate_at
    recorded = src.image.get("DeprecationTime")
    if not recorded:
        return None
    when = parse_time(str(recorded))
    if when <= dt.datetime.now(dt.UTC):
        say(f"{src.image_id} was deprecated at {recorded}: its copies are not")
        return None
    return when


def _refuse_what_aws_would(ec2: Any, src: Source, key_arn: str | None,
                           deprecate_at: dt.datetime | None) -> None:
    """The copy's region may block public sharing; a copy encrypted (with the given key,
    or because its source is) cannot be public, nor shared under the AWS managed key; a
    public AMI is deprecated at most 2 years after its creation (the copy's is now)."""
    region = ec2.meta.region_name
    check_public_sharing(ec2, src.public, src.sharing.public)
    # AMI_ENCRYPTION: unencrypted snapshots are copied unencrypted "unless encryption by
    # default is enabled, in which case all the newly created snapshots will be encrypted"
    encrypted = bool(key_arn) or src.encrypted or encrypts_by_default(ec2)
    if encrypted and (src.public or src.sharing.public):
        raise InputError(f"{region}: the copy would be encrypted, and AWS does not let an AMI "
                         f"with encrypted snapshots be public ({src.image_id} is)")
    if encrypted and not key_arn and src.shared and default_key_is_aws_managed(ec2):
        raise InputError(f"{region}: the copy would be encrypted with the AWS managed key, "
                         "which AWS does not let be shared: give --kms-key-id "
                         f"{region}=KEY (a customer managed key)")
    late = deprecate_at and deprecation_problem(deprecate_at, dt.datetime.now(dt.UTC),
                                                src.public)
    if late:
        raise InputError(f"{region}: the deprecation time {deprecate_at}: {late}")


def _start(ec2: Any, src: Source, key_arn: str | None, record: dict[str, Any],
           save: Callable[[], None]) -> str:
    """CopyImage, or the copy an earlier run started (recorded, or found by its name)."""
    region, name = ec2.meta.region_name, src.image["Name"]
    existing = find_image(ec2, name)
    if existing:
        image = ec2.describe_images(ImageIds=[existing])["Images"][0]
        if (image.get("SourceImageId"), image.get("SourceImageRegion")) != (src.image_id,
                                                                            src.region):
            raise InputError(f"{region} has an AMI named {name} ({existing}) that is not a "
                             f"copy of {src.image_id}: AMI names are unique per region")
        recorded = record.get("copies", {}).get(region, {})
        if recorded.get("image_id") == existing and recorded.get("kms_key_id") != key_arn:
            raise InputError(f"{region}: {existing} was copied with another key "
                             f"({recorded.get('kms_key_id')}): deregister it to copy again")
        if image.get("State") in ("pending", "available"):
            say(f"{region}: {existing}, a copy an earlier run started")
            return existing
        say(f"{region}: the earlier copy {existing} is {image.get('State')}: deregistering "
            "it, copying again")
        ec2.deregister_image(ImageId=existing)
    params: dict[str, Any] = {
        "SourceImageId": src.image_id, "SourceRegion": src.region, "Name": name,
        "CopyImageTags": True,
        "ClientToken": uuid.uuid4().hex}  # one per attempt: a failed copy is not returned
    if src.image.get("Description"):
        params["Description"] = src.image["Description"]
    if key_arn:  # "If you specify KmsKeyId, you must also set the encrypted state to true"
        params.update(Encrypted=True, KmsKeyId=key_arn)
    copy_id = str(ec2.copy_image(**params)["ImageId"])
    record.setdefault("copies", {})[region] = {"image_id": copy_id, "kms_key_id": key_arn}
    save()
    return copy_id


def _finish(aws: Aws, region: str, copy_id: str, src: Source, distribution: Distribution,
            deprecate_at: dt.datetime | None) -> None:
    ec2 = aws.client("ec2", region)
    ec2.get_waiter("image_available").wait(ImageIds=[copy_id], WaiterConfig=WAIT)
    if src.launch:
        ec2.modify_image_attribute(ImageId=copy_id, Attribute="launchPermission",
                                   LaunchPermission={"Add": src.launch})
    image = ec2.describe_images(ImageIds=[copy_id])["Images"][0]
    finish_image(ec2, aws.client("ssm", region), copy_id,
                 sorted(mapped_snapshots(image).values()), distribution, deprecate_at, say,
                 sharing=src.sharing)
    say(f"copied {src.image_id} to {region} as {copy_id}")
