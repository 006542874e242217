"""Incremental snapshots for the validating layer (tests/awsrules.py): moto's EBS direct API
ignores StartSnapshot's ParentSnapshotId (its own docs: "not yet implemented"), so a child
would read as if it held only the blocks written to it. This module adds what AWS documents:

- a snapshot started with a parent is "an incremental snapshot of an existing one"
  (WRITE_SNAPSHOTS): it reads its parent's blocks unless it wrote its own, ListSnapshotBlocks
  lists them and GetSnapshotBlock returns them;
- ListChangedBlocks "returns information about the blocks that are different between two
  ... snapshots of the same volume/snapshot lineage" (LIST_CHANGED_BLOCKS), FirstSnapshotId
  and SecondSnapshotId given together, with a FirstBlockToken only where the first snapshot
  holds the block ("absent if the first snapshot does not have the changed block",
  LIST_CHANGED_BLOCKS) and a SecondBlockToken only where the second does (READ_SNAPSHOTS:
  blocks that "exist only in the first snapshot ... because there is no second block
  token"); moto lists only blocks of the first;
- no read of a pending snapshot (EBS_FAQ: "Can a snapshot be accessed using the EBS direct
  APIs if it has a pending status? No.");
- StartSnapshot's encryption outcomes with a parent (ENCRYPTION_OUTCOMES, START_SNAPSHOT);
- both listings paginate by MaxResults (100 to 10000), StartingBlockIndex and NextToken
  (moto returns everything at once).

Pure functions over ``index -> (token, holder)`` maps, so that each rule has a unit test."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable

START_SNAPSHOT = "https://docs.aws.amazon.com/ebs/latest/APIReference/API_StartSnapshot.html"
ENCRYPTION_OUTCOMES = ("https://docs.aws.amazon.com/ebs/latest/userguide/"
                       "ebsapis-using-encryption.html")
WRITE_SNAPSHOTS = "https://docs.aws.amazon.com/ebs/latest/userguide/writesnapshots.html"
LIST_CHANGED_BLOCKS = ("https://docs.aws.amazon.com/ebs/latest/APIReference/"
                       "API_ListChangedBlocks.html")
READ_SNAPSHOTS = "https://docs.aws.amazon.com/ebs/latest/userguide/readsnapshots.html"
EBS_FAQ = "https://docs.aws.amazon.com/ebs/latest/userguide/ebsapi-faq.html"
PENDING = "The snapshot is pending: the EBS direct APIs read completed snapshots only"
LIST_SNAPSHOT_BLOCKS = ("https://docs.aws.amazon.com/ebs/latest/APIReference/"
                        "API_ListSnapshotBlocks.html")
MAX_RESULTS = (100, 10000)

Blocks = dict[int, str]  # block index -> block token


def lineage(snapshot_id: str, parents: dict[str, str]) -> list[str]:
    """The snapshot, its parent, the parent's parent...: where its blocks come from."""
    chain = [snapshot_id]
    while chain[-1] in parents and parents[chain[-1]] not in chain:
        chain.append(parents[chain[-1]])
    return chain


def effective_blocks(snapshot_id: str, parents: dict[str, str],
                     own_blocks: Callable[[str], Blocks]) -> dict[int, tuple[str, str]]:
    """index -> (token, the snapshot holding it): the snapshot's own blocks, and where it
    wrote none, the nearest ancestor's (WRITE_SNAPSHOTS: incremental snapshots)."""
    held: dict[int, tuple[str, str]] = {}
    for member in lineage(snapshot_id, parents):
        for index, token in own_blocks(member).items():
            held.setdefault(index, (token, member))
    return held


def holder(snapshot_id: str, index: int, parents: dict[str, str],
           written: dict[str, set[int]]) -> str | None:
    """Which snapshot of the lineage holds block ``index`` (None: none wrote it)."""
    for member in lineage(snapshot_id, parents):
        if index in written.get(member, set()):
            return member
    return None


def changed_blocks(first: dict[int, tuple[str, str]], second: dict[int, tuple[str, str]]
                   ) -> list[dict[str, object]]:
    """ListChangedBlocks' entries: every index whose block differs (a different block
    token: written again in one of them), FirstBlockToken "absent if the first snapshot does
    not have the changed block that is on the second snapshot", and the other way round
    (LIST_CHANGED_BLOCKS)."""
    entries = []
    for index in sorted(set(first) | set(second)):
        one, two = first.get(index), second.get(index)
        if one is not None and two is not None and one[0] == two[0]:
            continue
        entry: dict[str, object] = {"BlockIndex": index}
        if one is not None:
            entry["FirstBlockToken"] = one[0]
        if two is not None:
            entry["SecondBlockToken"] = two[0]
        entries.append(entry)
    return entries


def page(entries: Iterable[dict[str, object]], query: dict[str, list[str]]
         ) -> tuple[list[dict[str, object]], str | None] | str:
    """One page of a listing sorted by BlockIndex: from startingBlockIndex or the pageToken,
    at most maxResults (100 to 10000; LIST_SNAPSHOT_BLOCKS), and the next page's token.
    A string is the ValidationException's message."""
    try:
        size = int((query.get("maxResults") or ["10000"])[0])
        start = int((query.get("startingBlockIndex") or ["0"])[0])
        token = (query.get("pageToken") or [None])[0]
        if token is not None:
            start = int(base64.b64decode(token, validate=True).decode())
    except ValueError:
        return "maxResults, startingBlockIndex and pageToken must be valid"
    if not MAX_RESULTS[0] <= size <= MAX_RESULTS[1]:
        return f"maxResults must be between {MAX_RESULTS[0]} and {MAX_RESULTS[1]}"
    chosen = [e for e in entries if int(str(e["BlockIndex"])) >= start]
    more = chosen[size:]
    next_token = base64.b64encode(str(more[0]["BlockIndex"]).encode()).decode() if more \
        else None
    return chosen[:size], next_token


def parent_problem(body: dict[str, object], parent_encrypted: bool,
                   encrypted_by_default: bool) -> str | None:
    """StartSnapshot with a ParentSnapshotId: "You can't specify ParentSnapshotId and
    Encrypted in the same request" (START_SNAPSHOT); an unencrypted parent cannot be used
    under encryption by default, nor with a KmsKeyArn; an encrypted parent's child "is
    encrypted using the same KMS key as the parent snapshot", and naming a key fails
    (ENCRYPTION_OUTCOMES)."""
    if "Encrypted" in body:
        return "You can't specify ParentSnapshotId and Encrypted in the same request"
    if not parent_encrypted and encrypted_by_default:
        return ("encryption by default is enabled: an unencrypted parent snapshot cannot be "
                "used (copy it encrypted first)")
    if "KmsKeyArn" in body:
        return "KmsKeyArn cannot be specified with this ParentSnapshotId"
    return None


def listing_problem(kind: str, second: str, first: str | None, parents: dict[str, str],
                    pending: list[str]) -> str | None:
    """What AWS refuses of a listing: a pending snapshot (EBS_FAQ); for ListChangedBlocks,
    a SecondSnapshotId without a FirstSnapshotId ("must be specified with a FirstSnapshotID
    parameter; otherwise, an error occurs") or two snapshots of different lineages
    (LIST_CHANGED_BLOCKS)."""
    if pending:
        return PENDING
    if kind != "changedblocks":
        return None
    if first is None:
        return "SecondSnapshotId must be specified with a FirstSnapshotId"
    roots = {lineage(s, parents)[-1] for s in (first, second)}
    if len(roots) != 1:
        return f"{first} and {second} are not snapshots of the same lineage"
    return None
