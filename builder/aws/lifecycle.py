"""publish, share, copy, deregister: each a short sequence of boto3 calls. publish records
what it made in publish.json after every step, so a re-run resumes: completed snapshots
are reused, and an AMI of the same name is found rather than registered twice."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from builder.aws.session import Aws
from builder.aws.snapshots import upload_image
from builder.errors import BuildFailed, InputError
from builder.host.fsutil import atomic_write_json
from builder.outputs.ami import is_placeholder
from builder.plan import sha256_file

STATE = "publish.json"
IMAGE_TAG = "amiforge:image-id"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not found (is this a build output directory?)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def _token(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:64]


def _say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def _find_image(ec2: Any, name: str) -> str | None:
    images = ec2.describe_images(Owners=["self"],
                                 Filters=[{"Name": "name", "Values": [name]}])["Images"]
    live = [i for i in images if i.get("State") != "deregistered"]
    return live[0]["ImageId"] if live else None


def publish(output_dir: Path, aws: Aws, bucket: str | None = None, workers: int = 16) -> dict:
    request = _read_json(output_dir / "register-image.json")
    state_path = output_dir / STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("image_id") and not aws.dry_run:
        _say(f"already published as {state['image_id']} (see {state_path})")
        return state
    state.update(region=aws.region, snapshot_ids=state.get("snapshot_ids", {}),
                 uploaded=state.get("uploaded", {}))
    tags = {t["Key"]: t["Value"] for spec in request.get("TagSpecifications", [])
            for t in spec["Tags"]}
    if "ImageLocation" in request:
        request["ImageLocation"] = _upload_bundle(output_dir, aws, bucket, state, state_path)
    else:
        snapshots = _read_json(output_dir / "snapshots.json")["snapshots"]
        _upload_snapshots(output_dir, snapshots, request, aws, tags, workers, state, state_path)
    image_id = _register(request, aws, state)
    if image_id is None:  # dry run
        return state
    state["image_id"] = image_id
    atomic_write_json(state_path, state)
    if state["snapshot_ids"]:  # deregister --delete-snapshots finds them by this tag too
        aws.client("ec2").create_tags(Resources=sorted(state["snapshot_ids"].values()),
                                      Tags=[{"Key": IMAGE_TAG, "Value": image_id}])
    permission_path = output_dir / "launch-permission.json"
    if permission_path.exists():
        permission = _read_json(permission_path)
        permission["ImageId"] = image_id
        aws.client("ec2").modify_image_attribute(**permission)
    _say(f"published {request['Name']} as {image_id} in {aws.region}")
    return state


def _upload_snapshots(output_dir: Path, snapshots: list[dict], request: dict, aws: Aws,
                      tags: dict[str, str], workers: int, state: dict,
                      state_path: Path) -> None:
    ebs = None if aws.dry_run else aws.client("ebs")
    by_placeholder = {}
    for entry in snapshots:
        image = output_dir / entry["image"]
        digest = state["uploaded"].get(entry["image"]) or sha256_file(image)
        if digest != entry["sha256"]:
            raise InputError(f"{image}: changed since the build (sha256 differs from "
                             "snapshots.json); rebuild before publishing")
        done = state["snapshot_ids"].get(entry["device"])
        if done and state["uploaded"].get(entry["image"]) == digest:
            _say(f"{entry['device']}: reusing {done} from an earlier run")
        elif aws.dry_run:
            aws.would("ebs.StartSnapshot / PutSnapshotBlock / CompleteSnapshot",
                      image=entry["image"], size=entry["size"])
            done = f"snap-{entry['device'].rsplit('/', 1)[-1]}-dry-run"
        else:
            done = _upload_one(ebs, entry, image, digest, request["Name"], tags, workers,
                               state, state_path)

        by_placeholder[entry["placeholder"]] = done
    for mapping in request.get("BlockDeviceMappings", []):
        ebs_shape = mapping.get("Ebs", {})
        if ebs_shape.get("SnapshotId") in by_placeholder:
            ebs_shape["SnapshotId"] = by_placeholder[ebs_shape["SnapshotId"]]
        elif is_placeholder(ebs_shape.get("SnapshotId", "")):
            raise BuildFailed(f"no image for {mapping['DeviceName']}'s snapshot")


def _upload_one(ebs: Any, entry: dict, image: Path, digest: str, name: str,
                tags: dict[str, str], workers: int, state: dict, state_path: Path) -> str:
    """Upload one image; a snapshot left pending by an interrupted run is filled again."""
    device = entry["device"]
    pending = state.setdefault("pending", {}).get(device, {})
    resume = pending.get("snapshot") if pending.get("sha256") == digest else None

    def started(snapshot_id: str) -> None:
        state["pending"][device] = {"snapshot": snapshot_id, "sha256": digest}
        atomic_write_json(state_path, state)

    _say(f"{device}: {'resuming ' + resume if resume else 'uploading'} {entry['image']} "
         f"({workers} workers)")
    try:
        done, stats = upload_image(ebs, image, description=f"{name} {device}", tags=tags,
                                   workers=workers, client_token=_token(digest, device, name),
                                   snapshot_id=resume, started=started)
    except ClientError:
        if not resume:
            raise
        _say(f"{device}: {resume} can no longer be written; starting a new snapshot")
        done, stats = upload_image(ebs, image, description=f"{name} {device}", tags=tags,
                                   workers=workers, started=started)
    _say(f"{device}: {done}, {stats.blocks_sent} blocks sent, "
         f"{stats.blocks_zero} zero blocks skipped")
    state["pending"].pop(device, None)
    state["snapshot_ids"][device] = done
    state["uploaded"][entry["image"]] = digest
    atomic_write_json(state_path, state)
    return done


def _upload_bundle(output_dir: Path, aws: Aws, bucket: str | None, state: dict,
                   state_path: Path) -> str:
    if not bucket:
        raise InputError("instance-store images are uploaded to S3: pass --bucket")
    bundle = output_dir / "bundle"
    files = sorted(p for p in bundle.iterdir() if p.name.startswith("image."))
    prefix = _read_json(output_dir / "build-manifest.json")["name"]
    s3 = None if aws.dry_run else aws.client("s3")
    for path in files:
        key = f"{prefix}/{path.name}"
        digest = sha256_file(path)
        if state["uploaded"].get(key) == digest:
            continue
        if s3 is None:
            aws.would("s3.PutObject", Bucket=bucket, Key=key, ACL="aws-exec-read")
            continue
        with open(path, "rb") as body:
            s3.put_object(Bucket=bucket, Key=key, Body=body, ACL="aws-exec-read")
        state["uploaded"][key] = digest
        atomic_write_json(state_path, state)
    _say(f"uploaded {len(files)} bundle files to s3://{bucket}/{prefix}/")
    return f"{bucket}/{prefix}/image.manifest.xml"


def _register(request: dict, aws: Aws, state: dict) -> str | None:
    if aws.dry_run:
        aws.would("ec2.DescribeImages", Owners=["self"], Name=request["Name"])
        aws.would("ec2.RegisterImage", **request)
        return None
    ec2 = aws.client("ec2")
    existing = _find_image(ec2, request["Name"])
    if existing:
        _say(f"an AMI named {request['Name']} exists: {existing}; not registering another")
        return existing
    # RegisterImage takes no ClientToken: the name lookup above is what makes re-runs safe
    # (AMI names are unique per account and region).
    return ec2.register_image(**request)["ImageId"]


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
