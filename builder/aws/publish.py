"""publish: a build's images become EBS snapshots (or an S3 bundle), then an AMI.

What it made is recorded in publish.json after every step, per target (account, region,
endpoint: builder.aws.state), so a re-run resumes: completed snapshots are reused, a
pending one is filled again, and an AMI of the same name is found rather than registered
twice. A recorded AMI is checked with DescribeImages before it is reported as done."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from builder.aws import state
from builder.aws.delta import ParentOptions
from builder.aws.distribute import (
    Distribution,
    aws_time,
    check_public_sharing,
    default_key_is_aws_managed,
    deprecation_problem,
    encrypts_by_default,
    finish_image,
    parse_time,
)
from builder.aws.job import Publication, error_code, say
from builder.aws.limits import ACCOUNT_ID, ORGANIZATION_ARN, OU_ARN
from builder.aws.provenance import provenance_tags, with_image_tags, write_packer_manifest
from builder.aws.replace import finish_replacement, replace_image
from builder.aws.session import Aws
from builder.aws.upload import asked_for, upload_bundle, upload_snapshots
from builder.aws.verify import verify_uploads
from builder.errors import InputError
from builder.host.fsutil import read_json

IMAGE_TAG = "amiforge:image-id"


@dataclass(frozen=True)
class PublishOptions:
    bucket: str | None = None
    workers: int = 16
    kms_key_id: str | None = None
    skip_zero_blocks: bool = False
    deprecate_at: dt.datetime | None = None
    force: bool = False  # replace an AMI of the same name
    verify: bool = False  # read each snapshot back before registering
    parents: ParentOptions = field(default_factory=ParentOptions)  # --parent...


def publish(output_dir: Path, aws: Aws, options: PublishOptions = PublishOptions()
            ) -> dict[str, Any]:
    request = read_json(output_dir / "register-image.json")
    _refuse_old_output(output_dir, request)
    build = read_json(output_dir / "build-manifest.json")
    request = with_image_tags(request, provenance_tags(build))
    job = Publication(output_dir, aws, current_target(aws), {}, request, options.workers,
                      options.kms_key_id, skip_zero_blocks=options.skip_zero_blocks,
                      distribution=Distribution.of_output(output_dir),
                      deprecate_at=options.deprecate_at, force=options.force)
    job.record = state.load(output_dir, job.target)
    entries = [] if "ImageLocation" in request else \
        read_json(output_dir / "snapshots.json")["snapshots"]
    if options.parents and not entries:
        raise InputError(f"{output_dir}: --parent makes EBS snapshots from a parent; this AMI "
                         "is instance-store-backed")
    if options.verify and not entries:
        raise InputError(f"{output_dir}: --verify reads EBS snapshots back; this AMI is "
                         "instance-store-backed (its bundle is checked by `build unbundle`)")
    if job.record.get("image_id") and not aws.dry_run and _still_there(job):
        if job.deprecate_at and job.record.get("deprecate_at") != aws_time(job.deprecate_at):
            job.record.pop("deprecate_at", None)  # a new --deprecate-at for a done AMI
            job.record["finished"] = False
        if not job.record.get("finished"):  # registered, but not everything done after
            job.encrypted_by_default = bool(entries) and encrypts_by_default(aws.client("ec2"))
            _refuse_what_aws_would(job, entries)
            finish_replacement(job)
            _after_register(job, job.record["image_id"])
        if options.verify:
            verify_uploads(job, entries)
        say(f"already published as {job.record['image_id']} in {job.target} "
            f"(see {output_dir / state.STATE})")
        write_packer_manifest(output_dir, build, state.all_targets(output_dir))
        return job.record
    for key in ("snapshot_ids", "uploaded", "pending", "uploads"):
        job.record.setdefault(key, {})
    job.record["region"] = aws.region
    if "ImageLocation" in request:
        _refuse_what_aws_would(job, [])
        request["ImageLocation"] = upload_bundle(job, options.bucket)
    else:
        job.encrypted_by_default = not aws.dry_run and encrypts_by_default(aws.client("ec2"))
        _refuse_what_aws_would(job, entries)
        upload_snapshots(job, entries, options.parents)
        if options.verify:
            verify_uploads(job, entries)
    image_id = _register(job)
    if image_id is None:  # dry run
        return job.record
    job.record["image_id"] = image_id
    job.save()
    finish_replacement(job)
    _after_register(job, image_id)
    write_packer_manifest(output_dir, build, state.all_targets(output_dir))
    say(f"published {request['Name']} as {image_id} in {aws.region}")
    return job.record


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """What `publish --json` prints: region -> AMI id (the AMI and its copies), and more."""
    image_ids = {record.get("region"): record.get("image_id"),
                 **{r: c.get("image_id") for r, c in record.get("copies", {}).items()}}
    return {"image_ids": image_ids, "snapshot_ids": record.get("snapshot_ids", {}),
            "deprecate_at": record.get("deprecate_at")}


def _refuse_what_aws_would(job: Publication, entries: list[dict[str, Any]]) -> None:
    """What AWS refuses only after the upload, asked before it: public sharing the account
    blocks; a public AMI's deprecation more than 2 years ahead; encrypted snapshots made
    public ("AMIs with encrypted volumes cannot be made public"), or shared while encrypted
    with the AWS managed key ("Snapshots encrypted with your default KMS key cannot be
    shared", ModifySnapshotAttribute). The plan checked what the recipe asks; this adds
    --kms-key-id, --deprecate-at and the account's encryption by default.
    https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/sharingamis-intro.html"""
    if job.aws.dry_run:
        return
    ec2, launch = job.aws.client("ec2"), launch_permission_entries(job.output_dir)
    public = {"Group": "all"} in launch
    shared = any("Group" not in entry for entry in launch)
    sharing = job.distribution.share_snapshots
    check_public_sharing(ec2, public, sharing.public)
    now = dt.datetime.now(dt.UTC)
    when = job.deprecate_at or job.distribution.deprecation(now)
    late = public and when and deprecation_problem(when, now, True)
    if late:
        raise InputError(f"the deprecation time {aws_time(when)}: {late}")
    encrypted = [e["device"] for e in entries
                 if asked_for(job, e)["encrypted"] or job.encrypted_by_default]
    why = " (the account encrypts new snapshots by default)" if job.encrypted_by_default else ""
    if encrypted and (public or sharing.public):
        raise InputError(f"{', '.join(encrypted)} will be encrypted{why}, and AWS does not "
                         "let an AMI or snapshots with encrypted volumes be public")
    default_keyed = [e["device"] for e in entries if e["device"] in encrypted
                     and not asked_for(job, e)["kms_key_id"]]
    if default_keyed and (shared or sharing.accounts) and default_key_is_aws_managed(ec2):
        raise InputError(f"{', '.join(default_keyed)} will be encrypted with the AWS managed "
                         f"key{why}, which AWS does not let be shared with other accounts: "
                         "give --kms-key-id (a customer managed key they may use)")


def _refuse_old_output(output_dir: Path, request: dict[str, Any]) -> None:
    """register-image.json of an amiforge that put Encrypted/KmsKeyId next to SnapshotId
    (and did not tell publish to encrypt): AWS would refuse it after the whole upload."""
    for mapping in request.get("BlockDeviceMappings", []):
        ebs = mapping.get("Ebs", {})
        if "SnapshotId" in ebs and ({"Encrypted", "KmsKeyId"} & set(ebs)):
            raise InputError(f"{output_dir}: made by an older amiforge (encryption fields on "
                             f"{mapping.get('DeviceName')}'s snapshot mapping); rebuild it")


def current_target(aws: Aws) -> str:
    if aws.dry_run:
        return state.target_of("dry-run", aws.region or "default", aws.endpoint_url)
    account = aws.client("sts").get_caller_identity()["Account"]
    region = aws.client("ec2").meta.region_name
    return state.target_of(account, region, aws.endpoint_url)


def _still_there(job: Publication) -> bool:
    """The recorded AMI exists (not deregistered); else forget it and its missing
    snapshots, and publish again."""
    ec2 = job.aws.client("ec2")
    image_id = job.record["image_id"]
    try:
        images = ec2.describe_images(ImageIds=[image_id], IncludeDisabled=True)["Images"]
    except ClientError as exc:
        if error_code(exc) not in ("InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"):
            raise
        images = []
    if images and images[0].get("State") == "disabled":
        raise InputError(f"{image_id} (recorded in {state.STATE}) is disabled: enable it "
                         "(EnableImage) or deregister it before publishing again")
    if images and images[0].get("State") != "deregistered":
        _check_recorded_image(job, images[0])
        return True
    say(f"{image_id}, recorded in {state.STATE}, is gone from {job.target}: publishing again")
    job.record.pop("image_id", None)
    recorded = job.record.get("snapshot_ids", {})
    live = _existing_snapshots(ec2, sorted(recorded.values()))
    job.record["snapshot_ids"] = {d: s for d, s in recorded.items() if s in live}
    return False


def _check_recorded_image(job: Publication, image: dict[str, Any]) -> None:
    """publish.json is a file in the output directory, not a source of truth: the AMI it
    records is acted on (permissions, deprecation, SSM) only if it is this account's, of
    this build's name, and (EBS) holds the snapshots the record says."""
    problems = []
    if image.get("OwnerId") != job.account:
        problems.append(f"owned by {image.get('OwnerId')}")
    if image.get("Name") != job.request["Name"]:
        problems.append(f"named {image.get('Name')!r}")
    if "ImageLocation" not in job.request and \
            mapped_snapshots(image) != job.record.get("snapshot_ids"):
        problems.append("holding other snapshots")
    if problems:
        raise InputError(f"{state.STATE} records {image['ImageId']}, which is not this "
                         f"build's AMI ({', '.join(problems)}): remove the record")


def _existing_snapshots(ec2: Any, snapshot_ids: list[str]) -> set[str]:
    """The recorded snapshots that still exist, completed (an id one cannot see is left
    out of DescribeSnapshots' answer rather than failing it)."""
    found = set()
    for snapshot_id in snapshot_ids:  # one by one: an unknown id fails the whole call
        try:
            listed = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
        except ClientError as exc:
            if error_code(exc) != "InvalidSnapshot.NotFound":
                raise
            continue
        if listed and listed[0].get("State") == "completed":
            found.add(snapshot_id)
    return found


def _register(job: Publication) -> str | None:
    request, aws = job.request, job.aws
    if aws.dry_run:
        aws.would("ec2.DescribeImages", Owners=["self"], Name=request["Name"])
        aws.would("ec2.RegisterImage", **request)
        return None
    ec2 = aws.client("ec2")
    existing = find_image(ec2, request["Name"])
    if existing:  # registered by an earlier run that stopped before recording it, or not
        image = ec2.describe_images(ImageIds=[existing])["Images"][0]
        theirs = mapped_snapshots(image)
        if _made_here(job, image, theirs):
            say(f"an AMI named {request['Name']} exists: {existing}, made by an earlier run; "
                "not registering another")
            return existing
        if not job.force:
            raise InputError(f"an AMI named {request['Name']} exists ({existing}) with other "
                             "content: deregister it, give the AMI another name, or publish "
                             "--force to replace it")
        return replace_image(job, existing, sorted(set(theirs.values())))
    # RegisterImage takes no ClientToken: the name lookup above is what makes re-runs safe
    # (AMI names are unique per account and region).
    return str(ec2.register_image(**request)["ImageId"])


def _made_here(job: Publication, image: dict[str, Any], theirs: dict[str, str]) -> bool:
    """The AMI holds this publish's snapshots (or, instance-store, its bundle)."""
    if "ImageLocation" in job.request:
        return image.get("ImageLocation") == job.request["ImageLocation"]
    return bool(theirs) and theirs == job.record["snapshot_ids"]


def has_encrypted_snapshots(image: dict[str, Any]) -> bool:
    return any(m.get("Ebs", {}).get("Encrypted") for m in image.get("BlockDeviceMappings", []))


def mapped_snapshots(image: dict[str, Any]) -> dict[str, str]:
    """Device -> snapshot id of an AMI's mappings (DescribeImages)."""
    return {m["DeviceName"]: m["Ebs"]["SnapshotId"]
            for m in image.get("BlockDeviceMappings", []) if "SnapshotId" in m.get("Ebs", {})}


def _after_register(job: Publication, image_id: str) -> None:
    """Tag the snapshots with the AMI, grant the recipe's launch permissions, then
    distribution.json's steps."""
    ec2 = job.aws.client("ec2")
    snapshots = sorted(job.record["snapshot_ids"].values())
    if snapshots:
        ec2.create_tags(Resources=snapshots, Tags=[{"Key": IMAGE_TAG, "Value": image_id}])
    launch = launch_permission_entries(job.output_dir)
    if launch:
        ec2.modify_image_attribute(ImageId=image_id, Attribute="launchPermission",
                                   LaunchPermission={"Add": launch})
    if "deprecate_at" not in job.record:  # set once: a re-run keeps the first run's time
        when = job.deprecate_at or job.distribution.deprecation(dt.datetime.now(dt.UTC))
        job.record["deprecate_at"] = aws_time(when) if when else None
        job.save()
    deprecate_at = job.record["deprecate_at"]
    finish_image(ec2, job.aws.client("ssm"), image_id, snapshots, job.distribution,
                 parse_time(deprecate_at) if deprecate_at else None, say)
    job.record["finished"] = True
    job.save()


def launch_permission_entries(output_dir: Path) -> list[dict[str, str]]:
    """launch-permission.json's grants, each one of AWS's four kinds with a valid value
    (the file is read from an output directory that may have been edited)."""
    path = output_dir / "launch-permission.json"
    if not path.exists():
        return []
    try:
        return [_launch_entry(entry) for entry in read_json(path)["LaunchPermission"]["Add"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"{path}: not what a build writes ({exc})") from None


def _launch_entry(entry: dict[str, str]) -> dict[str, str]:
    [(kind, value)] = entry.items()
    valid = {"Group": lambda v: v == "all", "UserId": ACCOUNT_ID.match,
             "OrganizationArn": ORGANIZATION_ARN.match,
             "OrganizationalUnitArn": OU_ARN.match}
    if kind not in valid or not isinstance(value, str) or not valid[kind](value):
        raise ValueError(f"{kind}: {value!r}")
    return {kind: value}


def find_image(ec2: Any, name: str) -> str | None:
    images = ec2.describe_images(Owners=["self"], IncludeDisabled=True,
                                 Filters=[{"Name": "name", "Values": [name]}])["Images"]
    live = [i for i in images if i.get("State") != "deregistered"]
    return str(live[0]["ImageId"]) if live else None
