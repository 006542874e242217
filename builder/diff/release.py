"""One side of a diff: an output directory, its build-manifest.json, or an image file.
What the build recorded (packages, AMI request, sizes) is read from the output directory;
what only the image holds (its files; its packages when there is no manifest) through
libguestfs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.diff.guest import FileEntry
from builder.errors import InputError, ToolFailed
from builder.host.fsutil import read_json
from builder.host.run import qemu_img
from builder.outputs.manifest import package_entries
from builder.outputs.sbom import parse_status

KERNEL_PACKAGE = re.compile(r"linux-image-\d[\w.+-]*")


@dataclass
class Release:
    label: str                                  # as given on the command line
    image: Path
    image_format: str
    name: str | None = None                     # the AMI's
    manifest: dict[str, Any] | None = None      # build-manifest.json
    request: dict[str, Any] | None = None       # register-image.json
    launch: list[Any] | None = None             # launch-permission.json's grants
    packages: dict[str, dict[str, str]] = field(default_factory=dict)  # name:arch -> it
    files: dict[str, FileEntry] | None = None

    @property
    def kernels(self) -> list[str]:
        """The kernel packages installed (linux-image-VERSION-FLAVOUR), with versions."""
        return sorted(f"{p['name']} {p['version']}" for p in self.packages.values()
                      if KERNEL_PACKAGE.fullmatch(p["name"]))

    def sizes(self) -> dict[str, int]:
        """The disk's size, and as the build measured it, the data it holds (allocated in
        the sparse raw image: a copy of the file may allocate otherwise)."""
        from builder.vm import image_size

        raw = next((a for a in (self.manifest or {}).get("artifacts", [])
                    if a.get("format") == "raw"), None)
        if raw:
            return {"disk_size": int(raw["virtual_size"]),
                    "allocated": int(raw["allocated_size"])}
        return {"disk_size": image_size(self.image)}


def load_release(argument: Path) -> Release:
    """What ARGUMENT names: a directory (a build's outputs), a build-manifest.json in one,
    or an image file (raw or qcow2)."""
    if argument.is_dir():
        return _from_output(argument, argument)
    if argument.is_file() and argument.name.endswith(".json"):
        return _from_output(argument.parent, argument)
    if argument.is_file():
        return Release(str(argument), argument, checked_format(argument))
    raise InputError(f"{argument}: no such output directory, build-manifest.json or image")


def _from_output(folder: Path, argument: Path) -> Release:
    where = folder / "build-manifest.json"
    manifest = read_json(where)
    artifacts = manifest.get("artifacts") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("packages"), list) or \
            not isinstance(artifacts, list) or not all(isinstance(a, dict) for a in artifacts):
        raise InputError(f"{where}: not a build manifest")
    raw = next((a for a in artifacts if a.get("format") == "raw"), {})
    name = str(raw.get("path", ""))
    if not re.fullmatch(r"[\w.-]+\.raw", name) or not (folder / name).is_file():
        raise InputError(f"{folder}: its raw image ({name[:80] or 'none'}) is not there")
    if not all(isinstance(raw.get(k), int) for k in ("virtual_size", "allocated_size")):
        raise InputError(f"{where}: the raw image's sizes are not numbers")
    release = Release(str(argument), folder / name, checked_format(folder / name),
                      name=str(manifest.get("name")), manifest=manifest)
    release.packages = _packages(manifest["packages"], where)
    if (folder / "register-image.json").is_file():
        release.request = _request(folder / "register-image.json")
    if (folder / "launch-permission.json").is_file():
        grants = read_json(folder / "launch-permission.json")
        added = grants.get("LaunchPermission", {}) if isinstance(grants, dict) else None
        release.launch = added.get("Add") if isinstance(added, dict) else None
        if not isinstance(release.launch, list):
            raise InputError(f"{folder / 'launch-permission.json'}: not what a build writes")
    return release


def _request(path: Path) -> dict[str, Any]:
    """register-image.json: a mapping, its BlockDeviceMappings a list of mappings each
    with a DeviceName."""
    request = read_json(path)
    mappings = request.get("BlockDeviceMappings", []) if isinstance(request, dict) else None
    if not isinstance(mappings, list) or not all(
            isinstance(m, dict) and isinstance(m.get("DeviceName"), str) for m in mappings):
        raise InputError(f"{path}: not a RegisterImage input")
    return request


def packages_from_status(text: str) -> dict[str, dict[str, str]]:
    return _packages(package_entries(parse_status(text)), Path("/var/lib/dpkg/status"))


def _packages(listed: list[Any], where: Path) -> dict[str, dict[str, str]]:
    packages = {}
    for entry in listed:
        if not isinstance(entry, dict) or not all(
                isinstance(entry.get(k), str) for k in ("name", "version", "architecture")):
            raise InputError(f"{where}: a package entry is not name, version, architecture")
        packages[f"{entry['name']}:{entry['architecture']}"] = entry
    return packages


def checked_format(image: Path) -> str:
    """raw or qcow2, and nothing in it that names another file of this host, which the
    appliance would then read as the disk: no symlink, no backing file, no external data
    file. A file named *.raw is read as raw (never probed: a "raw" image holding a qcow2
    header would otherwise be taken for one)."""
    if image.is_symlink() or not image.is_file():
        raise InputError(f"{image}: not a regular file")
    forced = ["-f", "raw"] if image.name.endswith(".raw") else []
    try:
        info = json.loads(qemu_img("info", "--output=json", *forced, str(image)))
    except ToolFailed:
        raise InputError(f"{image}: not a disk image qemu-img reads") from None
    fmt = str(info.get("format"))
    if fmt not in ("raw", "qcow2"):
        raise InputError(f"{image}: a {fmt} image; build diff reads raw and qcow2")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise InputError(f"{image}: a qcow2 image with a backing file; convert it first")
    if "data-file" in json.dumps(info.get("format-specific", {})):
        raise InputError(f"{image}: a qcow2 image with an external data file; convert it "
                         "first")
    return fmt


def same_images(releases: list[Release]) -> bool:
    """Whether the two images are byte for byte the same (hashed here: a manifest's
    sha256 is only what it says)."""
    from builder.plan import sha256_file

    first, second = (r.image for r in releases)
    return first.stat().st_size == second.stat().st_size and \
        sha256_file(first) == sha256_file(second)


def read_images(releases: list[Release], files: bool = True) -> None:
    """Fill in what only the images hold: every release's files (``files``), and the
    packages of one given as a bare image. One appliance for all of them."""
    from builder.diff.guest import Roots

    wanted = [r for r in releases if files or r.manifest is None]
    if not wanted:
        return
    try:
        roots = Roots([(r.image, r.image_format) for r in wanted])
    except RuntimeError as exc:
        raise InputError(f"cannot read the images: {exc}") from None
    try:
        for number, release in enumerate(wanted):
            prefix = roots.mount(number)
            if release.manifest is None:
                status = roots.read_inside(prefix, "/var/lib/dpkg/status") or ""
                release.packages = packages_from_status(status)
            if files:
                release.files = roots.inventory(prefix)
    except (RuntimeError, UnicodeError) as exc:  # libguestfs's errors, a name not UTF-8
        raise InputError(f"cannot read {release.image}: {str(exc)[:200]}") from None
    finally:
        roots.close()
