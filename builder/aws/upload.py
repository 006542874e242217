"""publish's uploads: each image into a new EBS snapshot through the EBS direct API
(reused when an earlier run made it, resumed when it left it pending), or an
instance-store bundle into S3."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from builder.aws.blockindex import (
    INDEX_TAG,
    after_writes,
    delta_writes,
    expected_sha256,
    full_writes,
    image_blocks,
    index_digest,
)
from builder.aws.delta import ParentOptions, resolve_parents
from builder.aws.job import Publication, description, own_snapshot, say
from builder.aws.kms import usable_key_arn
from builder.aws.snapshots import Encryption, upload_image
from builder.errors import BuildFailed, InputError
from builder.host.fsutil import read_json
from builder.outputs.ami import is_placeholder
from builder.plan import sha256_file


def upload_snapshots(job: Publication, snapshots: list[dict[str, Any]],
                     parents: ParentOptions | None = None) -> None:
    ebs = None if job.aws.dry_run else job.aws.client("ebs")
    parents = parents or ParentOptions()
    reused = {e["device"] for e in snapshots if _recorded(job, e)
              and (ebs is None or _reusable(job, e))}
    if parents and ebs is None:
        job.aws.would("ebs.StartSnapshot with ParentSnapshotId (only the changed blocks)",
                      parent=str(parents.output_dir or parents.snapshots))
    elif parents:
        todo = [e for e in snapshots if e["device"] not in reused]
        job.parents = resolve_parents(job, todo, parents, lambda e: _encryption(job, e))
    by_placeholder = {}
    for entry in snapshots:
        image = job.output_dir / entry["image"]
        digest = job.record["uploaded"].get(entry["image"]) or sha256_file(image)
        if digest != entry["sha256"]:
            raise InputError(f"{image}: changed since the build (sha256 differs from "
                             "snapshots.json); rebuild before publishing")
        done = job.record["snapshot_ids"].get(entry["device"])
        if entry["device"] in reused:
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


def _recorded(job: Publication, entry: dict[str, Any]) -> bool:
    """publish.json says an earlier run made a snapshot of this image, as asked."""
    made = job.record["uploads"].get(entry["device"], {})
    return bool(job.record["snapshot_ids"].get(entry["device"])) and \
        job.record["uploaded"].get(entry["image"]) == entry["sha256"] and \
        made.get("asked") == asked_for(job, entry)


def _reusable(job: Publication, entry: dict[str, Any]) -> bool:
    """The recorded snapshot is still there, completed, this account's."""
    return _our_snapshot(job, job.record["snapshot_ids"][entry["device"]], entry["device"])


def _encryption(job: Publication, entry: dict[str, Any]) -> Encryption:
    """What was asked, or the account's encryption by default, which StartSnapshot
    cannot turn off."""
    asked = asked_for(job, entry)
    key = asked["kms_key_id"]
    return Encryption(asked["encrypted"] or job.encrypted_by_default,
                      _key_arn(job, key) if key else None)


def asked_for(job: Publication, entry: dict[str, Any]) -> dict[str, Any]:
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
    """Upload one image, whole or (with a parent) its changed blocks; a snapshot left
    pending by an interrupted run is filled again."""
    device = entry["device"]
    asked = asked_for(job, entry)
    parent = job.parents.get(device)
    parent_id = parent.snapshot_id if parent else None
    encryption = _encryption(job, entry)
    blocks = image_blocks(image)
    zeros_held = encryption.enabled or not job.skip_zero_blocks
    writes = delta_writes(blocks, parent, zeros_held) if parent else \
        full_writes(blocks, zeros_held)
    made = after_writes("", blocks, writes, parent)  # the new snapshot's index, vouched for
    vouch = index_digest(made.blocks)                # by its tag (builder.aws.blockindex)
    pending = job.record["pending"].get(device, {})
    same = pending.get("sha256") == digest and pending.get("asked") == asked and \
        pending.get("parent") == parent_id and pending.get("index") == vouch
    resume = pending.get("snapshot") if same else None

    def started(snapshot_id: str) -> None:
        job.record["pending"][device] = {**job.record["pending"][device],
                                         "snapshot": snapshot_id}
        job.save()

    def fresh_token() -> str:
        """A new ClientToken per new snapshot, saved before StartSnapshot: a retry after a
        crash gets the same snapshot back, and a new snapshot never a finished one's."""
        token = uuid.uuid4().hex
        job.record["pending"][device] = {"sha256": digest, "asked": asked, "token": token,
                                         "parent": parent_id, "index": vouch}
        job.save()
        return token

    how = f"{len(writes)} changed blocks over {parent_id}" if parent else entry["image"]
    say(f"{device}: {'resuming ' + resume if resume else 'uploading'} {how} "
        f"({job.workers} workers{', encrypted' if encryption.enabled else ''})")
    common = {"description": description(job, device), "workers": job.workers,
              "tags": {**job.tags, INDEX_TAG: vouch}, "encryption": encryption,
              "started": started, "writes": writes, "parent_snapshot_id": parent_id,
              "expected": [expected_sha256(entry) for entry in blocks]}
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
    unsent = stats.blocks_total - stats.blocks_sent
    skipped = (f"{unsent} blocks the same as in {parent_id}" if parent else
               f"{unsent} zero blocks skipped" if unsent else "zero blocks written too")
    say(f"{device}: {done}, {stats.blocks_sent} blocks sent, {skipped}")
    job.record["pending"].pop(device, None)
    job.record["snapshot_ids"][device] = done
    job.record["uploaded"][entry["image"]] = digest
    job.record["uploads"][device] = {
        "encrypted": stats.encrypted, "asked": asked, "blocks_written": stats.blocks_sent,
        "blocks_skipped": max(0, unsent), "parent": parent_id,
        **({"written": writes} if parent else {}),  # verify asks ListChangedBlocks
        "block_index": dataclasses.replace(made, snapshot_id=done).to_json()}
    job.save()
    return done


def upload_bundle(job: Publication, bucket: str | None) -> str:
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


def _our_snapshot(job: Publication, snapshot_id: str, device: str) -> bool:
    """A recorded snapshot is reused only if it is this account's, completed, and made by
    publish for this AMI name and device (StartSnapshot's description, fixed since)."""
    snapshot = own_snapshot(job, snapshot_id)
    return (snapshot is not None and snapshot.get("State") == "completed"
            and snapshot.get("Description") == description(job, device))
