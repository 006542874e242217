"""An image file becomes an EBS snapshot through the EBS direct APIs: StartSnapshot, one
PutSnapshotBlock per 512 KiB block (SHA-256 checksums, parallel workers), and
CompleteSnapshot with the LINEAR aggregate checksum.

Which blocks: every block the image holds, zeros included. An encrypted *volume* reads
random bytes where nobody wrote (coldsnap #395 and #470, Bottlerocket #2169), and a volume
can be encrypted even when its snapshot is not (encryption by default in the launching
account, RunInstances with Encrypted, a copy to another region); amiforge's ext4 is made
with assume_storage_prezeroed and relies on zeros there. ``skip_zero_blocks`` (an
unencrypted snapshot only) sends only the non-zero blocks, for whoever knows no volume made
from it will ever be encrypted. (Past the image's end, up to the snapshot's whole GiB, lies
no partition or filesystem.)"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from builder.errors import BuildFailed
from builder.host.fsutil import data_extents

BLOCK = 512 << 10
# StartSnapshot's Timeout: EBS cancels a snapshot not completed this long after its last
# write (publish --sweep removes what that leaves behind)
START_TIMEOUT_MINUTES = 60
GiB = 1 << 30
LIST_PAGE = 10000  # the listings' MaxResults at most


@dataclass
class UploadStats:
    blocks_total: int = 0
    blocks_sent: int = 0
    blocks_zero: int = 0      # zero blocks not sent (skip_zero_blocks, unencrypted only)
    encrypted: bool = False
    bytes_sent: int = 0
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sent(self, size: int) -> None:
        with self.lock:
            self.blocks_sent += 1
            self.bytes_sent += size


def data_blocks(path: Path) -> tuple[Iterator[tuple[int, bytes]], int]:
    """The 512 KiB blocks of an image that are not all zeros, in order, each with its
    bytes (sparse-aware: holes are not read), and the block count."""
    size = path.stat().st_size

    def blocks() -> Iterator[tuple[int, bytes]]:
        zero = bytes(BLOCK)
        with open(path, "rb") as handle:
            fd = handle.fileno()
            candidates = sorted({i for start, length in data_extents(fd, size) for i in
                                 range(start // BLOCK, (start + length - 1) // BLOCK + 1)})
            for index in candidates:
                data = os.pread(fd, BLOCK, index * BLOCK).ljust(BLOCK, b"\0")
                if data != zero:
                    yield index, data

    return blocks(), -(-size // BLOCK)


def nonzero_blocks(path: Path) -> tuple[list[int], int]:
    """Indexes of 512 KiB blocks holding data (sparse-aware), and the block count."""
    blocks, total = data_blocks(path)
    return [index for index, _ in blocks], total


def _progress(stats: UploadStats, total: int, name: str, done: bool = False) -> None:
    elapsed = max(time.monotonic() - stats.started, 1e-6)
    line = (f"    {name}: {stats.blocks_sent}/{total} blocks, "
            f"{stats.bytes_sent / 2**20:.0f} MiB, {stats.bytes_sent / 2**20 / elapsed:.1f} MiB/s")
    if sys.stderr.isatty():
        print("\r" + line, end="\n" if done else "", file=sys.stderr, flush=True)
    elif done:
        print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Encryption:
    """How the snapshot is encrypted: ``enabled`` by the recipe, ``--kms-key-id`` or the
    account's EBS encryption by default; ``kms_key_arn`` None is the account's default key."""

    enabled: bool = False
    kms_key_arn: str | None = None


def while_snapshot_appears(call: Callable[[], Any], attempts: int = 10,
                           first_delay: float = 0.25) -> Any:
    """A snapshot StartSnapshot just made can be unknown to PutSnapshotBlock for a while
    ("The snapshot does not exist": awslabs/coldsnap#43, where the EBS team advised waiting
    and retrying for up to 2 minutes, coldsnap#56). botocore does not retry that error:
    retried here with backoff, 0.25 s doubling, just over 2 minutes in all."""
    for attempt in range(attempts):
        try:
            return call()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code != "ResourceNotFoundException" or attempt == attempts - 1:
                raise
            time.sleep(first_delay * 2 ** attempt)
    raise AssertionError("unreachable")


def list_blocks(ebs: Any, call: str, key: str, **params: Any
                ) -> tuple[list[dict[str, Any]], int]:
    """Every entry of a paged EBS direct listing (ListSnapshotBlocks' Blocks,
    ListChangedBlocks' ChangedBlocks), and the volume size (GiB) it names. The first call
    is retried while EBS does not know the snapshot yet, as right after StartSnapshot
    (coldsnap#141 saw this after completion too)."""
    entries: list[dict[str, Any]] = []
    params["MaxResults"] = LIST_PAGE
    while True:
        page = while_snapshot_appears(lambda: getattr(ebs, call)(**params))
        if page.get("BlockSize", BLOCK) != BLOCK:
            raise BuildFailed(f"EBS lists blocks of {page['BlockSize']} bytes, not {BLOCK}")
        entries += page.get(key, [])
        if not page.get("NextToken"):
            return entries, int(page.get("VolumeSize", 0))
        params["NextToken"] = page["NextToken"]


def volume_gib(path: Path) -> int:
    """The snapshot's volume size: the image's, in whole GiB."""
    return max(1, -(-path.stat().st_size // GiB))


def upload_image(ebs: Any, path: Path, *, description: str, tags: dict[str, str],
                 workers: int = 16, client_token: str | None = None,
                 snapshot_id: str | None = None, encryption: Encryption = Encryption(),
                 skip_zero_blocks: bool = False, writes: list[int] | None = None,
                 parent_snapshot_id: str | None = None,
                 started: Callable[[str], None] = lambda snapshot_id: None,
                 expected: Sequence[str | None] = (),
                 ) -> tuple[str, UploadStats]:
    """Upload ``path`` to a new snapshot, or to the pending ``snapshot_id`` of an
    interrupted run (blocks are simply written again); ``started`` learns the snapshot id
    before any block is sent. ``writes``: the blocks to send, when the caller chose them
    (a child of ``parent_snapshot_id``: builder.aws.blockindex). Returns the snapshot id
    once completed."""
    if writes is None:
        indexes, total = nonzero_blocks(path)
        if encryption.enabled or not skip_zero_blocks:  # zeros included (see above)
            indexes = list(range(total))
    else:
        indexes, total = writes, -(-path.stat().st_size // BLOCK)
    if snapshot_id is None:
        params: dict[str, Any] = {"VolumeSize": volume_gib(path), "Description": description,
                                  "Timeout": START_TIMEOUT_MINUTES}
        if parent_snapshot_id:  # the child has its parent's encryption and key
            params["ParentSnapshotId"] = parent_snapshot_id
        elif encryption.enabled:
            params["Encrypted"] = True
        if encryption.kms_key_arn and not parent_snapshot_id:
            params["KmsKeyArn"] = encryption.kms_key_arn
        if tags:
            params["Tags"] = [{"Key": k, "Value": v} for k, v in sorted(tags.items())]
        if client_token:
            params["ClientToken"] = client_token
        snapshot_id = ebs.start_snapshot(**params)["SnapshotId"]
    started(snapshot_id)
    stats = UploadStats(blocks_total=total, blocks_zero=max(0, total - len(indexes)),
                        encrypted=encryption.enabled)
    digests: dict[int, bytes] = {}

    def put(index: int) -> None:
        with open(path, "rb") as handle:
            data = os.pread(handle.fileno(), BLOCK, index * BLOCK).ljust(BLOCK, b"\0")
        digest = hashlib.sha256(data).digest()
        if index < len(expected) and expected[index] not in (None, digest.hex()):
            raise BuildFailed(f"{path.name}: block {index} changed while it was uploaded; "
                              "build it again")
        while_snapshot_appears(lambda: ebs.put_snapshot_block(
            SnapshotId=snapshot_id, BlockIndex=index, BlockData=data, DataLength=BLOCK,
            Checksum=base64.b64encode(digest).decode(), ChecksumAlgorithm="SHA256"))
        digests[index] = digest
        stats.sent(BLOCK)

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(put, i) for i in indexes]
        for count, future in enumerate(concurrent.futures.as_completed(futures), 1):
            future.result()
            if count % 64 == 0:
                _progress(stats, len(indexes), path.name)
    _progress(stats, len(indexes), path.name, done=True)
    completion: dict[str, Any] = {"SnapshotId": snapshot_id,
                                  "ChangedBlocksCount": len(indexes)}
    if digests:  # the checksum of the blocks written, in index order (none: no checksum)
        aggregate = hashlib.sha256(b"".join(digests[i] for i in sorted(digests))).digest()
        completion.update(Checksum=base64.b64encode(aggregate).decode(),
                          ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR")
    ebs.complete_snapshot(**completion)
    return snapshot_id, stats
