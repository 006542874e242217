"""What is done to an AMI once it is registered, by publish and again by copy for every
copy: its snapshots shared (createVolumePermission), its deprecation time set, its id
written to SSM parameters. The settings come from the build's distribution.json (the
recipe's ami.share_snapshots, ami.deprecate_after, ami.ssm_parameters), checked again here
as the plan checked them, and from the command line (--deprecate-at)."""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from builder.aws.limits import (
    ACCOUNT_ID,
    MAX_DEPRECATION_DAYS,
    SNAPSHOT_PERMISSION_BATCH,
    deprecation_limit_days,
    ssm_name_problem,
)
from builder.errors import BuildFailed, InputError

DISTRIBUTION = "distribution.json"


@dataclass(frozen=True)
class SnapshotSharing:
    """Who may create volumes from the snapshots: accounts, and everyone when public."""

    accounts: tuple[str, ...] = ()
    public: bool = False

    def __bool__(self) -> bool:
        return bool(self.accounts or self.public)


@dataclass(frozen=True)
class Distribution:
    deprecate_after_days: int | None = None
    ssm_parameters: tuple[str, ...] = ()
    share_snapshots: SnapshotSharing = SnapshotSharing()

    @classmethod
    def of_output(cls, output_dir: Path | None) -> Distribution:
        """distribution.json of a build, or nothing to do when there is none. Checked like
        the plan checks the recipe: the file may have been edited since the build."""
        path = output_dir / DISTRIBUTION if output_dir else None
        if path is None or not path.exists():
            return cls()
        try:
            return _checked(json.loads(path.read_text()))
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise InputError(f"{path}: not what a build writes ({exc})") from None

    def deprecation(self, now: dt.datetime) -> dt.datetime | None:
        if self.deprecate_after_days is None:
            return None
        return minute(now + dt.timedelta(days=self.deprecate_after_days))


def _checked(data: dict[str, Any]) -> Distribution:
    days = data.get("deprecate_after_days")
    if days is not None and not (isinstance(days, int) and 0 < days <= MAX_DEPRECATION_DAYS):
        raise ValueError(f"deprecate_after_days: {days!r}")
    names = tuple(data.get("ssm_parameters") or ())
    for name in names:
        if not isinstance(name, str) or ssm_name_problem(name):
            raise ValueError(f"ssm_parameters: {name!r}: {ssm_name_problem(str(name))}")
    sharing = data.get("share_snapshots") or {}
    accounts = tuple(sharing.get("accounts") or ())
    if not all(isinstance(a, str) and ACCOUNT_ID.match(a) for a in accounts):
        raise ValueError(f"share_snapshots.accounts: {list(accounts)!r}")
    if not isinstance(sharing.get("public", False), bool):
        raise ValueError("share_snapshots.public")
    return Distribution(days, names, SnapshotSharing(accounts, sharing.get("public", False)))


def minute(when: dt.datetime) -> dt.datetime:
    """DeprecateAt to the minute (EC2 rounds seconds; amiforge sets what it records)."""
    return when.astimezone(dt.UTC).replace(second=0, microsecond=0)


def aws_time(when: dt.datetime) -> str:
    """The form EC2 shows times in (DescribeImages' DeprecationTime)."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def parse_deprecate_at(text: str, now: dt.datetime) -> dt.datetime:
    """--deprecate-at: an ISO 8601 date or time (UTC unless it says otherwise), in the
    future and at most 10 years ahead (EnableImageDeprecation)."""
    try:
        when = parse_time(text)
    except ValueError:
        raise InputError(f"--deprecate-at {text!r}: not an ISO 8601 date or time "
                         "(e.g. 2027-06-30 or 2027-06-30T12:00:00Z)") from None
    problem = deprecation_problem(when, now, public=False)
    if problem:
        raise InputError(f"--deprecate-at {text!r}: {problem}")
    return minute(when)


def deprecation_problem(when: dt.datetime, now: dt.datetime, public: bool) -> str | None:
    """What EnableImageDeprecation would refuse; for a new AMI (or copy) "now" is its
    creation, which bounds a public AMI's deprecation."""
    if when <= now:
        return "in the past (AWS refuses it)"
    limit = deprecation_limit_days(public)
    if when > now + dt.timedelta(days=limit):
        return f"AWS deprecates {'a public' if public else 'an'} AMI at most {limit} days ahead"
    return None


def check_public_sharing(ec2: Any, image: bool, snapshots: bool) -> None:
    """Block public access for AMIs (and for snapshots), on by default in accounts without
    public AMIs, makes a public launch permission fail after the whole upload: ask first.
    https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/block-public-access-to-amis.html"""
    region = ec2.meta.region_name
    if image and _blocked(lambda: ec2.get_image_block_public_access_state()
                          ["ImageBlockPublicAccessState"]):
        raise InputError(f"the AMI is to be public, but {region} blocks public access for "
                         "AMIs in this account: disable it (DisableImageBlockPublicAccess, "
                         "which takes effect in minutes) or keep the AMI private")
    if snapshots and _blocked(lambda: ec2.get_snapshot_block_public_access_state()["State"]):
        raise InputError(f"the snapshots are to be public (ami.share_snapshots), but {region} "
                         "blocks public access for snapshots in this account "
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


def encrypts_by_default(ec2: Any) -> bool:
    """The account's "EBS encryption by default" in ec2's region: it encrypts every new
    snapshot (StartSnapshot, or a copy's), whatever the call says. Not allowed to ask
    (ec2:GetEbsEncryptionByDefault): taken as on, the safe guess."""
    try:
        answer = ec2.get_ebs_encryption_by_default()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in (
                "UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
            raise
        return True
    return bool(answer["EbsEncryptionByDefault"])


def default_key_is_aws_managed(ec2: Any) -> bool:
    """Whether snapshots encrypted without a named key get the AWS managed key (aws/ebs),
    which AWS does not let anyone share, or the account's own default key."""
    try:
        key = str(ec2.get_ebs_default_kms_key_id()["KmsKeyId"])
    except ClientError:
        return True  # not allowed to ask: assume the stricter case
    return key.endswith("alias/aws/ebs")


def share_snapshots(ec2: Any, snapshot_ids: list[str], sharing: SnapshotSharing) -> None:
    accounts = list(sharing.accounts)
    batches = [accounts[i:i + SNAPSHOT_PERMISSION_BATCH]
               for i in range(0, len(accounts), SNAPSHOT_PERMISSION_BATCH)] or [[]]
    for snapshot_id in snapshot_ids:
        for index, batch in enumerate(batches):
            groups = ["all"] if sharing.public and index == 0 else []
            if batch or groups:
                ec2.modify_snapshot_attribute(
                    SnapshotId=snapshot_id, Attribute="createVolumePermission",
                    OperationType="add", UserIds=batch, GroupNames=groups)


def write_parameters(ec2: Any, ssm: Any, image_id: str, names: tuple[str, ...],
                     say: Any, settle_seconds: float = 60) -> None:
    """Each SSM parameter gets the AMI's id, once the AMI is available (Parameter Store
    checks an aws:ec2:image value after the call returns: "a successful HTTP 200 response
    does not guarantee that your parameter was successfully created", PutParameter), and
    never an id older than the one it holds (a re-run of an older output)."""
    if not names:
        return
    ec2.get_waiter("image_available").wait(ImageIds=[image_id])
    for name in names:
        current = _parameter(ssm, name)
        if current and current != image_id and _newer(ec2, current, image_id):
            say(f"SSM {name} holds {current}, newer than {image_id}: left as it is")
            continue
        ssm.put_parameter(Name=name, Value=image_id, Type="String", DataType="aws:ec2:image",
                          Overwrite=True)
        deadline = time.monotonic() + settle_seconds
        while _parameter(ssm, name) != image_id:
            if time.monotonic() > deadline:
                raise BuildFailed(f"SSM parameter {name} was not updated to {image_id} "
                                  "(Parameter Store refused the value: see its history)")
            time.sleep(2)


def _parameter(ssm: Any, name: str) -> str | None:
    try:
        return str(ssm.get_parameter(Name=name)["Parameter"]["Value"])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ParameterNotFound":
            return None
        raise


def _newer(ec2: Any, other: str, image_id: str) -> bool:
    """Whether ``other`` was built after ``image_id``: by their amiforge:build-id tags
    (copies carry them; a copy's CreationDate is when it was copied), else by creation."""
    try:
        found = ec2.describe_images(ImageIds=[other, image_id])["Images"]
    except ClientError:  # the other AMI is gone (or not ours to see): replace it
        return False
    built = {i["ImageId"]: _built(i) for i in found}
    return other in built and built[other] > built.get(image_id, "")


def _built(image: dict[str, Any]) -> str:
    tags = {t["Key"]: t["Value"] for t in image.get("Tags", [])}
    build_id = tags.get("amiforge:build-id", "")
    if len(build_id) == 14 and build_id.isdigit():  # YYYYmmddHHMMSS, as ISO 8601
        return (f"{build_id[:4]}-{build_id[4:6]}-{build_id[6:8]}T{build_id[8:10]}:"
                f"{build_id[10:12]}:{build_id[12:]}")
    return str(image.get("CreationDate", ""))


def finish_image(ec2: Any, ssm: Any, image_id: str, snapshot_ids: list[str],
                 distribution: Distribution, deprecate_at: dt.datetime | None,
                 say: Any, sharing: SnapshotSharing | None = None) -> None:
    """After RegisterImage (or a copy): share the snapshots (``sharing``, else the
    build's), set the deprecation time, write the SSM parameters. Each call sets a value:
    running it again after an interruption is harmless."""
    sharing = distribution.share_snapshots if sharing is None else sharing
    if sharing:
        share_snapshots(ec2, snapshot_ids, sharing)
    if deprecate_at is not None:
        ec2.enable_image_deprecation(ImageId=image_id, DeprecateAt=deprecate_at)
    write_parameters(ec2, ssm, image_id, distribution.ssm_parameters, say)
