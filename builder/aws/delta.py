"""publish --parent: which snapshot each new one starts from (StartSnapshot's
ParentSnapshotId), and what that parent holds, so that only the blocks whose hash differs
are sent (builder.aws.blockindex).

The parent is the snapshot an earlier publish made for the same device (``--parent
PREV_OUT``: its publish.json names it) or one named with ``--parent-snapshot
DEVICE=snap-...``. What it holds comes from the block index that publish recorded for it
(PREV_OUT's publish.json, or a file given with ``--parent-index``) only when the parent
snapshot's own tag holds that index's digest (builder.aws.blockindex.vouched_index);
otherwise it is read from EBS itself (ListSnapshotBlocks, and the checksum
GetSnapshotBlock answers for each block). An index from an edited file could otherwise make
publish skip blocks the parent does not hold as claimed, and the AMI would show the
parent's bytes (another snapshot's data) there. Whatever the parent is, the child then
reads as the image.

What AWS refuses with a parent is refused here first, before anything is uploaded
(https://docs.aws.amazon.com/ebs/latest/userguide/ebsapis-using-encryption.html): a child
has its parent's encryption and key, so the parent must be encrypted as the new snapshot is
to be. (That the parent's volume be no larger than the new one is amiforge's own rule:
AWS documents none, and a smaller child would cut the parent's blocks off.)"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.aws import state
from builder.aws.blockindex import BlockIndex, holds_as_indexed, index_from_api, vouched_index
from builder.aws.job import Publication, own_snapshot, say
from builder.aws.snapshots import Encryption, volume_gib
from builder.errors import InputError
from builder.host.fsutil import read_json

SNAPSHOT_ID = re.compile(r"snap-[0-9a-f]{8,59}")  # at most 64 characters (the API's)


@dataclass(frozen=True)
class ParentOptions:
    output_dir: Path | None = None                            # --parent PREV_OUT
    snapshots: dict[str, str] = field(default_factory=dict)   # --parent-snapshot DEV=SNAP
    index_files: tuple[Path, ...] = ()                        # --parent-index FILE

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
    chosen.update(options.snapshots)
    recorded = _recorded_indexes(options)
    ebs, parents = job.aws.client("ebs"), {}
    for entry in entries:
        device = entry["device"]
        if device not in chosen:
            say(f"{device}: no parent snapshot; uploading it whole")
            continue
        snapshot_id = chosen[device]
        snapshot = _check_parent(job, device, snapshot_id, job.output_dir / entry["image"],
                                 encryption_of(entry))
        index = vouched_index(snapshot, recorded.get(snapshot_id, []))
        if index is not None and not holds_as_indexed(ebs, index):
            say(f"{device}: {snapshot_id} does not hold the blocks its tag's index names")
            index = None
        if index is not None:
            say(f"{device}: what {snapshot_id} holds, from its recorded block index (the "
                "snapshot's tag holds the index's digest)")
        else:
            say(f"{device}: reading what {snapshot_id} holds (ListSnapshotBlocks, checksums)")
            index = index_from_api(ebs, snapshot_id, job.workers)
        parents[device] = index
    return parents


def _recorded_indexes(options: ParentOptions) -> dict[str, list[Any]]:
    """snapshot id -> the block indexes files record for it (not trusted yet): those of
    PREV_OUT's publish.json, and of each --parent-index file (a publish.json, or one
    block_index of it)."""
    records: list[Any] = []
    if options.output_dir:
        records += state.all_targets(options.output_dir).values()
    for path in options.index_files:
        document = read_json(path)
        targets = document.get("targets") if isinstance(document, dict) else None
        records += targets.values() if isinstance(targets, dict) else [document]
    found: dict[str, list[Any]] = {}
    for record in records:
        uploads = record.get("uploads") if isinstance(record, dict) else None
        for made in uploads.values() if isinstance(uploads, dict) else [record]:
            index = made.get("block_index", made) if isinstance(made, dict) else None
            if isinstance(index, dict) and isinstance(index.get("snapshot_id"), str):
                found.setdefault(index["snapshot_id"], []).append(index)
    return found


def _recorded_parents(job: Publication, output_dir: Path) -> dict[str, str]:
    """The snapshots PREV_OUT's publish made in this target, by device."""
    record = state.load(output_dir, job.target)
    snapshot_ids = record.get("snapshot_ids")
    if not isinstance(snapshot_ids, dict) or not snapshot_ids:
        raise InputError(f"--parent {output_dir}: its {state.STATE} records no snapshots in "
                         f"{job.target}; publish it there first, or name the parent with "
                         "--parent-snapshot")
    chosen = {}
    for device, snapshot_id in snapshot_ids.items():
        if not isinstance(snapshot_id, str) or not SNAPSHOT_ID.fullmatch(snapshot_id):
            raise InputError(f"--parent {output_dir}: {state.STATE} records "
                             f"{str(snapshot_id)[:70]!r} for {str(device)[:20]!r}, not a "
                             "snapshot id")
        chosen[str(device)] = snapshot_id
    return chosen


def _check_parent(job: Publication, device: str, snapshot_id: str, image: Path,
                  encryption: Encryption) -> dict[str, Any]:
    """The parent is this account's, completed, no larger than the new volume, and
    encrypted as the new snapshot is to be (a child keeps its parent's encryption).
    Returns it as DescribeSnapshots shows it."""
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
            _check_key(named, str(snapshot.get("KmsKeyId")), encryption.kms_key_arn)
        return snapshot
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


def _check_key(named: str, parent_key: str, wanted: str | None) -> None:
    """An encrypted child gets its parent's key (AWS refuses a KmsKeyArn with an encrypted
    parent): a key the recipe or --kms-key-id names must be that one. Both are key ARNs
    already (DescribeSnapshots' KmsKeyId; the named key as publish resolved it for
    StartSnapshot). With none named, the child simply keeps the parent's key."""
    if wanted is None:
        say(f"{named} is encrypted: its child keeps its key, {parent_key}")
        return
    if wanted != parent_key:
        raise InputError(f"{named} is encrypted with {parent_key}, and its child would be "
                         f"too, not with {wanted}: publish without a parent, or with the "
                         "parent's key")
