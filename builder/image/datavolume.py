"""Data volumes: extra EBS volumes with content, each a whole-disk filesystem image
(ext4 via ``mkfs.ext4 -d``, xfs via ``mkfs.xfs -p`` with a generated protofile)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from builder.amiplan import DataVolume
from builder.errors import BuildFailed
from builder.host.fsutil import create_sparse
from builder.host.run import run
from builder.image.filesystem import clamp_times, make_ext4, mkfs_xfs_argv
from builder.plan import Plan
from builder.stages.configure import install_file


def make_volume(plan: Plan, volume: DataVolume, image: Path, work: Path,
                root_tree: Path) -> None:
    epoch, reproducible = plan.source_date_epoch, plan.reproducible
    tree = work / f"{image.stem}-tree"
    tree.mkdir()
    for spec in volume.files:
        install_file(tree, spec, plan, accounts=root_tree)
    if reproducible:
        clamp_times(tree, epoch)
    if volume.filesystem == "ext4":
        make_ext4(image, volume.size, tree, volume.fs_uuid, volume.label, epoch, reproducible)
    else:
        proto = work / f"{image.stem}.proto"
        proto.write_text(xfs_protofile(tree))
        create_sparse(image, volume.size)
        run(mkfs_xfs_argv(image, volume.fs_uuid, volume.label, proto))


def xfs_protofile(tree: Path) -> str:
    """mkfs.xfs's protofile describing ``tree`` (directories and regular files)."""
    lines = ["/dev/null", "0 0", _mode_line("", tree)]
    lines += _entries(tree, depth=1)
    lines.append("$")
    return "\n".join(lines) + "\n"


def _mode_line(name: str, path: Path, depth: int = 0) -> str:
    info = path.lstat()
    kind = "d" if stat.S_ISDIR(info.st_mode) else "-"
    suid = "u" if info.st_mode & stat.S_ISUID else "-"
    sgid = "g" if info.st_mode & stat.S_ISGID else "-"
    mode = f"{kind}{suid}{sgid}{stat.S_IMODE(info.st_mode) & 0o777:03o}"
    prefix = " " * depth + (f"{name} " if name else "")
    source = f" {path}" if kind == "-" else ""
    return f"{prefix}{mode} {info.st_uid} {info.st_gid}{source}"


def _entries(directory: Path, depth: int) -> list[str]:
    lines = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        path = Path(entry.path)
        if any(c.isspace() for c in entry.name):
            raise BuildFailed(f"xfs data volumes cannot hold {entry.name!r}: mkfs.xfs's "
                              "protofile cannot name files with white space")
        lines.append(_mode_line(entry.name, path, depth))
        if entry.is_dir(follow_symlinks=False):
            lines += _entries(path, depth + 1)
            lines.append(" " * depth + "$")
    return lines
