"""The build pipeline, top to bottom: recipe -> plan -> tree -> filesystems -> disk ->
conversions -> AMI manifests -> build manifest. Each step is a function of the plan and the
previous step's output; this module only puts them in order."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.bundle import BundleKeys, bundle_image
from builder.fsutil import atomic_write_json
from builder.plan import Plan
from builder.progress import Progress
from builder.recipe.load import LoadedRecipe
from builder.stages import bootloader, filesystem
from builder.stages.bootstrap import bootstrap
from builder.stages.configure import configure
from builder.stages.convert import EXTENSIONS, convert
from builder.stages.disk import assemble_disk
from builder.stages.manifest import (
    ami_manifests,
    artifact_entry,
    build_manifest,
    installed_packages,
)
from builder.stages.volumes import make_volume
from builder.templates import render_template
from builder.tools import check_tools
from builder.workspace import output_directory, publish, workspace


@dataclass(frozen=True)
class BuildOptions:
    output_dir: Path
    cache_dir: Path | None = None
    formats: tuple[str, ...] | None = None
    bundle_keys: BundleKeys | None = None


@dataclass
class BuildResult:
    output_dir: Path
    manifest: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "amiforge"


def build_image(loaded: LoadedRecipe, plan: Plan, options: BuildOptions,
                progress: Progress) -> BuildResult:
    check_tools(plan, {v.filesystem for v in plan.data_volumes})
    formats = options.formats or plan.formats
    if "raw" not in formats:  # the raw image is what becomes a snapshot or a bundle
        formats = ("raw", *formats)
    apt_cache = options.cache_dir / "apt-archives" if options.cache_dir else None
    with output_directory(options.output_dir) as out, workspace(out) as ws:
        tree, disk = ws / "tree", ws / "disk.raw"
        with progress.stage("bootstrap", f"{len(plan.os.packages)} packages"):
            bootstrap(plan.os, tree, apt_cache)
        with progress.stage("configure"):
            configure(plan, tree, loaded.base_dir)
            packages = installed_packages(tree)
        with progress.stage("filesystem"):
            root_img, esp_img = make_filesystems(plan, tree, ws)
            volumes = make_volumes(plan, ws, loaded.base_dir, tree)
        with progress.stage("disk"):
            assemble_disk(plan, disk, {"root": root_img, "esp": esp_img}, make_bios_core(plan, ws))
        with progress.stage("convert", ", ".join(f for f in formats if f != "raw") or "none"):
            outputs = convert_all(plan, [disk, *volumes], ws, formats)
        if plan.backing == "instance-store":
            with progress.stage("bundle"):
                bundle_files = make_bundle(plan, disk, ws, options.bundle_keys)
        else:
            bundle_files = {}
        artifacts = [artifact_entry(path, fmt, name) for path, (fmt, name) in outputs.items()]
        written = ami_manifests(plan, ws, artifacts)
        manifest = build_manifest(plan, loaded.path, artifacts, packages, progress.timings)
        atomic_write_json(ws / "build-manifest.json", manifest)
        publish({**{path: name for path, (_, name) in outputs.items()}, **bundle_files,
                 **{path: path.name for path in written},
                 ws / "build-manifest.json": "build-manifest.json"}, out)
    return BuildResult(output_dir=options.output_dir, manifest=manifest,
                       timings=progress.timings)


def early_config(plan: Plan, ws: Path) -> Path:
    path = ws / "grub-early.cfg"
    if not path.exists():
        path.write_text(render_template("grub-early.cfg.j2", plan=plan))
    return path


def make_filesystems(plan: Plan, tree: Path, ws: Path) -> tuple[Path, Path]:
    root, root_img, esp_img = plan.root, ws / "root.img", ws / "esp.img"
    filesystem.make_ext4(root_img, root.size, tree, str(root.fs_uuid), plan.root_label,
                         plan.source_date_epoch)
    esp = plan.partition("esp")
    if esp is not None:
        efi = ws / "grub.efi"
        bootloader.build_efi_image(plan.arch, efi, early_config(plan, ws))
        _, removable = bootloader.EFI_REMOVABLE[plan.arch]
        filesystem.make_esp(esp_img, esp.size, str(esp.fs_uuid), {f"/{removable}": efi})
    return root_img, esp_img


def make_volumes(plan: Plan, ws: Path, recipe_dir: Path, tree: Path) -> list[Path]:
    images = []
    for volume in plan.data_volumes:
        image = ws / volume.image
        make_volume(volume, image, ws, recipe_dir, tree, plan.source_date_epoch)
        images.append(image)
    return images


def make_bios_core(plan: Plan, ws: Path) -> Path | None:
    if plan.partition("bios-boot") is None:
        return None
    core = ws / "core.img"
    bootloader.build_bios_core(core, early_config(plan, ws))
    return core


def make_bundle(plan: Plan, disk: Path, ws: Path, keys: BundleKeys | None) -> dict[Path, str]:
    from builder.errors import InputError

    if keys is None:
        raise InputError("instance-store backing needs --user-cert, --user-key, --ec2-cert and "
                         "--account-id (or ami.bundle in the recipe)")
    bundle_dir = ws / "bundle"
    bundle_image(disk, bundle_dir, keys, plan)
    return {bundle_dir: "bundle"}


def convert_all(plan: Plan, images: list[Path], ws: Path,
                formats: tuple[str, ...]) -> dict[Path, tuple[str, str]]:
    """Workspace path -> (format, final file name) for every image and requested format."""
    outputs: dict[Path, tuple[str, str]] = {}
    for image in images:
        for fmt in formats:
            name = f"{image.stem}.{EXTENSIONS[fmt]}"
            if fmt == "raw":
                outputs[image] = (fmt, name)
                continue
            target = ws / name
            convert(image, target, fmt, compress=plan.qcow2_compress)
            outputs[target] = (fmt, name)
    return outputs
