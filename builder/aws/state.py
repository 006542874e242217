"""publish.json: what a publish made, per target (account, region and endpoint), so that a
re-run resumes where it stopped and a publish of the same output to another account or
region starts its own record instead of reporting the first one's AMI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from builder.errors import InputError
from builder.host.fsutil import atomic_write_json

STATE = "publish.json"


def target_of(account: str, region: str, endpoint: str | None) -> str:
    return f"{account}/{region}" + (f"@{endpoint}" if endpoint else "")


def token(*parts: str) -> str:
    """An idempotency token (ClientToken) made from what identifies the request."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:64]


def load(output_dir: Path, target: str) -> dict[str, Any]:
    """This target's record (empty when there is none). A publish.json of an older
    amiforge (one flat record, no account) belongs to no target: it is started over."""
    data = _read(output_dir / STATE)
    record = data.get("targets", {}).get(target, {})
    return record if isinstance(record, dict) else {}


def save(output_dir: Path, target: str, record: dict[str, Any]) -> None:
    data = _read(output_dir / STATE)
    targets = data.get("targets") if isinstance(data.get("targets"), dict) else {}
    atomic_write_json(output_dir / STATE, {"targets": {**targets, target: record}})


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
