"""Stage 4: the partitioned disk image. sfdisk writes the GPT onto the image file (no loop
device), filesystem images are copied in sparse-aware, GRUB is placed for BIOS/UEFI, and
the layout is read back with ``sfdisk --json`` to check it is what the plan says."""

from __future__ import annotations

import json
from pathlib import Path

from builder.errors import BuildFailed
from builder.host.fsutil import copy_sparse, create_sparse
from builder.host.run import run
from builder.image.bootloader import install_bios, make_bios_core
from builder.pipeline.runner import Context
from builder.plan import Partition, Plan, fixed_uuid

SECTOR = 512


def sfdisk_script(plan: Plan) -> str:
    lines = ["label: gpt", f"label-id: {fixed_uuid(plan.name, 'disk')}", "unit: sectors",
             "first-lba: 2048", ""]
    for part in plan.partitions:
        lines.append(
            f"start={part.start // SECTOR}, size={part.size // SECTOR}, type={part.type_guid}, "
            f"uuid={part.uuid}, name=\"{part.name}\"")
    return "\n".join(lines) + "\n"


def partition_table(disk: Path) -> list[dict[str, object]]:
    data = json.loads(run(["sfdisk", "--json", str(disk)], capture=True))
    return data["partitiontable"]["partitions"]


def verify_layout(plan: Plan, disk: Path) -> None:
    table = partition_table(disk)
    expected = [(p.start // SECTOR, p.size // SECTOR, p.type_guid.upper()) for p in plan.partitions]
    found = [(int(p["start"]), int(p["size"]), str(p["type"]).upper()) for p in table]
    if found != expected:
        raise BuildFailed(f"partition table differs from the plan: {found} != {expected}")


def assemble_disk(plan: Plan, disk: Path, images: dict[str, Path],
                  bios_core: Path | None) -> None:
    """Write the GPT, copy each partition's filesystem image in, install BIOS GRUB."""
    create_sparse(disk, plan.disk_size)
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)],
        input=sfdisk_script(plan).encode())
    verify_layout(plan, disk)
    for part in plan.partitions:
        if part.name in images:
            copy_sparse(images[part.name], disk, part.start)
    bios = plan.partition("bios-boot")
    if bios is not None:
        if bios_core is None:
            raise BuildFailed("BIOS boot partition planned but no GRUB core image was made")
        install_bios(disk, bios_core, bios.start, bios.size)


def partitions_report(plan: Plan) -> list[dict[str, object]]:
    return [_report(p) for p in plan.partitions]


def _report(part: Partition) -> dict[str, object]:
    return {"number": part.number, "name": part.name, "type_guid": part.type_guid,
            "uuid": part.uuid, "start": part.start, "size": part.size,
            "filesystem": part.filesystem, "filesystem_uuid": part.fs_uuid}


def run_stage(ctx: Context) -> None:
    """disk.raw from the filesystem images; its sha256 starts at once, in a thread (it is
    a large part of a warm rebuild and can run while qemu-img converts)."""
    images = ctx.input("filesystem")
    disk = ctx.output / "disk.raw"
    assemble_disk(ctx.plan, disk, {"root": images / "root.img", "esp": images / "esp.img"},
                  make_bios_core(ctx.plan, ctx.workspace))
    ctx.extras["hashes"].add(disk, "raw", disk.name)
