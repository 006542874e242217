"""A Difference as people read it: a plain-text report for the terminal, or Markdown for
release notes. (JSON is Difference.to_dict.)"""

from __future__ import annotations

import json
import re
from typing import Any

from builder.diff.compare import Difference
from builder.printable import printable

SHOWN = 100  # files listed per kind; --json lists them all


def _value(value: Any, width: int = 70) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[:width - 1] + "…"


def _size(value: Any) -> str:
    if not isinstance(value, int):
        return str(value)
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


Section = tuple[str, list[str], list[list[str]]]  # title, column names, rows


def sections(diff: Difference) -> list[Section]:
    """Every part that differs; each row's cells are plain text."""
    parts: list[Section] = []
    if diff.ami:
        parts.append(("AMI attributes", ["attribute", "A", "B"],
                      [[r["field"], _value(r["a"]), _value(r["b"])] for r in diff.ami]))
    if diff.block_devices:
        parts.append(("Block device mappings", ["device", "field", "A", "B"],
                      [row for r in diff.block_devices for row in _mapping_rows(r)]))
    if diff.launch_permissions:
        parts.append(("Launch permissions", ["A", "B"],
                      [[_value(diff.launch_permissions["a"]),
                        _value(diff.launch_permissions["b"])]]))
    if diff.sizes:
        parts.append(("Image size", ["", "A", "B"],
                      [[r["field"], _size(r["a"]), _size(r["b"])] for r in diff.sizes]))
    if diff.kernel:
        parts.append(("Kernel", ["A", "B"], [[", ".join(diff.kernel["a"]) or "(none)",
                                             ", ".join(diff.kernel["b"]) or "(none)"]]))
    packages = diff.packages
    rows = [["+", p["name"], p["version"], p["architecture"]] for p in packages["added"]]
    rows += [["-", p["name"], p["version"], p["architecture"]] for p in packages["removed"]]
    rows += [[mark, p["name"], f"{p['a']} -> {p['b']}", p["architecture"]]
             for mark, kind in (("^", "upgraded"), ("v", "downgraded"))
             for p in packages[kind]]
    if rows:
        counts = ", ".join(f"{len(packages[k])} {k}" for k in packages if packages[k])
        parts.append((f"Packages ({counts})", ["", "package", "version", "architecture"],
                      rows))
    if diff.files and any(diff.files.values()):
        parts.append(_files(diff.files))
    return parts


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, inner in value.items()
            for k, v in _flat(inner, f"{prefix}.{key}" if prefix else key).items()}


def _mapping_rows(change: dict[str, Any]) -> list[list[str]]:
    """A mapping added or removed whole; a changed one field by field."""
    device, a, b = change["device"], change["a"], change["b"]
    if a is None or b is None:
        return [[device, "", _value(a) if a else "(none)", _value(b) if b else "(none)"]]
    one, two = _flat(a), _flat(b)
    return [[device, key, _value(one.get(key, "(none)")), _value(two.get(key, "(none)"))]
            for key in sorted(set(one) | set(two)) if one.get(key) != two.get(key)]


def _files(files: dict[str, list[dict[str, Any]]]) -> Section:
    counts = ", ".join(f"{len(files[k])} {k}" for k in files if files[k])
    rows: list[list[str]] = []
    for mark, kind in (("+", "added"), ("-", "removed"), ("~", "changed")):
        listed = files[kind]
        for entry in listed[:SHOWN]:
            if kind == "changed":
                what = "; ".join(f"{k} {_short(k, a)} -> {_short(k, b)}"
                                 for k, (a, b) in entry["changes"].items())
            else:
                what = f"{entry['kind']} {entry['mode']} {_size(entry['size'])}"
            rows.append([mark, entry["path"], what])
        if len(listed) > SHOWN:
            rows.append([mark, f"... and {len(listed) - SHOWN} more", "(--json lists all)"])
    return f"Files of the root filesystem ({counts})", ["", "path", "what"], rows


def _short(key: str, value: Any) -> str:
    """A changed field's value: a digest's start, a size in bytes (a change of a few bytes
    would not show in MiB)."""
    if key == "sha256" and isinstance(value, str):
        return value[:12]
    return f"{value:,}" if key == "size" and isinstance(value, int) else str(value)


def text(diff: Difference) -> str:
    lines = [printable(f"{diff.a} -> {diff.b}: ") +
             ("no difference" if diff.equal else "different")]
    for title, _, rows in sections(diff):
        rows = [[printable(cell) for cell in row] for row in rows]
        lines += ["", title]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                  for r in rows]
    return "\n".join(lines)


def markdown(diff: Difference) -> str:
    lines = [f"## {_cell(diff.a)} → {_cell(diff.b)}", ""]
    if diff.equal:
        return "\n".join([*lines, "No difference."])
    for title, columns, rows in sections(diff):
        lines += [f"### {title}", "", "| " + " | ".join(columns) + " |",
                  "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _cell(value: str) -> str:
    """Text in a Markdown table cell: no control character, pipe, HTML, link, emphasis or
    code reaches the notes as such (file names and values come from the image)."""
    value = printable(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\|`*_~\[\]()!#])", r"\\\1", value)
