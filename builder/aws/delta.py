"""publish --parent: which snapshot each new one starts from (StartSnapshot's
ParentSnapshotId), and what that parent holds, so that only the blocks whose hash differs
are sent (builder.aws.blockindex).

The parent is the snapshot an earlier publish made for the same device (``--parent
PREV_OUT``: its publish.json holds the block index), or one named with
``--parent-snapshot DEVICE=snap-...``, whose index comes from ``--parent-index`` (a
publish.json that holds it, or one of another snapshot of its lineage: then
ListChangedBlocks) or else from ListSnapshotBlocks.

What AWS refuses with a parent is refused here first, before anything is uploaded
(https://docs.aws.amazon.com/ebs/latest/userguide/ebsapis-using-encryption.html): a child
has its parent's encryption and key, so the encryption asked for (the recipe, --kms-key-id,
the account's encryption by default) must be the parent's."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from builder.aws import state
from builder.aws.blockindex import BlockIndex, index_from_api
from builder.aws.job import Publication, error_code, own_snapshot, say
from builder.aws.snapshots import BLOCK, Encryption, GiB, volume_gib
from builder.errors import InputError

BLOCKS_PER_GIB = GiB // BLOCK
SNAPSHOT_ID = re.compile(r"snap-[0-9a-f]{8,60}")


@dataclass(frozen=True)
class ParentOptions:
    output_dir: Path | None = None                            # --parent PREV_OUT
    snapshots: dict[str, str] = field(default_factory=dict)   # --parent-snapshot DEV=SNAP
    index_file: Path | None = None                            # --parent-index FILE

    def __bool__(self) -> bool:
        return bool(self.output_dir or self.snapshots)


def parse_parent_snapshot(value: str) -> tuple[str, str]:
    """DEVICE=snap-... of --parent-snapshot."""
    device, _, snapshot_id = value.partition("=")
    if not re.fullmatch(r"/dev/[a-z0-9]{1,16}", device) or \
            not SNAPSHOT_ID.fullmatch(snapshot_id):
        raise InputError(f"--parent-snapshot {value!r}: give DEVICE=snap-ID "
                         "(e.g. /dev/xvda=snap-0123456789abcdef0)")
    return device, snapshot_id


def recorded_indexes(path: Path) -> list[tuple[str, str, BlockIndex]]:
    """(target, device, block index) of every snapshot a publish.json records."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable publish.json ({exc})") from None
    targets = data.get("targets") if isinstance(data, dict) else None
    found = []
    for target, record in (targets if isinstance(targets, dict) else {}).items():
        uploads = record.get("uploads") if isinstance(record, dict) else None
        for device, upload in (uploads if isinstance(uploads, dict) else {}).items():
            if isinstance(upload, dict) and "block_index" in upload:
                found.append((target, device, BlockIndex.from_json(
                    upload["block_index"], f"{path}: {target}: {device}: block_index")))
    return found


def resolve_parents(job: Publication, entries: list[dict[str, Any]], options: ParentOptions,
                    encryption_of: Any) -> dict[str, BlockIndex]:
    """device -> the parent's block index, for each image that has a parent.
    ``encryption_of(entry)`` is how that image's snapshot is to be encrypted."""
    if not options:
        return {}
    devices = {e["device"] for e in entries}
    unknown = sorted(set(options.snapshots) - devices)
    if unknown:
        raise InputError(f"--parent-snapshot {unknown[0]}: this build has no snapshot for it "
                         f"(it has {', '.join(sorted(devices))})")
    chosen = _recorded_parents(job, options.output_dir) if options.output_dir else {}
    chosen.update({d: (s, None) for d, s in options.snapshots.items()})
    known = recorded_indexes(options.index_file) if options.index_file else []
    parents = {}
    for entry in entries:
        device = entry["device"]
        if device not in chosen:
            say(f"{device}: no parent snapshot; uploading it whole")
            continue
        snapshot_id, index = chosen[device]
        volume_size = _check_parent(job, device, snapshot_id, job.output_dir / entry["image"],
                                    encryption_of(entry))
        if index is None:
            index = _index_from_api(job, device, snapshot_id, known)
        if len(index.blocks) > volume_size * BLOCKS_PER_GIB:
            raise InputError(f"{device}: the block index of {snapshot_id} has "
                             f"{len(index.blocks)} blocks, more than its {volume_size} GiB "
                             "volume holds")
        parents[device] = index
    return parents


def _recorded_parents(job: Publication, output_dir: Path
                      ) -> dict[str, tuple[str, BlockIndex | None]]:
    """The snapshots PREV_OUT's publish made in this target, with their block indexes."""
    record = state.load(output_dir, job.target)
    snapshot_ids = record.get("snapshot_ids")
    if not isinstance(snapshot_ids, dict) or not snapshot_ids:
        raise InputError(f"--parent {output_dir}: its {state.STATE} records no snapshots in "
                         f"{job.target}; publish it there first, or name the parent with "
                         "--parent-snapshot")
    chosen: dict[str, tuple[str, BlockIndex | None]] = {}
    for device, snapshot_id in snapshot_ids.items():
        upload = (record.get("uploads") or {}).get(device) or {}
        index = None
        if isinstance(upload, dict) and "block_index" in upload:
            index = BlockIndex.from_json(upload["block_index"],
                                         f"{output_dir / state.STATE}: {device}: block_index")
            index = index if index.snapshot_id == snapshot_id else None
        chosen[device] = (str(snapshot_id), index)
    return chosen


def _index_from_api(job: Publication, device: str, snapshot_id: str,
                    known: list[tuple[str, str, BlockIndex]]) -> BlockIndex:
    """The parent's index from --parent-index: its own, or that of the snapshot the same
    target's publish made for the device (one of its lineage, say the release before)
    with ListChangedBlocks; else read with ListSnapshotBlocks."""
    for _, _, index in known:
        if index.snapshot_id == snapshot_id:
            return index
    ebs = job.aws.client("ebs")
    for target, other_device, index in known:
        if target != job.target or other_device != device:
            continue
        try:
            found = index_from_api(ebs, snapshot_id, index, job.workers)
        except ClientError as exc:
            say(f"{device}: ListChangedBlocks from {index.snapshot_id} to {snapshot_id} "
                f"failed ({error_code(exc)})")
            break
        say(f"{device}: {snapshot_id}'s block index from {index.snapshot_id}'s and "
            "ListChangedBlocks")
        return found
    say(f"{device}: {snapshot_id} has no recorded block index: reading it "
        "(ListSnapshotBlocks and each block's checksum)")
    return index_from_api(ebs, snapshot_id, None, job.workers)


def _check_parent(job: Publication, device: str, snapshot_id: str, image: Path,
                  encryption: Encryption) -> int:
    """The parent is this account's, completed, no larger than the new volume, and
    encrypted as the new snapshot is to be (a child keeps its parent's encryption).
    Returns its volume size (GiB)."""
    named = f"{device}: the parent snapshot {snapshot_id}"
    snapshot = own_snapshot(job, snapshot_id)
    if snapshot is None:
        raise InputError(f"{named} is not this account's, or not in {job.target}")
    if snapshot.get("State") != "completed":
        raise InputError(f"{named} is {snapshot.get('State')}, not completed")
    if int(snapshot.get("VolumeSize", 0)) > volume_gib(image):
        raise InputError(f"{named} is of a {snapshot['VolumeSize']} GiB volume, larger than "
                         f"{image.name} ({volume_gib(image)} GiB): publish it without a parent")
    parent_encrypted = bool(snapshot.get("Encrypted"))
    if parent_encrypted == encryption.enabled:
        if parent_encrypted:
            _check_key(job, named, str(snapshot.get("KmsKeyId")), encryption.kms_key_arn)
        return int(snapshot.get("VolumeSize", 0))
    if not parent_encrypted and job.encrypted_by_default:
        raise InputError(f"{named} is unencrypted, and AWS starts no snapshot from an "
                         "unencrypted parent in an account that encrypts new snapshots by "
                         "default: publish without a parent (or copy the parent encrypted)")
    if encryption.enabled:
        raise InputError(f"{named} is unencrypted, and a child snapshot cannot be encrypted "
                         "(AWS refuses Encrypted and KmsKeyArn with an unencrypted parent): "
                         "publish without a parent")
    raise InputError(f"{named} is encrypted, so its child would be too (with the parent's "
                     "key), but this snapshot is to be unencrypted: publish without a parent")


def _check_key(job: Publication, named: str, parent_key: str, wanted: str | None) -> None:
    """An encrypted child gets its parent's key (AWS refuses another KmsKeyArn): it must
    be the key asked for, or with none, the account's default key for EBS."""
    if wanted is None:
        wanted = str(job.aws.client("ec2").get_ebs_default_kms_key_id()["KmsKeyId"])
    if _key_arn(job, wanted) != _key_arn(job, parent_key):
        raise InputError(f"{named} is encrypted with {parent_key}, and its child would be "
                         f"too, not with {wanted}: publish without a parent, or with the "
                         "parent's key")


def _key_arn(job: Publication, key: str) -> str:
    """The key's ARN as KMS names it (an alias resolved), or the name as given when KMS
    does not answer (the comparison then is of the names)."""
    try:
        return str(job.aws.client("kms").describe_key(KeyId=key)["KeyMetadata"]["Arn"])
    except ClientError:
        return key
