"""Stage 3: the filesystem images made from the configured tree: root.img, esp.img (if
the plan has an ESP) and one whole-disk image per data volume."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

from builder import __version__
from builder.image import bootloader, filesystem
from builder.image.datavolume import make_volume
from builder.pipeline.runner import Context
from builder.plan import Plan, plain
from builder.tools import STAGE_FORMAT, tool_version


def inputs(plan: Plan, extras: dict[str, Any]) -> dict[str, Any]:
    return {"partitions": plain(plan.partitions), "data_volumes": plain(plan.data_volumes),
            "secure_boot": plan.secure_boot,
            "sources": plan.digests(f for v in plan.data_volumes for f in v.files),
            "arch": plan.arch, "epoch": plan.source_date_epoch if plan.reproducible else None,
            "amiforge": __version__, "format": STAGE_FORMAT,
            "mke2fs": tool_version("mke2fs", "-V"),
            "grub": tool_version("grub-mkimage", "--version"),
            "mkfs.xfs": tool_version("mkfs.xfs", "-V"),
            "mkfs.fat": tool_version("mkfs.fat", "--help"),
            "mtools": tool_version("mcopy", "-V")}


def run_stage(ctx: Context) -> None:
    make_filesystems(ctx.plan, ctx.input("configure"), ctx.output, ctx.workspace)


def make_filesystems(plan: Plan, tree: Path, folder: Path, work: Path) -> None:
    """The ESP and the volumes do not depend on the root filesystem: they are made
    alongside it."""
    root = plan.root
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        others = pool.submit(make_esp_and_volumes, plan, tree, folder, work)
        filesystem.make_ext4(folder / "root.img", root.size, tree, str(root.fs_uuid),
                             plan.root_label, plan.source_date_epoch, plan.reproducible)
        others.result()


def esp_files(plan: Plan, tree: Path, work: Path) -> dict[str, Path]:
    """Debian's signed boot chain, or amiforge's own GRUB at the removable path."""
    if plan.secure_boot:
        return bootloader.signed_efi_files(plan, tree, work)
    efi = work / "grub.efi"
    bootloader.build_efi_image(plan.arch, efi, bootloader.early_config(plan, work), tree)
    _, removable = bootloader.EFI_REMOVABLE[plan.arch]
    return {f"/{removable}": efi}


def make_esp_and_volumes(plan: Plan, tree: Path, folder: Path, work: Path) -> None:
    esp = plan.partition("esp")
    if esp is not None:
        filesystem.make_esp(folder / "esp.img", esp.size, str(esp.fs_uuid),
                            esp_files(plan, tree, work), plan.source_date_epoch)
    for volume in plan.data_volumes:
        make_volume(plan, volume, folder / volume.image, work, tree)
