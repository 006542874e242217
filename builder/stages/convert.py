"""Stage 5: conversions of the raw disk with qemu-img (through the ``sh`` package)."""

from __future__ import annotations

import json
from pathlib import Path

from builder.run import qemu_img

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
