"""Read a snapshot back through the EBS direct API and compare it with the image it was
made from, block for block: a snapshot that silently differs from the image is found at
publish time, not when an instance fails to boot (NixOS/amis #123, coldsnap #395).

Every block of the image is compared, zeros included. A block the snapshot does not hold
reads as zeros on an unencrypted volume, so an image block of zeros may be absent from an
unencrypted snapshot (publish --skip-zero-blocks makes such snapshots); an encrypted
snapshot's volume reads random bytes there (coldsnap #470), so there an absent block is a
difference. Blocks the snapshot holds past the image's end must be zeros. Each block read
is also checked against the SHA-256 GetSnapshotBlock sends with it.
https://docs.aws.amazon.com/ebs/latest/APIReference/API_GetSnapshotBlock.html"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ConnectionClosedError, ReadTimeoutError, ResponseStreamingError

from builder.aws import state
from builder.aws.blockindex import changed_blocks
from builder.aws.job import Publication, say
from builder.aws.snapshots import BLOCK, GiB, list_blocks
from builder.errors import BuildFailed, InputError

ZERO_DIGEST = hashlib.sha256(bytes(BLOCK)).digest()
READ_ATTEMPTS = 3
COMPLETED_WAIT = {"Delay": 15, "MaxAttempts": 40}  # 10 minutes
EBS_FAQ = "https://docs.aws.amazon.com/ebs/latest/userguide/ebsapi-faq.html"
EBS_CONCEPTS = "https://docs.aws.amazon.com/ebs/latest/userguide/ebsapi-elements.html"
SHOWN = 10  # differing block indexes named in a message


class SnapshotDiffers(BuildFailed):
    """A snapshot read back is not its image (exit 1)."""


@dataclass
class Verification:
    snapshot_id: str
    image: str
    encrypted: bool
    blocks_total: int = 0       # the image's blocks, and any the snapshot holds past them
    blocks_read: int = 0
    absent_zero: int = 0        # zero blocks of the image the snapshot lacks (allowed)
    differing: list[int] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)  # no whole block, retries failed
    problem: str | None = None  # what differs before any block (the snapshot's size)

    @property
    def ok(self) -> bool:
        return not self.differing and not self.unreadable and self.problem is None

    @property
    def differs(self) -> bool:
        """Holds other bytes than the image (not merely unreadable here and now)."""
        return bool(self.differing) or self.problem is not None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "differing": self.differing[:SHOWN],
                "unreadable": self.unreadable[:SHOWN], "ok": self.ok,
                "differing_count": len(self.differing)}

    def summary(self) -> str:
        if self.ok:
            absent = (f", {self.absent_zero} zero blocks absent (read as zeros)"
                      if self.absent_zero else "")
            return (f"{self.snapshot_id} equals {self.image}: {self.blocks_read} blocks "
                    f"read{absent}")
        if self.problem:
            return f"{self.snapshot_id} differs from {self.image}: {self.problem}"
        if not self.differing:
            return (f"{self.snapshot_id}: {len(self.unreadable)} block(s) could not be read "
                    f"whole (index {_indexes(self.unreadable)}): try again")
        return (f"{self.snapshot_id} differs from {self.image} in {len(self.differing)} "
                f"block(s) of {BLOCK // 1024} KiB: index {_indexes(self.differing)}")


def _indexes(indexes: list[int]) -> str:
    more = f" and {len(indexes) - SHOWN} more" if len(indexes) > SHOWN else ""
    return ", ".join(str(i) for i in indexes[:SHOWN]) + more


def verify_snapshot(ebs: Any, ec2: Any, snapshot_id: str, image: Path, workers: int = 16,
                    absent_zeros: bool | None = None) -> Verification:
    """Compare SNAPSHOT_ID with IMAGE. ``absent_zeros``: whether a zero block of the image
    may be absent from the snapshot (default: when it is unencrypted)."""
    if not image.is_file():
        raise InputError(f"{image}: not an image file")
    snapshot = completed_snapshot(ec2, snapshot_id)
    result = Verification(snapshot_id, image.name, bool(snapshot.get("Encrypted")))
    # never from an encrypted snapshot: its volume reads random bytes there
    absent_zeros = absent_zeros is not False and not result.encrypted
    tokens, volume_size = stored_blocks(ebs, snapshot_id)
    size = image.stat().st_size
    if volume_size * GiB < size:
        result.problem = (f"the snapshot's volume ({volume_size} GiB) is smaller than the "
                          f"image ({size} bytes)")
        return result
    indexes = sorted(set(range(-(-size // BLOCK))) | set(tokens))
    result.blocks_total = len(indexes)

    def compare(index: int) -> tuple[int, str]:
        expected = _image_block_digest(image, index, size)
        if index not in tokens:
            return index, "absent-zero" if absent_zeros and expected == ZERO_DIGEST \
                else "differs"
        got = _read_block(ebs, snapshot_id, index, tokens[index])
        return index, "unreadable" if got is None else "same" if got == expected else "differs"

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for index, outcome in pool.map(compare, indexes):
            if outcome == "absent-zero":
                result.absent_zero += 1
                continue
            result.blocks_read += outcome != "unreadable"
            if outcome != "same":
                (result.differing if outcome == "differs" else result.unreadable).append(index)
    return result


def completed_snapshot(ec2: Any, snapshot_id: str) -> dict[str, Any]:
    """The snapshot once it is completed: the EBS direct APIs read only completed snapshots
    (EBS_FAQ), and one CompleteSnapshot just finished may still be pending a while; nor
    public ones (EBS_CONCEPTS)."""
    [snapshot] = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
    if snapshot.get("State") == "pending":
        say(f"{snapshot_id} is pending: waiting until it is completed")
        ec2.get_waiter("snapshot_completed").wait(SnapshotIds=[snapshot_id],
                                                  WaiterConfig=COMPLETED_WAIT)
        [snapshot] = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
    if snapshot.get("State") != "completed":
        raise BuildFailed(f"{snapshot_id} is {snapshot.get('State')}, not completed: EBS "
                          "cannot read it back")
    permissions = ec2.describe_snapshot_attribute(
        SnapshotId=snapshot_id, Attribute="createVolumePermission")["CreateVolumePermissions"]
    if {"Group": "all"} in permissions:
        raise InputError(f"{snapshot_id} is public, and the EBS direct APIs do not read "
                         f"public snapshots ({EBS_CONCEPTS}): verify it before sharing it")
    return snapshot


def stored_blocks(ebs: Any, snapshot_id: str) -> tuple[dict[int, str], int]:
    """Index -> BlockToken of every block the snapshot holds, and its volume size (GiB)."""
    listed, volume_size = list_blocks(ebs, "list_snapshot_blocks", "Blocks",
                                      SnapshotId=snapshot_id)
    return {b["BlockIndex"]: b["BlockToken"] for b in listed}, volume_size


def _image_block_digest(image: Path, index: int, size: int) -> bytes:
    if index * BLOCK >= size:
        return ZERO_DIGEST  # past the image's end: the volume reads zeros there
    with open(image, "rb") as handle:
        data = os.pread(handle.fileno(), BLOCK, index * BLOCK).ljust(BLOCK, b"\0")
    return hashlib.sha256(data).digest()


def _read_block(ebs: Any, snapshot_id: str, index: int, token: str) -> bytes | None:
    """The SHA-256 of a stored block; None when, after READ_ATTEMPTS, no whole block came
    that matches the checksum sent with it (a transfer gone wrong is not a difference)."""
    for _ in range(READ_ATTEMPTS):
        try:
            answer = ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index,
                                            BlockToken=token)
            data = answer["BlockData"].read()
        except (ResponseStreamingError, ReadTimeoutError, ConnectionClosedError):
            continue
        digest = hashlib.sha256(data).digest()
        sent = answer.get("Checksum")
        if len(data) == BLOCK and (not sent or base64.b64decode(sent) == digest):
            return digest
    return None


def _lineage_problem(ebs: Any, parent: str, child: str, written: list[int]) -> str | None:
    """A child snapshot differs from its parent in exactly the blocks publish wrote
    (ListChangedBlocks): the whole volume read as the image already, and this shows the
    child is the parent's with those blocks and no others."""
    changed = changed_blocks(ebs, parent, child)
    if changed == set(written):
        return None
    return (f"ListChangedBlocks from {parent} lists {len(changed)} changed blocks, and "
            f"publish wrote {len(written)}")


def verify_uploads(job: Publication, entries: list[dict[str, Any]]) -> None:
    """publish --verify: each snapshot against its image, before the AMI is registered
    (after, for an AMI published before); the results go into publish.json. A snapshot
    that differs is forgotten by the record (unless an AMI holds it already), so publishing
    again uploads its image anew."""
    if job.aws.dry_run:
        job.aws.would("ebs.ListSnapshotBlocks / GetSnapshotBlock",
                      devices=[e["device"] for e in entries])
        return
    ebs, ec2 = job.aws.client("ebs"), job.aws.client("ec2")
    verified = job.record.setdefault("verified", {})
    differing = []
    for entry in entries:
        device = entry["device"]
        snapshot_id = job.record["snapshot_ids"][device]
        earlier = verified.get(device, {})
        if earlier.get("snapshot_id") == snapshot_id and earlier.get("ok") and \
                earlier.get("image_sha256") == entry["sha256"]:
            say(f"{device}: {snapshot_id} was verified by an earlier run")
            continue
        # a zero block may be absent only where publish skipped zero blocks: it wrote
        # every block otherwise, and a missing one is a lost write
        upload = job.record.get("uploads", {}).get(device, {})
        asked = upload.get("asked", {})
        result = verify_snapshot(ebs, ec2, snapshot_id, job.output_dir / entry["image"],
                                 job.workers, bool(asked.get("skip_zero_blocks")))
        if result.ok and upload.get("parent") and "written" in upload:
            result.problem = _lineage_problem(ebs, upload["parent"], snapshot_id,
                                              upload["written"])
        verified[device] = {**result.to_dict(), "image_sha256": entry["sha256"]}
        job.save()
        say(f"{device}: {result.summary()}")
        if not result.ok:
            differing.append(f"{device}: {result.summary()}")
            if result.differs and not job.record.get("image_id"):
                job.record["snapshot_ids"].pop(device, None)
                job.record["uploaded"].pop(entry["image"], None)
                job.save()
    if differing:
        kept = ("the AMI holds them" if job.record.get("image_id") else
                "not registered; a differing snapshot is kept for a look (delete it with "
                f"`aws ec2 delete-snapshot`) and forgotten by {state.STATE}: publishing "
                "again uploads it anew")
        raise SnapshotDiffers("; ".join(differing) + f" ({kept})")
