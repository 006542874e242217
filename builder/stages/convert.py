"""Stage 5: conversions of the raw disk with qemu-img (through the ``sh`` package)."""

from __future__ import annotations

import json
from pathlib import Path

from builder.host.fsutil import copy_sparse, create_sparse
from builder.host.run import qemu_img
from builder.pipeline.runner import Context
from builder.plan import Plan

# qemu-img's format name and options for each output format amiforge offers.
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qcow2": ("qcow2", ()),
    "vmdk": ("vmdk", ("-o", "subformat=streamOptimized")),
    "vhd": ("vpc", ("-o", "subformat=fixed,force_size=on")),
}
EXTENSIONS = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vhd"}


def convert_args(source: Path, target: Path, fmt: str, compress: bool = False) -> list[str]:
    qemu_format, options = FORMATS[fmt]
    args = ["convert", "-q", "-f", "raw", "-O", qemu_format, *options]
    if compress and fmt == "qcow2":
        args.append("-c")
    return [*args, str(source), str(target)]


def convert(source: Path, target: Path, fmt: str, compress: bool = False) -> None:
    qemu_img(*convert_args(source, target, fmt, compress))


def image_info(path: Path) -> dict[str, object]:
    return json.loads(qemu_img("info", "--output=json", str(path)))


def run_stage(ctx: Context) -> dict[str, object]:
    """Every requested format of the disk and of each data volume; the facts name each
    output file (workspace path -> format and final name)."""
    disk = ctx.input("disk") / "disk.raw"
    images = [disk, *(ctx.input("filesystem") / v.image for v in ctx.plan.data_volumes)]
    outputs = convert_all(ctx.plan, images, disk, ctx.output, ctx.extras["formats"])
    return {"outputs": {str(path): list(value) for path, value in outputs.items()}}


def convert_all(plan: Plan, images: list[Path], disk: Path, folder: Path,
                formats: tuple[str, ...]) -> dict[Path, tuple[str, str]]:
    """Output path -> (format, final file name) for every image and requested format."""
    outputs: dict[Path, tuple[str, str]] = {}
    for image in images:
        stem = image.name.removesuffix(".raw")
        for fmt in formats:
            name = f"{stem}.{EXTENSIONS[fmt]}"
            target = folder / name
            if fmt == "raw" and image == disk:  # made by this build: lands as it is
                target = disk
            elif fmt == "raw":  # a stored image: the output gets its own copy
                create_sparse(target, image.stat().st_size)
                copy_sparse(image, target)
            else:
                convert(image, target, fmt, compress=plan.qcow2_compress)
            outputs[target] = (fmt, name)
    return outputs
