"""build-manifest.json: what went in (recipe, packages), what came out (artifacts,
partitions), how long each stage took, and which amiforge made it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from builder import __version__
from builder.host.fsutil import allocated_bytes, atomic_write_json
from builder.host.gitrev import checked_out_commit
from builder.outputs.ami import (
    distribution_input,
    launch_permission_input,
    register_image_input,
    snapshots_input,
)
from builder.outputs.sbom import status_paragraphs
from builder.plan import Plan, sha256_file
from builder.recipe.load import build_id
from builder.stages.convert import image_info
from builder.stages.disk import partitions_report


def installed_packages(tree: Path) -> list[dict[str, str]]:
    """The installed packages (dpkg's status file, read inside the tree)."""
    return sorted(package_entries(status_paragraphs(tree)), key=lambda p: p["name"])


def package_entries(paragraphs: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """build-manifest.json's entry (name, version, architecture) of each status paragraph."""
    return [{"name": fields["Package"], "version": fields.get("Version", ""),
             "architecture": fields.get("Architecture", "")} for fields in paragraphs]


def artifact_entry(path: Path, fmt: str, final_name: str) -> dict[str, Any]:
    info = image_info(path)
    return {"path": final_name, "format": fmt, "virtual_size": info["virtual-size"],
            "file_size": path.stat().st_size, "allocated_size": allocated_bytes(path),
            "sha256": sha256_file(path)}


def build_manifest(plan: Plan, artifacts: list[dict[str, Any]],
                   packages: list[dict[str, str]], timings: dict[str, float],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    recipe = plan.sources[0]
    return {
        "amiforge_version": __version__,
        "name": plan.name,
        "recipe": {"path": recipe.path, "sha256": recipe.sha256,
                   "git_commit": checked_out_commit(Path(recipe.path))},
        "build_id": build_id(plan.source_date_epoch),
        # every file the recipe pulled in (extended recipes, apps, templates, files): what a
        # reviewer needs to know exactly what went into the image
        "inputs": [{"path": s.name, "sha256": s.sha256} for s in plan.sources],
        "source_date_epoch": plan.source_date_epoch,
        "boot": plan.boot,
        "disk_size": plan.disk_size,
        "artifacts": artifacts,
        "partitions": partitions_report(plan),
        "packages": packages,
        "timings": timings,
        **(extra or {}),
    }


# Every file ami_manifests may write: one an earlier build wrote and this one does not
# (a recipe that stopped sharing its AMI) must go, or publish would act on it.
AMI_MANIFESTS = ("register-image.json", "snapshots.json", "launch-permission.json",
                 "distribution.json")


def remove_stale_manifests(output_dir: Path, written: list[Path]) -> None:
    """What an earlier build wrote and this one does not (another recipe's manifests, an
    SBOM format no longer asked for) must not stay next to this build's images."""
    optional = (*AMI_MANIFESTS, "sbom.spdx.json", "sbom.cdx.json")
    for name in set(optional) - {path.name for path in written}:
        (output_dir / name).unlink(missing_ok=True)


def ami_manifests(plan: Plan, ws: Path, artifacts: list[dict[str, Any]]) -> list[Path]:
    """register-image.json, snapshots.json (EBS), launch-permission.json and
    distribution.json (when the recipe asks for them), in ``ws``."""
    written = [ws / "register-image.json"]
    atomic_write_json(written[0], register_image_input(plan.ami, plan.arch))
    if not plan.ami.instance_store:
        raw = {a["path"]: a for a in artifacts if a["format"] == "raw"}
        written.append(ws / "snapshots.json")
        atomic_write_json(written[-1], snapshots_input(plan.ami, raw))
    optional = {"launch-permission.json": launch_permission_input(plan.ami),
                "distribution.json": distribution_input(plan.ami)}
    for name, content in optional.items():
        if content is not None:
            written.append(ws / name)
            atomic_write_json(written[-1], content)
    return written
