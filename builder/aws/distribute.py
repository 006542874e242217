"""What is done to an AMI once it is registered, by publish and again by copy for every
copy: its snapshots shared (createVolumePermission), its deprecation time set, its id
written to SSM parameters. The settings come from the build's distribution.json (the
recipe's ami.share_snapshots, ami.deprecate_after, ami.ssm_parameters) and the command line
(--deprecate-at)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from builder.errors import InputError

DISTRIBUTION = "distribution.json"
# EnableImageDeprecation: "The upper limit for DeprecateAt is 10 years from now"
# https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_EnableImageDeprecation.html
MAX_DEPRECATION = dt.timedelta(days=3650)


@dataclass(frozen=True)
class Distribution:
    deprecate_after_days: int | None = None
    ssm_parameters: tuple[str, ...] = ()
    snapshot_permission: dict[str, Any] | None = None  # ModifySnapshotAttribute less the id

    @classmethod
    def of_output(cls, output_dir: Path | None) -> Distribution:
        path = output_dir / DISTRIBUTION if output_dir else None
        if path is None or not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(data.get("deprecate_after_days"), tuple(data.get("ssm_parameters", [])),
                       data.get("snapshot_permission"))
        except (ValueError, AttributeError, TypeError) as exc:
            raise InputError(f"{path}: not what a build writes ({exc})") from None

    @property
    def public_snapshots(self) -> bool:
        return "all" in (self.snapshot_permission or {}).get("GroupNames", [])

    def deprecation(self, now: dt.datetime) -> dt.datetime | None:
        if self.deprecate_after_days is None:
            return None
        return minute(now + dt.timedelta(days=self.deprecate_after_days))


def minute(when: dt.datetime) -> dt.datetime:
    """DeprecateAt to the minute (EC2 rounds seconds; amiforge sets what it records)."""
    return when.astimezone(dt.UTC).replace(second=0, microsecond=0)


def aws_time(when: dt.datetime) -> str:
    """The form EC2 shows times in (DescribeImages' DeprecationTime)."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_deprecate_at(text: str, now: dt.datetime) -> dt.datetime:
    """--deprecate-at: an ISO 8601 date or time (UTC unless it says otherwise), in the
    future and at most 10 years ahead (EnableImageDeprecation)."""
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"--deprecate-at {text!r}: not an ISO 8601 date or time "
                         "(e.g. 2027-06-30 or 2027-06-30T12:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    if when <= now:
        raise InputError(f"--deprecate-at {text!r}: in the past (AWS refuses it)")
    if when > now + MAX_DEPRECATION:
        raise InputError(f"--deprecate-at {text!r}: AWS deprecates at most 10 years ahead")
    return minute(when)


def check_public_sharing(ec2: Any, image: bool, snapshots: bool) -> None:
    """Block public access for AMIs (and for snapshots), on by default in accounts without
    public AMIs, makes a public launch permission fail after the whole upload: ask first.
    https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/block-public-access-to-amis.html"""
    if image and _blocked(lambda: ec2.get_image_block_public_access_state()
                          ["ImageBlockPublicAccessState"]):
        raise InputError("the AMI is to be public, but this account and region block public "
                         "access for AMIs: disable it (DisableImageBlockPublicAccess, which "
                         "takes effect in minutes) or keep ami.launch_permissions private")
    if snapshots and _blocked(lambda: ec2.get_snapshot_block_public_access_state()["State"]):
        raise InputError("the snapshots are to be public (ami.share_snapshots), but this "
                         "account and region block public access for snapshots "
                         "(DisableSnapshotBlockPublicAccess)")


def _blocked(ask: Any) -> bool:
    try:
        state = str(ask())
    except ClientError as exc:  # not allowed to ask: AWS's own answer will come later
        if exc.response.get("Error", {}).get("Code") in ("UnauthorizedOperation",
                                                         "AccessDenied"):
            return False
        raise
    return state not in ("unblocked", "")


def finish_image(ec2: Any, ssm: Any, image_id: str, snapshot_ids: list[str],
                 distribution: Distribution, deprecate_at: dt.datetime | None) -> None:
    """Share the snapshots, set the deprecation time, write the SSM parameters: each call
    sets a value, so running it again after an interruption is harmless."""
    if distribution.snapshot_permission:
        for snapshot_id in snapshot_ids:
            ec2.modify_snapshot_attribute(SnapshotId=snapshot_id,
                                          **distribution.snapshot_permission)
    if deprecate_at is not None:
        ec2.enable_image_deprecation(ImageId=image_id, DeprecateAt=deprecate_at)
    for name in distribution.ssm_parameters:
        ssm.put_parameter(Name=name, Value=image_id, Type="String", DataType="aws:ec2:image",
                          Overwrite=True)
