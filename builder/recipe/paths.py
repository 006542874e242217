"""File references in a recipe (``src``, ``template``, app ``include``, bundle keys):
resolved relative to the file that names them, refused outside the recipe's folder
unless ``--allow-host-paths``, and only regular files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from builder.errors import Location, Problem
from builder.recipe.yamlsource import LocDict, LocList, display_path, dotted, shown

# --- paths -------------------------------------------------------------------------------

def _file_entries(data: Any, prefix: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], Any]]:
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list):
        return []
    return [((*prefix, "files", i), entry) for i, entry in enumerate(files)
            if isinstance(entry, dict)]


def _path_fields(data: Any) -> list[tuple[tuple[Any, ...], Any, str]]:
    """(path to the mapping, the mapping, key) for every recipe value that names a file."""
    out = []
    root_volume = data.get("root_volume") if isinstance(data, dict) else None
    entries = _file_entries(root_volume, ("root_volume",)) + _file_entries(data, ())
    mappings = data.get("block_device_mappings") if isinstance(data, dict) else None
    for i, bdm in enumerate(mappings if isinstance(mappings, list) else []):
        ebs = bdm.get("ebs") if isinstance(bdm, dict) else None
        content = ebs.get("content") if isinstance(ebs, dict) else None
        entries += _file_entries(content, ("block_device_mappings", i, "ebs", "content"))
    for where, entry in entries:
        out += [(where, entry, key) for key in ("src", "template")]
    apps = data.get("apps") if isinstance(data, dict) else None
    for i, app in enumerate(apps if isinstance(apps, list) else []):
        if isinstance(app, dict):
            out.append((("apps", i), app, "include"))
    ami = data.get("ami") if isinstance(data.get("ami"), dict) else {}
    bundle = ami.get("bundle")
    if isinstance(bundle, dict):
        out += [(("ami", "bundle"), bundle, key) for key in ("user_cert", "user_key", "ec2_cert")]
    return out + _certificate_fields(ami)


def _certificate_fields(ami: dict[str, Any]) -> list[tuple[tuple[Any, ...], Any, Any]]:
    """ami.uefi_data.certificates: pk names a file, kek, db and dbx lists of them."""
    uefi = ami.get("uefi_data")
    files = uefi.get("certificates") if isinstance(uefi, dict) else None
    if not isinstance(files, dict):
        return []
    where = ("ami", "uefi_data", "certificates")
    out: list[tuple[tuple[Any, ...], Any, Any]] = [(where, files, "pk")]
    for key in ("kek", "db", "dbx"):
        if isinstance(files.get(key), list):
            out += [((*where, key), files[key], i) for i in range(len(files[key]))]
    return out


def check_paths(data: Any, base_dir: Path, allow_host: bool, problems: list[Problem]) -> None:
    """Rewrite file references relative to ``base_dir`` and refuse escapes from it.

    A reference is relative to the file that declares it (known from its location), so a
    base recipe or an app in another folder works; the result is relative to the top
    recipe's folder, which keeps plans free of machine-specific absolute paths.
    """
    for where, mapping, key in _path_fields(data):
        value = mapping.get(key) if isinstance(mapping, dict) else mapping[key]
        if not isinstance(value, str):
            continue
        mark = _mark(mapping, key)
        declared_in = Path(mark.file).resolve().parent if mark else base_dir
        target = (declared_in / value).resolve()
        refused = outside(value, target, base_dir, allow_host)
        if refused:
            problems.append(Problem(mark or Location("<recipe>"), dotted((*where, key)),
                                    refused))
            continue
        if not target.is_file():
            what = "not a regular file" if target.exists() else "not found"
            problems.append(Problem(mark or Location("<recipe>"), dotted((*where, key)),
                                    f"{shown(value)} {what} (looked for "
                                    f"{display_path(target)})"))
            continue
        inside = target == base_dir or base_dir in target.parents
        mapping[key] = str(target) if not inside else os.path.relpath(target, base_dir)


def _mark(container: Any, key: Any) -> Location | None:
    """Where a mapping's value or a list's item was written."""
    if isinstance(container, LocDict):
        return container.value_marks.get(key)
    if isinstance(container, LocList) and key < len(container.item_marks):
        return container.item_marks[key]
    return None


def outside(value: str, target: Path, base_dir: Path, allow_host: bool) -> str | None:
    """Why a referenced file may not be used (outside the recipe's folder), or None."""
    inside = base_dir in target.resolve().parents
    if allow_host or (inside and not Path(value).is_absolute()):
        return None
    kind = "an absolute host path" if Path(value).is_absolute() else \
        "a path outside the recipe's folder"
    return f"{shown(value)} is {kind} (pass --allow-host-paths to allow)"
