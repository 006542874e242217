"""share, copy, deregister: each a short sequence of boto3 calls (publish is in
builder.aws.publish)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from builder.aws import state
from builder.aws.distribute import Distribution, finish_image
from builder.aws.publish import current_target, tagged_snapshots
from builder.aws.publish import say as _say
from builder.aws.session import Aws
from builder.aws.state import token as _token
from builder.errors import InputError


def share(image_id: str, aws: Aws, accounts: list[str], public: bool, private: bool) -> None:
    ec2 = None if aws.dry_run else aws.client("ec2")
    if private:
        current = [] if ec2 is None else ec2.describe_image_attribute(
            ImageId=image_id, Attribute="launchPermission")["LaunchPermissions"]
        change = {"Remove": current or [{"Group": "all"}]}
    else:
        add = [{"UserId": a} for a in accounts] + ([{"Group": "all"}] if public else [])
        change = {"Add": add}
    params = {"ImageId": image_id, "Attribute": "launchPermission", "LaunchPermission": change}
    if ec2 is None:
        aws.would("ec2.ModifyImageAttribute", **params)
        return
    ec2.modify_image_attribute(**params)


@dataclass(frozen=True)
class CopyOptions:
    regions: tuple[str, ...]
    kms_keys: dict[str, str] = field(default_factory=dict)  # region -> key (id, alias, ARN)
    deprecate_at: dt.datetime | None = None


def copy_image(source: str, aws: Aws, options: CopyOptions) -> dict[str, str]:
    """CopyImage into every region at once (CopyImageTags; encrypted with the region's key
    when one is given), then wait for all; then each copy gets the source's launch
    permissions and deprecation time, and the build's snapshot permissions and SSM
    parameters. SOURCE is an AMI id or a published build's output directory (whose
    publish.json records the copies)."""
    output_dir = Path(source) if Path(source).is_dir() else None
    distribution = Distribution.of_output(output_dir)
    if aws.dry_run:
        for region in options.regions:
            aws.would("ec2.CopyImage", SourceImageId=source, SourceRegion=aws.region,
                      region=region, KmsKeyId=options.kms_keys.get(region))
        return {}
    target = current_target(aws) if output_dir else ""
    record = state.load(output_dir, target) if output_dir else {}
    image_id = record.get("image_id") if output_dir else source
    if not image_id:
        raise InputError(f"{source}: not published to {target} yet (build publish first)")
    image = _describe(aws.client("ec2"), image_id)
    deprecate_at = options.deprecate_at or image.get("DeprecationTime")
    keys = {r: _key_in(aws, r, k) for r, k in options.kms_keys.items()}
    started = {region: _start_copy(aws, image, region, keys.get(region))
               for region in options.regions}
    permissions = aws.client("ec2").describe_image_attribute(
        ImageId=image_id, Attribute="launchPermission")["LaunchPermissions"]
    for region, copy_id in started.items():
        ec2 = aws.client("ec2", region)
        ec2.get_waiter("image_available").wait(ImageIds=[copy_id],
                                               WaiterConfig={"Delay": 15, "MaxAttempts": 240})
        if permissions:
            ec2.modify_image_attribute(ImageId=copy_id, Attribute="launchPermission",
                                       LaunchPermission={"Add": permissions})
        snapshots = [m["Ebs"]["SnapshotId"] for m in _describe(ec2, copy_id).get(
            "BlockDeviceMappings", []) if m.get("Ebs", {}).get("SnapshotId")]
        finish_image(ec2, aws.client("ssm", region), copy_id, snapshots, distribution,
                     _when(deprecate_at))
        _say(f"copied {image_id} to {region} as {copy_id}")
        if output_dir:
            record.setdefault("copies", {})[region] = {"image_id": copy_id,
                                                       "kms_key_id": keys.get(region)}
            state.save(output_dir, target, record)
    return started


def _describe(ec2: Any, image_id: str) -> dict[str, Any]:
    try:
        return ec2.describe_images(ImageIds=[image_id])["Images"][0]
    except (ClientError, IndexError):
        raise InputError(f"{image_id}: no such image in {ec2.meta.region_name}") from None


def _key_in(aws: Aws, region: str, key: str) -> str:
    """The KMS key must exist in the destination region (CopyImage): its ARN, asked there."""
    try:
        return str(aws.client("kms", region).describe_key(KeyId=key)["KeyMetadata"]["Arn"])
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "not usable")
        raise InputError(f"--kms-key-id {region}={key}: {code} in {region}") from None


def _start_copy(aws: Aws, image: dict[str, Any], region: str, key_arn: str | None) -> str:
    params: dict[str, Any] = {
        "SourceImageId": image["ImageId"], "SourceRegion": aws.region, "Name": image["Name"],
        "CopyImageTags": True,
        # the same copy again on a re-run, another one for another key
        "ClientToken": _token(image["ImageId"], region, key_arn or "")}
    if image.get("Description"):
        params["Description"] = image["Description"]
    if key_arn:  # "If you specify KmsKeyId, you must also set the encrypted state to true"
        params.update(Encrypted=True, KmsKeyId=key_arn)
    return str(aws.client("ec2", region).copy_image(**params)["ImageId"])


def _when(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def deregister(image_id: str, aws: Aws, delete_snapshots: bool) -> list[str]:
    ec2 = None if aws.dry_run else aws.client("ec2")
    if ec2 is None:
        aws.would("ec2.DeregisterImage", ImageId=image_id)
        if delete_snapshots:
            aws.would("ec2.DeleteSnapshot", for_each="snapshot of the image")
        return []
    try:
        image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    except (ClientError, IndexError):
        raise InputError(f"{image_id}: no such image in {aws.region}") from None
    snapshots = {m["Ebs"]["SnapshotId"] for m in image.get("BlockDeviceMappings", [])
                 if m.get("Ebs", {}).get("SnapshotId")}
    snapshots = sorted(snapshots | tagged_snapshots(ec2, image_id))
    ec2.deregister_image(ImageId=image_id)
    if delete_snapshots:
        for snapshot in snapshots:
            ec2.delete_snapshot(SnapshotId=snapshot)
    _say(f"deregistered {image_id}" + (f", deleted {', '.join(snapshots)}"
                                        if delete_snapshots and snapshots else ""))
    return snapshots
