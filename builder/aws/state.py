"""publish.json: what a publish made, per target (account, region and endpoint), so that a
re-run resumes where it stopped and a publish of the same output to another account or
region starts its own record instead of reporting the first one's AMI."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

from builder.errors import InputError
from builder.host.fsutil import atomic_write_json

STATE = "publish.json"


def target_of(account: str, region: str, endpoint: str | None) -> str:
    return f"{account}/{region}" + (f"@{endpoint}" if endpoint else "")


def load(output_dir: Path, target: str) -> dict[str, Any]:
    """This target's record (empty when there is none). A publish.json of an older
    amiforge (one flat record, no account) belongs to no target: it is kept in the file
    under "legacy" and this target starts over."""
    record = _targets(_read(output_dir / STATE)).get(target, {})
    return record if isinstance(record, dict) else {}


def all_targets(output_dir: Path) -> dict[str, Any]:
    """Every target's record (target -> record)."""
    return {k: v for k, v in _targets(_read(output_dir / STATE)).items() if isinstance(v, dict)}


def save(output_dir: Path, target: str, record: dict[str, Any]) -> None:
    """Write this target's record, keeping the others; publishes of one output directory
    to two regions at once take turns (a lock beside the file)."""
    with open(output_dir / f".{STATE}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _read(output_dir / STATE)
        legacy = {"legacy": data} if data and "targets" not in data else \
            {k: v for k, v in data.items() if k == "legacy"}
        atomic_write_json(output_dir / STATE,
                          {**legacy, "targets": {**_targets(data), target: record}})


def _targets(data: dict[str, Any]) -> dict[str, Any]:
    targets = data.get("targets")
    return targets if isinstance(targets, dict) else {}


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
