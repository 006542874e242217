"""share, copy, deregister: each a short sequence of boto3 calls (publish is in
builder.aws.publish)."""

from __future__ import annotations

from botocore.exceptions import ClientError

from builder.aws.publish import IMAGE_TAG
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


def copy_image(image_id: str, aws: Aws, regions: list[str]) -> dict[str, str]:
    """CopyImage into each region, wait until available, then copy tags and launch
    permissions (CopyImage copies neither)."""
    source = None if aws.dry_run else aws.client("ec2")
    copies: dict[str, str] = {}
    if source is None:
        for region in regions:
            aws.would("ec2.CopyImage", SourceImageId=image_id, SourceRegion=aws.region,
                      region=region)
        return copies
    image = source.describe_images(ImageIds=[image_id])["Images"][0]
    permissions = source.describe_image_attribute(
        ImageId=image_id, Attribute="launchPermission")["LaunchPermissions"]
    for region in regions:
        target = aws.client("ec2", region)
        copy_id = target.copy_image(SourceImageId=image_id, SourceRegion=aws.region,
                                    Name=image["Name"],
                                    ClientToken=_token(image_id, region))["ImageId"]
        target.get_waiter("image_available").wait(ImageIds=[copy_id])
        if image.get("Tags"):
            target.create_tags(Resources=[copy_id], Tags=image["Tags"])
        if permissions:
            target.modify_image_attribute(ImageId=copy_id, Attribute="launchPermission",
                                          LaunchPermission={"Add": permissions})
        copies[region] = copy_id
        _say(f"copied {image_id} to {region} as {copy_id}")
    return copies


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
    tagged = ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": f"tag:{IMAGE_TAG}", "Values": [image_id]}])["Snapshots"]
    snapshots = sorted(snapshots | {s["SnapshotId"] for s in tagged})
    ec2.deregister_image(ImageId=image_id)
    if delete_snapshots:
        for snapshot in snapshots:
            ec2.delete_snapshot(SnapshotId=snapshot)
    _say(f"deregistered {image_id}" + (f", deleted {', '.join(snapshots)}"
                                        if delete_snapshots and snapshots else ""))
    return snapshots
