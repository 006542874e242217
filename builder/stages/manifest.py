"""Stage 6: build-manifest.json: what went in (recipe, packages), what came out (artifacts,
partitions), how long each stage took, and which amiforge made it."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from builder import __version__
from builder.ami import placeholder_image
from builder.host import treepath
from builder.host.fsutil import allocated_bytes, atomic_write_json
from builder.plan import Plan, sha256_file
from builder.stages.convert import image_info
from builder.stages.disk import partitions_report


def installed_packages(tree: Path) -> list[dict[str, str]]:
    """The installed packages, from dpkg's status file read inside the tree (a host tool
    given the tree's path would follow a script's ``var/lib/dpkg -> /proc/self/root/...``
    link to the host's own database)."""
    packages = []
    for paragraph in treepath.read_text(tree, "/var/lib/dpkg/status").split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", paragraph, re.M))
        if fields.get("Status") == "install ok installed" and "Package" in fields:
            packages.append({"name": fields["Package"], "version": fields.get("Version", ""),
                             "architecture": fields.get("Architecture", "")})
    return sorted(packages, key=lambda p: p["name"])


def artifact_entry(path: Path, fmt: str, final_name: str) -> dict[str, Any]:
    info = image_info(path)
    return {"path": final_name, "format": fmt, "virtual_size": info["virtual-size"],
            "file_size": path.stat().st_size, "allocated_size": allocated_bytes(path),
            "sha256": sha256_file(path)}


def recipe_inputs(sources: tuple[Path, ...], plan: Plan, recipe_dir: Path
                  ) -> list[dict[str, str]]:
    """Every file the recipe pulled in (extended recipes, apps, templates, files) with its
    sha256: what a reviewer needs to know exactly what went into the image."""
    files = [*sources, *(recipe_dir / f.src for f in plan.files if f.src),
             *(recipe_dir / f.src for v in plan.data_volumes for f in v.files if f.src)]
    unique = dict.fromkeys(path.resolve() for path in files)
    return [{"path": os.path.relpath(path, recipe_dir), "sha256": sha256_file(path)}
            for path in unique]


def build_manifest(plan: Plan, recipe_path: Path, artifacts: list[dict[str, Any]],
                   packages: list[dict[str, str]], timings: dict[str, float],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "amiforge_version": __version__,
        "name": plan.name,
        "recipe": {"path": str(recipe_path), "sha256": sha256_file(recipe_path)},
        "source_date_epoch": plan.source_date_epoch,
        "boot": plan.boot,
        "disk_size": plan.disk_size,
        "artifacts": artifacts,
        "partitions": partitions_report(plan),
        "packages": packages,
        "timings": timings,
        **(extra or {}),
    }


def ami_manifests(plan: Plan, ws: Path, artifacts: list[dict[str, Any]]) -> list[Path]:
    """register-image.json, snapshots.json (EBS) and launch-permission.json, in ``ws``."""
    written = [ws / "register-image.json"]
    atomic_write_json(written[0], plan.register_image)
    if plan.backing == "ebs":
        raw = {a["path"]: a for a in artifacts if a["format"] == "raw"}
        snapshots = []
        for mapping in plan.register_image.get("BlockDeviceMappings", []):
            snapshot = mapping.get("Ebs", {}).get("SnapshotId", "")
            image = placeholder_image(snapshot)
            if image in raw:
                snapshots.append({"device": mapping["DeviceName"], "placeholder": snapshot,
                                  "image": image, "size": raw[image]["virtual_size"],
                                  "sha256": raw[image]["sha256"],
                                  "volume_size_gib": mapping["Ebs"]["VolumeSize"]})
        written.append(ws / "snapshots.json")
        atomic_write_json(written[-1], {"snapshots": snapshots})
    if plan.launch_permission is not None:
        written.append(ws / "launch-permission.json")
        atomic_write_json(written[-1], plan.launch_permission)
    return written
