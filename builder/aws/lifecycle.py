"""share and deregister: each a short sequence of boto3 calls (publish is in
builder.aws.publish, copy in builder.aws.copy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from builder.aws.distribute import check_public_sharing
from builder.aws.job import say as _say
from builder.aws.limits import SNAPSHOT_PERMISSION_BATCH
from builder.aws.publish import has_encrypted_snapshots, mapped_snapshots
from builder.aws.session import Aws
from builder.errors import InputError


@dataclass(frozen=True)
class Grants:
    """Who is to be allowed to launch an AMI."""

    accounts: tuple[str, ...] = ()
    organizations: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    public: bool = False

    def __bool__(self) -> bool:
        return bool(self.accounts or self.organizations or self.units or self.public)

    def launch_permissions(self) -> list[dict[str, str]]:
        return ([{"UserId": a} for a in self.accounts]
                + [{"OrganizationArn": a} for a in self.organizations]
                + [{"OrganizationalUnitArn": a} for a in self.units]
                + ([{"Group": "all"}] if self.public else []))


def share(image_id: str, aws: Aws, grants: Grants, private: bool) -> None:
    """Grant launch permissions, or (--private) take every one away, and every
    createVolumePermission of the AMI's snapshots with them."""
    public = grants.public
    ec2 = None if aws.dry_run else aws.client("ec2")
    if private:
        current = [] if ec2 is None else ec2.describe_image_attribute(
            ImageId=image_id, Attribute="launchPermission")["LaunchPermissions"]
        change = {"Remove": current or [{"Group": "all"}]}
    else:
        if public and ec2 is not None:
            check_public_sharing(ec2, True, False)
            if has_encrypted_snapshots(ec2.describe_images(ImageIds=[image_id])["Images"][0]):
                raise InputError(f"{image_id} has encrypted snapshots: AWS does not let it "
                                 "be public")
        change = {"Add": grants.launch_permissions()}
    params = {"ImageId": image_id, "Attribute": "launchPermission", "LaunchPermission": change}
    if ec2 is None:
        aws.would("ec2.ModifyImageAttribute", **params)
        return
    ec2.modify_image_attribute(**params)
    if private:
        _unshare_snapshots(ec2, image_id)


def _unshare_snapshots(ec2: Any, image_id: str) -> None:
    image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    for snapshot_id in sorted(set(mapped_snapshots(image).values())):
        grants = ec2.describe_snapshot_attribute(
            SnapshotId=snapshot_id, Attribute="createVolumePermission"
        ).get("CreateVolumePermissions", [])
        users = [g["UserId"] for g in grants if "UserId" in g]
        groups = [g["Group"] for g in grants if "Group" in g]
        for start in range(0, max(len(users), 1), SNAPSHOT_PERMISSION_BATCH):
            batch = users[start:start + SNAPSHOT_PERMISSION_BATCH]
            group = groups if start == 0 else []
            if batch or group:
                ec2.modify_snapshot_attribute(SnapshotId=snapshot_id,
                                              Attribute="createVolumePermission",
                                              OperationType="remove", UserIds=batch,
                                              GroupNames=group)
        if users or groups:
            _say(f"{snapshot_id}: no longer shared")


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
    snapshots = sorted(set(mapped_snapshots(image).values()))
    ec2.deregister_image(ImageId=image_id)
    if delete_snapshots:
        for snapshot in snapshots:
            ec2.delete_snapshot(SnapshotId=snapshot)
    _say(f"deregistered {image_id}" + (f", deleted {', '.join(snapshots)}"
                                        if delete_snapshots and snapshots else ""))
    return snapshots
