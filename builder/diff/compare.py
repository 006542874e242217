"""The differences between two releases, as data: pure functions of what each side holds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from debian.debian_support import Version

from builder.diff.guest import FileEntry
from builder.diff.release import Release

FILE_FIELDS = ("kind", "mode", "uid", "gid", "size", "sha256", "target")


@dataclass
class Difference:
    a: str
    b: str
    ami: list[dict[str, Any]] = field(default_factory=list)            # field, a, b
    block_devices: list[dict[str, Any]] = field(default_factory=list)  # device, a, b
    launch_permissions: dict[str, Any] | None = None                   # a, b
    sizes: list[dict[str, Any]] = field(default_factory=list)          # field, a, b
    kernel: dict[str, list[str]] | None = None                         # a, b
    packages: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    files: dict[str, list[dict[str, Any]]] | None = None  # None: not compared

    @property
    def equal(self) -> bool:
        return not (self.ami or self.block_devices or self.launch_permissions or self.sizes
                    or self.kernel or any(self.packages.values())
                    or any((self.files or {}).values()))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "equal": self.equal}


def compare(a: Release, b: Release) -> Difference:
    found = Difference(a.name or a.label, b.name or b.label)
    if a.request is not None and b.request is not None:
        found.ami = _fields(_attributes(a.request), _attributes(b.request))
        found.block_devices = _mappings(a.request, b.request)
    if a.launch != b.launch and (a.manifest and b.manifest):
        found.launch_permissions = {"a": a.launch, "b": b.launch}
    sizes = a.sizes(), b.sizes()  # what both sides know
    found.sizes = _fields(*({k: v for k, v in side.items() if k in sizes[0] and k in sizes[1]}
                            for side in sizes))
    if a.kernels != b.kernels:
        found.kernel = {"a": a.kernels, "b": b.kernels}
    found.packages = compare_packages(a.packages, b.packages)
    if a.files is not None and b.files is not None:
        found.files = compare_files(a.files, b.files)
    return found


def _attributes(request: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in request.items() if k != "BlockDeviceMappings"}


def _fields(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"field": k, "a": a.get(k), "b": b.get(k)} for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def _mappings(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    def by_device(request: dict[str, Any]) -> dict[str, Any]:
        return {m.get("DeviceName"): m for m in request.get("BlockDeviceMappings", [])}

    one, two = by_device(a), by_device(b)
    return [{"device": d, "a": one.get(d), "b": two.get(d)}
            for d in sorted(set(one) | set(two), key=str) if one.get(d) != two.get(d)]


def compare_packages(a: dict[str, dict[str, str]], b: dict[str, dict[str, str]]
                     ) -> dict[str, list[dict[str, str]]]:
    """Added, removed, upgraded and downgraded packages (Debian version order)."""
    result: dict[str, list[dict[str, str]]] = {"added": [], "removed": [], "upgraded": [],
                                               "downgraded": []}
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key), b.get(key)
        if old is None and new is not None:
            result["added"].append(new)
        elif new is None and old is not None:
            result["removed"].append(old)
        elif old is not None and new is not None and old["version"] != new["version"]:
            change = {"name": new["name"], "architecture": new["architecture"],
                      "a": old["version"], "b": new["version"]}
            newer = _version(new["version"]) > _version(old["version"])
            result["upgraded" if newer else "downgraded"].append(change)
    return result


def _version(text: str) -> Version | str:
    try:
        return Version(text)
    except ValueError:
        return text


def compare_files(a: dict[str, FileEntry], b: dict[str, FileEntry]
                  ) -> dict[str, list[dict[str, Any]]]:
    """Paths added, removed, and changed (which of kind, mode, owner, size, content, link
    target; a directory's size is the filesystem's business, not a change)."""
    result: dict[str, list[dict[str, Any]]] = {"added": [], "removed": [], "changed": []}
    for path in sorted(set(a) | set(b)):
        old, new = a.get(path), b.get(path)
        if old is None and new is not None:
            result["added"].append({"path": path, **new.to_dict()})
        elif new is None and old is not None:
            result["removed"].append({"path": path, **old.to_dict()})
        elif old is not None and new is not None and old != new:
            one, two = old.to_dict(), new.to_dict()
            changed = {k: [one[k], two[k]] for k in FILE_FIELDS if one[k] != two[k]
                       and not (k == "size" and old.kind == new.kind == "dir")}
            if changed:
                result["changed"].append({"path": path, "changes": changed})
    return result
