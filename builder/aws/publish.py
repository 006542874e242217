"""publish: a build's images become EBS snapshots (or an S3 bundle), then an AMI.

What it made is recorded in publish.json after every step, per target (account, region,
endpoint: builder.aws.state), so a re-run resumes: completed snapshots are reused, a
pending one is filled again, and an AMI of the same name is found rather than registered
twice. A recorded AMI is checked with DescribeImages before it is reported as done."""

from __future__ import annotations

import datetime as dt
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from builder.aws import state
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
from builder.aws.kms import usable_key_arn
from builder.aws.limits import ACCOUNT_ID, ORGANIZATION_ARN, OU_ARN
from builder.aws.provenance import provenance_tags, with_image_tags, write_packer_manifest
from builder.aws.session import Aws
from builder.aws.snapshots import Encryption, upload_image
from builder.errors import BuildFailed, InputError
from builder.outputs.ami import is_placeholder
from builder.plan import sha256_file

IMAGE_TAG = "amiforge:image-id"


@dataclass
class Publication:
    output_dir: Path
    aws: Aws
    target: str
    record: dict[str, Any]
    request: dict[str, Any]
    workers: int = 16
    kms_key_id: str | None = None
    encrypted_by_default: bool = False
    skip_zero_blocks: bool = False
    key_arns: dict[str, str] = field(default_factory=dict)
    distribution: Distribution = field(default_factory=Distribution)
    deprecate_at: dt.datetime | None = None  # --deprecate-at, else the recipe's days
    force: bool = False

    def save(self) -> None:
        state.save(self.output_dir, self.target, self.record)

    @property
    def account(self) -> str:
        return self.target.split("/", 1)[0]

    @property
    def tags(self) -> dict[str, str]:
        return {t["Key"]: t["Value"] for spec in self.request.get("TagSpecifications", [])
                for t in spec["Tags"]}


@dataclass(frozen=True)
class PublishOptions:
    bucket: str | None = None
    workers: int = 16
    kms_key_id: str | None = None
    skip_zero_blocks: bool = False
    deprecate_at: dt.datetime | None = None
    force: bool = False  # replace an AMI of the same name


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
    if job.record.get("image_id") and not aws.dry_run and _still_there(job):
        if job.deprecate_at and job.record.get("deprecate_at") != aws_time(job.deprecate_at):
            job.record.pop("deprecate_at", None)  # a new --deprecate-at for a done AMI
            job.record["finished"] = False
        if not job.record.get("finished"):  # registered, but not everything done after
            job.encrypted_by_default = bool(entries) and encrypts_by_default(aws.client("ec2"))
            _refuse_what_aws_would(job, entries)
            _finish_replacement(job)
            _after_register(job, job.record["image_id"])
        say(f"already published as {job.record['image_id']} in {job.target} "
            f"(see {output_dir / state.STATE})")
        write_packer_manifest(output_dir, build, state.all_targets(output_dir))
        return job.record
    for key in ("snapshot_ids", "uploaded", "pending", "uploads"):
        job.record.setdefault(key, {})
    job.record["region"] = aws.region
    if "ImageLocation" in request:
        _refuse_what_aws_would(job, [])
        request["ImageLocation"] = _upload_bundle(job, options.bucket)
    else:
        job.encrypted_by_default = not aws.dry_run and encrypts_by_default(aws.client("ec2"))
        _refuse_what_aws_would(job, entries)
        _upload_snapshots(job, entries)
    image_id = _register(job)
    if image_id is None:  # dry run
        return job.record
    job.record["image_id"] = image_id
    job.save()
    _finish_replacement(job)
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
                 if _asked(job, e)["encrypted"] or job.encrypted_by_default]
    why = " (the account encrypts new snapshots by default)" if job.encrypted_by_default else ""
    if encrypted and (public or sharing.public):
        raise InputError(f"{', '.join(encrypted)} will be encrypted{why}, and AWS does not "
                         "let an AMI or snapshots with encrypted volumes be public")
    default_keyed = [e["device"] for e in entries if e["device"] in encrypted
                     and not _asked(job, e)["kms_key_id"]]
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
        if _code(exc) not in ("InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"):
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


def _our_snapshot(job: Publication, snapshot_id: str, device: str) -> bool:
    """A recorded snapshot is reused only if it is this account's, completed, and made by
    publish for this AMI name and device (StartSnapshot's description, fixed since)."""
    try:
        [snapshot] = job.aws.client("ec2").describe_snapshots(
            SnapshotIds=[snapshot_id])["Snapshots"]
    except (ClientError, ValueError):
        return False
    return (snapshot.get("OwnerId") == job.account and snapshot.get("State") == "completed"
            and snapshot.get("Description") == _description(job, device))


def _description(job: Publication, device: str) -> str:
    return f"{job.request['Name']} {device}"


def _existing_snapshots(ec2: Any, snapshot_ids: list[str]) -> set[str]:
    """The recorded snapshots that still exist, completed (an id one cannot see is left
    out of DescribeSnapshots' answer rather than failing it)."""
    found = set()
    for snapshot_id in snapshot_ids:  # one by one: an unknown id fails the whole call
        try:
            listed = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
        except ClientError as exc:
            if _code(exc) != "InvalidSnapshot.NotFound":
                raise
            continue
        if listed and listed[0].get("State") == "completed":
            found.add(snapshot_id)
    return found


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _upload_snapshots(job: Publication, snapshots: list[dict[str, Any]]) -> None:
    ebs = None if job.aws.dry_run else job.aws.client("ebs")
    by_placeholder = {}
    for entry in snapshots:
        image = job.output_dir / entry["image"]
        digest = job.record["uploaded"].get(entry["image"]) or sha256_file(image)
        if digest != entry["sha256"]:
            raise InputError(f"{image}: changed since the build (sha256 differs from "
                             "snapshots.json); rebuild before publishing")
        done = job.record["snapshot_ids"].get(entry["device"])
        made = job.record["uploads"].get(entry["device"], {})
        if done and job.record["uploaded"].get(entry["image"]) == digest and \
                made.get("asked") == _asked(job, entry) and \
                (ebs is None or _our_snapshot(job, done, entry["device"])):
            say(f"{entry['device']}: reusing {done} from an earlier run")
        elif ebs is None:
            job.aws.would("ebs.StartSnapshot / PutSnapshotBlock / CompleteSnapshot",
                          image=entry["image"], size=entry["size"],
                          encrypted=_encryption(job, entry).enabled)
            done = f"snap-{entry['device'].rsplit('/', 1)[-1]}-dry-run"
        else:
            done = _upload_one(job, ebs, entry, image, digest)
        by_placeholder[entry["placeholder"]] = done
    for mapping in job.request.get("BlockDeviceMappings", []):
        ebs_shape = mapping.get("Ebs", {})
        if ebs_shape.get("SnapshotId") in by_placeholder:
            ebs_shape["SnapshotId"] = by_placeholder[ebs_shape["SnapshotId"]]
        elif is_placeholder(ebs_shape.get("SnapshotId", "")):
            raise BuildFailed(f"no image for {mapping['DeviceName']}'s snapshot")


def _encryption(job: Publication, entry: dict[str, Any]) -> Encryption:
    """What was asked, or the account's encryption by default, which StartSnapshot
    cannot turn off."""
    asked = _asked(job, entry)
    key = asked["kms_key_id"]
    return Encryption(asked["encrypted"] or job.encrypted_by_default,
                      _key_arn(job, key) if key else None)


def _asked(job: Publication, entry: dict[str, Any]) -> dict[str, Any]:
    """What a snapshot must have been made with to be reused or resumed: the encryption
    asked for and whether zero blocks were skipped."""
    return {"encrypted": bool(entry.get("encrypted") or entry.get("kms_key_id")
                              or job.kms_key_id),
            "kms_key_id": entry.get("kms_key_id") or job.kms_key_id,
            "skip_zero_blocks": job.skip_zero_blocks}


def _key_arn(job: Publication, key: str) -> str:
    """StartSnapshot takes a key's ARN only (KmsKeyArn); a recipe or --kms-key-id may name
    it by id, alias or alias ARN: KMS DescribeKey answers the key's ARN for all four."""
    if key not in job.key_arns:
        if job.aws.dry_run:
            return key
        job.key_arns[key] = usable_key_arn(job.aws.client("kms"), key,
                                           f"KMS key {key!r} ({job.target})")
    return job.key_arns[key]


def _upload_one(job: Publication, ebs: Any, entry: dict[str, Any], image: Path,
                digest: str) -> str:
    """Upload one image; a snapshot left pending by an interrupted run is filled again."""
    device = entry["device"]
    asked = _asked(job, entry)
    pending = job.record["pending"].get(device, {})
    same = pending.get("sha256") == digest and pending.get("asked") == asked
    resume = pending.get("snapshot") if same else None
    encryption = _encryption(job, entry)

    def started(snapshot_id: str) -> None:
        job.record["pending"][device] = {**job.record["pending"][device],
                                         "snapshot": snapshot_id}
        job.save()

    def fresh_token() -> str:
        """A new ClientToken per new snapshot, saved before StartSnapshot: a retry after a
        crash gets the same snapshot back, and a new snapshot never a finished one's."""
        token = uuid.uuid4().hex
        job.record["pending"][device] = {"sha256": digest, "asked": asked, "token": token}
        job.save()
        return token

    say(f"{device}: {'resuming ' + resume if resume else 'uploading'} {entry['image']} "
        f"({job.workers} workers{', encrypted' if encryption.enabled else ''})")
    common = {"description": _description(job, device), "tags": job.tags, "workers": job.workers,
              "encryption": encryption, "started": started,
              "skip_zero_blocks": job.skip_zero_blocks}
    token = pending.get("token") if same and not resume else None
    try:
        done, stats = upload_image(ebs, image, client_token=token or fresh_token(),
                                   snapshot_id=resume, **common)
    except ClientError:
        if not (resume or token):
            raise
        say(f"{device}: {resume or 'the pending snapshot'} can no longer be written; "
            "starting a new snapshot")
        done, stats = upload_image(ebs, image, client_token=fresh_token(), **common)
    skipped = (f"{stats.blocks_zero} zero blocks skipped" if stats.blocks_zero else
               "zero blocks written too")
    say(f"{device}: {done}, {stats.blocks_sent} blocks sent, {skipped}")
    job.record["pending"].pop(device, None)
    job.record["snapshot_ids"][device] = done
    job.record["uploaded"][entry["image"]] = digest
    job.record["uploads"][device] = {"encrypted": stats.encrypted, "asked": asked,
                                     "blocks_written": stats.blocks_sent,
                                     "blocks_skipped": stats.blocks_zero}
    job.save()
    return done


def _upload_bundle(job: Publication, bucket: str | None) -> str:
    if not bucket:
        raise InputError("instance-store images are uploaded to S3: pass --bucket")
    files = sorted(p for p in (job.output_dir / "bundle").iterdir()
                   if p.name.startswith("image."))
    prefix = read_json(job.output_dir / "build-manifest.json")["name"]  # checked: a name
    s3 = None if job.aws.dry_run else job.aws.client("s3")
    for path in files:
        key = f"{prefix}/{path.name}"
        digest = sha256_file(path)
        if job.record["uploaded"].get(key) == digest:
            continue
        if s3 is None:
            job.aws.would("s3.PutObject", Bucket=bucket, Key=key, ACL="aws-exec-read")
            continue
        with open(path, "rb") as body:
            s3.put_object(Bucket=bucket, Key=key, Body=body, ACL="aws-exec-read")
        job.record["uploaded"][key] = digest
        job.save()
    say(f"uploaded {len(files)} bundle files to s3://{bucket}/{prefix}/")
    return f"{bucket}/{prefix}/image.manifest.xml"


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
        return _replace(job, existing, sorted(set(theirs.values())))
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


def _replace(job: Publication, old_image: str, old_snapshots: list[str]) -> str:
    """--force: AMI names are unique per account and region, so the old AMI is deregistered
    first (the new snapshots are uploaded by now: the name is free for a moment only), then
    the new one registered; the old one's snapshots are deleted once it is
    (_finish_replacement, which a re-run also does if this run stops in between)."""
    ec2 = job.aws.client("ec2")
    job.record["replaced"] = {"image_id": old_image, "snapshot_ids": old_snapshots,
                              "done": False}
    job.save()
    say(f"--force: deregistering {old_image}, an AMI of the same name; its snapshots "
        f"({', '.join(old_snapshots) or 'none'}) go once the new AMI is registered")
    ec2.deregister_image(ImageId=old_image)
    return str(ec2.register_image(**job.request)["ImageId"])


def _finish_replacement(job: Publication) -> None:
    replaced = job.record.get("replaced")
    if not replaced or replaced.get("done"):
        return
    ec2, deleted = job.aws.client("ec2"), []
    for snapshot_id in sorted(set(replaced["snapshot_ids"]) -
                              set(job.record["snapshot_ids"].values())):
        if not _made_for_this_name(job, snapshot_id):
            say(f"{snapshot_id} was not made by publish for {job.request['Name']}: kept")
            continue
        try:
            ec2.delete_snapshot(SnapshotId=snapshot_id)
            deleted.append(snapshot_id)
        except ClientError as exc:
            if _code(exc) == "InvalidSnapshot.InUse":  # another AMI uses it too
                say(f"{snapshot_id} (of {replaced['image_id']}) is used by another AMI: kept")
            elif _code(exc) != "InvalidSnapshot.NotFound":
                raise
    replaced["done"] = True
    job.save()
    say(f"replaced {replaced['image_id']} (deleted its snapshots: "
        f"{', '.join(deleted) or 'none'})")


def _made_for_this_name(job: Publication, snapshot_id: str) -> bool:
    """An old AMI's snapshot that --force may delete: this account's, and made by publish
    for an AMI of this name (its description)."""
    try:
        [snapshot] = job.aws.client("ec2").describe_snapshots(
            SnapshotIds=[snapshot_id])["Snapshots"]
    except (ClientError, ValueError):
        return False
    return (snapshot.get("OwnerId") == job.account and
            str(snapshot.get("Description", "")).startswith(f"{job.request['Name']} /dev/"))


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


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not found (is this a build output directory?)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)
