"""publish --sweep: snapshots an interrupted publish left behind. StartSnapshot's Timeout
(60 minutes: builder.aws.snapshots) has EBS cancel a snapshot nobody completes, which then
stays in the "error" state; one still "pending" past that is abandoned too. Only snapshots
publish made are touched: those carrying its amiforge:recipe-sha256 tag, owned by this
account. A publish resumed within the hour refills its pending snapshot instead."""

from __future__ import annotations

import datetime as dt
from typing import Any

from builder.aws.session import Aws
from builder.aws.snapshots import START_TIMEOUT_MINUTES

MARK = "amiforge:recipe-sha256"


def abandoned_snapshots(ec2: Any, now: dt.datetime) -> list[dict[str, Any]]:
    cutoff = now - dt.timedelta(minutes=START_TIMEOUT_MINUTES + 15)
    found = []
    for page in ec2.get_paginator("describe_snapshots").paginate(
            OwnerIds=["self"], Filters=[{"Name": "tag-key", "Values": [MARK]},
                                        {"Name": "status", "Values": ["pending", "error"]}]):
        for snapshot in page["Snapshots"]:
            started = snapshot.get("StartTime")
            if snapshot["State"] == "error" or (started and started < cutoff):
                found.append(snapshot)
    return found


def sweep(aws: Aws, now: dt.datetime | None = None) -> list[str]:
    """Delete the abandoned snapshots (print them with --dry-run); returns their ids."""
    ec2 = aws.client("ec2")
    found = abandoned_snapshots(ec2, now or dt.datetime.now(dt.UTC))
    for snapshot in found:
        if aws.dry_run:
            aws.would("ec2.DeleteSnapshot", SnapshotId=snapshot["SnapshotId"])
        else:
            ec2.delete_snapshot(SnapshotId=snapshot["SnapshotId"])
    return [s["SnapshotId"] for s in found]
