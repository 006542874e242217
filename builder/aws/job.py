"""What one publish works on: the build's output directory, the target (account, region,
endpoint), its record in publish.json and the RegisterImage request; and the small helpers
every publishing step shares."""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from builder.aws import state
from builder.aws.blockindex import BlockIndex
from builder.aws.distribute import Distribution
from builder.aws.session import Aws


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
    parents: dict[str, BlockIndex] = field(default_factory=dict)  # device -> its parent's

    def save(self) -> None:
        state.save(self.output_dir, self.target, self.record)

    @property
    def account(self) -> str:
        return self.target.split("/", 1)[0]

    @property
    def tags(self) -> dict[str, str]:
        return {t["Key"]: t["Value"] for spec in self.request.get("TagSpecifications", [])
                for t in spec["Tags"]}


def own_snapshot(job: Publication, snapshot_id: str) -> dict[str, Any] | None:
    """The snapshot as DescribeSnapshots shows it, if it is this account's; None if it is
    another's or cannot be seen."""
    try:
        [snapshot] = job.aws.client("ec2").describe_snapshots(
            SnapshotIds=[snapshot_id])["Snapshots"]
    except (ClientError, ValueError):
        return None
    return snapshot if snapshot.get("OwnerId") == job.account else None


def description(job: Publication, device: str) -> str:
    return f"{job.request['Name']} {device}"


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)
