"""A snapshot's block index: what it holds in each 512 KiB block, by SHA-256. publish.json
keeps one per uploaded snapshot, so that the next release's snapshot can start from it
(StartSnapshot's ParentSnapshotId) and send only the blocks whose hash differs.

An entry is the hex SHA-256 of a block the snapshot holds, ``"zero"`` for a block it holds
that is all zeros, or None where it holds nothing (an unencrypted volume reads zeros there,
an encrypted one random bytes: builder.aws.snapshots). A child snapshot reads its parent's
block wherever it writes none of its own, so a block that became zeros is written as zeros:
the parent's data must not show through.

A recorded index is trusted only as far as EBS vouches for it: publish tags each snapshot
it starts with the SHA-256 of the index the snapshot will have (INDEX_TAG), and a
snapshot's blocks cannot change once it is completed. An index from a file (an earlier
publish.json, --parent-index) whose digest is not the parent's tag is not used: what the
parent holds is then read from EBS (index_from_api)."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from builder.aws.snapshots import BLOCK, data_blocks, list_blocks
from builder.errors import InputError

ZERO = "zero"
INDEX_TAG = "amiforge:block-index-sha256"
_ZERO_SHA256 = hashlib.sha256(bytes(BLOCK)).hexdigest()

Entry = str | None


@dataclass(frozen=True)
class BlockIndex:
    snapshot_id: str
    blocks: tuple[Entry, ...]

    def entry(self, index: int) -> Entry:
        return self.blocks[index] if index < len(self.blocks) else None

    def to_json(self) -> dict[str, Any]:
        return {"snapshot_id": self.snapshot_id, "block_size": BLOCK,
                "blocks": list(self.blocks)}


def index_digest(blocks: Sequence[object]) -> str:
    """The SHA-256 of an index's blocks, as INDEX_TAG carries it (trailing blocks that hold
    nothing left out: an index read from EBS does not know the volume's end)."""
    blocks = list(blocks)
    while blocks and blocks[-1] is None:
        blocks.pop()
    return hashlib.sha256(json.dumps(blocks, separators=(",", ":")).encode()).hexdigest()


def vouched_index(snapshot: dict[str, Any], recorded: Iterable[object]) -> BlockIndex | None:
    """The first of RECORDED (block indexes as publish.json keeps them, read from files)
    that is SNAPSHOT's (as DescribeSnapshots shows it) and whose digest its INDEX_TAG
    holds; None if there is none."""
    tags = {t.get("Key"): t.get("Value") for t in snapshot.get("Tags") or []}
    if tags.get(INDEX_TAG) is None:
        return None
    for index in recorded:
        blocks = index.get("blocks") if isinstance(index, dict) else None
        if isinstance(blocks, list) and index.get("block_size") == BLOCK and \
                index.get("snapshot_id") == snapshot.get("SnapshotId") and \
                index_digest(blocks) == tags[INDEX_TAG]:
            return BlockIndex(snapshot["SnapshotId"], tuple(blocks))
    return None


def holds_as_indexed(ebs: Any, index: BlockIndex) -> bool:
    """EBS lists exactly the blocks INDEX says the snapshot holds (ListSnapshotBlocks: no
    block is read). What a tag vouches for is checked so far as it can be cheaply."""
    listed, _ = list_blocks(ebs, "list_snapshot_blocks", "Blocks",
                            SnapshotId=index.snapshot_id)
    return {b["BlockIndex"] for b in listed} == \
        {i for i, entry in enumerate(index.blocks) if entry is not None}


def expected_sha256(entry: Entry) -> str | None:
    """The SHA-256 a block of this index entry has (None: it holds nothing)."""
    return _ZERO_SHA256 if entry == ZERO else entry


def image_blocks(path: Path) -> list[str]:
    """Each block of the image: its hex SHA-256, or ZERO (holes are not read)."""
    data, total = data_blocks(path)
    blocks = [ZERO] * total
    for index, block in data:
        blocks[index] = hashlib.sha256(block).hexdigest()
    return blocks


def full_writes(image: list[str], zeros_held: bool) -> list[int]:
    """The blocks a snapshot without a parent is sent: all, or (``zeros_held`` False: an
    unencrypted publish with --skip-zero-blocks) the non-zero ones."""
    return [i for i, entry in enumerate(image) if zeros_held or entry != ZERO]


def delta_writes(image: list[str], parent: BlockIndex, zeros_held: bool) -> list[int]:
    """The blocks a child of ``parent`` must be sent to read as ``image``: each block whose
    hash differs; zeros where the parent holds data (past the image's end too); where the
    parent holds nothing, a zero block only if ``zeros_held``."""
    writes = []
    for index in range(max(len(image), len(parent.blocks))):
        want = image[index] if index < len(image) else None  # None: past the image's end
        have = parent.entry(index)
        if want == have or (want is None and have in (ZERO, None)):
            continue
        if want == ZERO and have is None and not zeros_held:
            continue
        writes.append(index)
    return writes


def after_writes(snapshot_id: str, image: list[str], writes: Iterable[int],
                 parent: BlockIndex | None = None) -> BlockIndex:
    """The index of the snapshot made by sending ``writes`` of ``image`` (over ``parent``)."""
    blocks: list[Entry] = list(parent.blocks) if parent else []
    written = sorted(writes)
    blocks += [None] * (max([len(image), *(i + 1 for i in written)]) - len(blocks))
    for index in written:
        blocks[index] = image[index] if index < len(image) else ZERO
    return BlockIndex(snapshot_id, tuple(blocks))


def index_from_api(ebs: Any, snapshot_id: str, workers: int = 16) -> BlockIndex:
    """What a snapshot holds, as EBS says: ListSnapshotBlocks for which blocks, and for
    each the checksum GetSnapshotBlock answers with (EBS checked it against the data when
    the block was written; the block's data is not read)."""
    listed, _ = list_blocks(ebs, "list_snapshot_blocks", "Blocks", SnapshotId=snapshot_id)
    tokens = {b["BlockIndex"]: b["BlockToken"] for b in listed}
    blocks: list[Entry] = [None] * (max(tokens, default=-1) + 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for index, entry in pool.map(lambda item: (item[0], _checksum(ebs, snapshot_id, *item)),
                                     tokens.items()):
            blocks[index] = entry
    return BlockIndex(snapshot_id, tuple(blocks))


def changed_blocks(ebs: Any, first: str, second: str) -> set[int]:
    """The blocks ListChangedBlocks says differ between two snapshots of one lineage."""
    changed, _ = list_blocks(ebs, "list_changed_blocks", "ChangedBlocks",
                             FirstSnapshotId=first, SecondSnapshotId=second)
    return {b["BlockIndex"] for b in changed}


def _checksum(ebs: Any, snapshot_id: str, index: int, token: str) -> str:
    """A stored block's SHA-256 as GetSnapshotBlock's checksum says (the block is read and
    hashed only where the checksum is not SHA-256)."""
    try:
        answer = ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index,
                                        BlockToken=token)
    except ClientError as exc:
        raise InputError(f"{snapshot_id}: block {index} cannot be read ({exc})") from None
    body = answer["BlockData"]
    if answer.get("ChecksumAlgorithm") == "SHA256" and answer.get("Checksum"):
        body.close()
        digest = base64.b64decode(answer["Checksum"]).hex()
    else:
        digest = hashlib.sha256(body.read()).hexdigest()
    return ZERO if digest == _ZERO_SHA256 else digest
