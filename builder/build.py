"""The build pipeline, top to bottom: recipe -> plan -> tree -> filesystems -> disk ->
conversions -> manifest. Each step is a function of the plan and the previous step's
output; this module only puts them in order."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.fsutil import atomic_write_json
from builder.plan import Plan
from builder.progress import Progress
from builder.recipe.load import LoadedRecipe
from builder.stages import bootloader, filesystem
from builder.stages.bootstrap import bootstrap
from builder.stages.configure import configure
from builder.stages.convert import EXTENSIONS, convert
from builder.stages.disk import assemble_disk
from builder.stages.manifest import artifact_entry, build_manifest, installed_packages
from builder.templates import render_template
from builder.tools import check_tools
from builder.workspace import output_directory, publish, workspace


@dataclass(frozen=True)
class BuildOptions:
    output_dir: Path
    cache_dir: Path | None = None
    formats: tuple[str, ...] | None = None


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
    check_tools(plan)
    formats = options.formats or plan.formats
    apt_cache = options.cache_dir / "apt-archives" if options.cache_dir else None
    with output_directory(options.output_dir) as out, workspace(out) as ws:
        tree, disk = ws / "tree", ws / "disk.raw"
        root_img, esp_img = ws / "root.img", ws / "esp.img"
        with progress.stage("bootstrap", f"{len(plan.os.packages)} packages"):
            bootstrap(plan.os, tree, apt_cache)
        with progress.stage("configure"):
            configure(plan, tree, loaded.base_dir)
            packages = installed_packages(tree)
        with progress.stage("filesystem"):
            make_filesystems(plan, tree, root_img, esp_img, ws)
        with progress.stage("disk"):
            bios_core = make_bios_core(plan, ws)
            images = {"root": root_img, "esp": esp_img}
            assemble_disk(plan, disk, images, bios_core)
        with progress.stage("convert", ", ".join(f for f in formats if f != "raw") or "none"):
            outputs = convert_all(plan, disk, ws, formats)
        artifacts = [artifact_entry(path, fmt, name) for path, (fmt, name) in outputs.items()]
        manifest = build_manifest(plan, loaded.path, artifacts, packages, progress.timings)
        atomic_write_json(ws / "build-manifest.json", manifest)
        publish({**{path: name for path, (_, name) in outputs.items()},
                 ws / "build-manifest.json": "build-manifest.json"}, out)
    return BuildResult(output_dir=options.output_dir, manifest=manifest,
                       timings=progress.timings)


def early_config(plan: Plan, ws: Path) -> Path:
    path = ws / "grub-early.cfg"
    if not path.exists():
        path.write_text(render_template("grub-early.cfg.j2", plan=plan))
    return path


def make_filesystems(plan: Plan, tree: Path, root_img: Path, esp_img: Path, ws: Path) -> None:
    root = plan.root
    filesystem.make_ext4(root_img, root.size, tree, str(root.fs_uuid), plan.root_label,
                         plan.source_date_epoch)
    esp = plan.partition("esp")
    if esp is not None:
        efi = ws / "grub.efi"
        bootloader.build_efi_image(plan.arch, efi, early_config(plan, ws))
        _, removable = bootloader.EFI_REMOVABLE[plan.arch]
        filesystem.make_esp(esp_img, esp.size, str(esp.fs_uuid), {f"/{removable}": efi})


def make_bios_core(plan: Plan, ws: Path) -> Path | None:
    if plan.partition("bios-boot") is None:
        return None
    core = ws / "core.img"
    bootloader.build_bios_core(core, early_config(plan, ws))
    return core


def convert_all(plan: Plan, disk: Path, ws: Path,
                formats: tuple[str, ...]) -> dict[Path, tuple[str, str]]:
    """Workspace path -> (format, final file name) for every requested format."""
    outputs: dict[Path, tuple[str, str]] = {}
    for fmt in formats:
        name = f"disk.{EXTENSIONS[fmt]}"
        if fmt == "raw":
            outputs[disk] = (fmt, name)
            continue
        target = ws / name
        convert(disk, target, fmt, compress=plan.qcow2_compress)
        outputs[target] = (fmt, name)
    return outputs
