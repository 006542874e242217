"""Filesystem images made from a tree, with no mounts: ``mkfs.ext4 -d``,
``mkfs.xfs -p`` and mtools for FAT."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from builder.errors import BuildFailed
from builder.host.fsutil import create_sparse
from builder.host.run import run

MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}


def mkfs_ext4_argv(image: Path, tree: Path | None, uuid: str, label: str) -> list[str]:
    """mke2fs onto a new sparse file. Such a file reads as zeros, so the inode tables and
    the journal need no writing, and are marked zeroed: no lazy init in the guest at first
    mount (writes to fresh EBS blocks) and ~60 MiB less data in every image."""
    extended = f"root_owner=0:0,hash_seed={uuid},nodiscard,assume_storage_prezeroed=1"
    argv = ["mkfs.ext4", "-q", "-F", "-t", "ext4", "-L", label, "-U", uuid, "-E", extended,
            "-O", "^metadata_csum_seed,^orphan_file"]
    if tree is not None:
        argv += ["-d", str(tree)]
    return [*argv, str(image)]


def mkfs_xfs_argv(image: Path, uuid: str, label: str, protofile: Path | None) -> list[str]:
    argv = ["mkfs.xfs", "-q", "-f", "-L", label, "-m", f"uuid={uuid}"]
    if protofile is not None:
        argv += ["-p", str(protofile)]
    return [*argv, str(image)]


def fat_volume_id(fs_uuid: str) -> str:
    """mkfs.fat's -i takes 8 hex digits; the plan writes them as XXXX-XXXX."""
    return fs_uuid.replace("-", "")


def make_ext4(image: Path, size: int, tree: Path | None, uuid: str, label: str,
              epoch: int, reproducible: bool = False) -> None:
    """ext4 from a tree. mke2fs copies each file's ctime and atime from the host (ctime
    cannot be set there, and reading a file moves its atime), so a reproducible build sets
    both to the epoch in every inode afterwards."""
    create_sparse(image, size)
    run(mkfs_ext4_argv(image, tree, uuid, label), env={"E2FSPROGS_FAKE_TIME": str(epoch)})
    if reproducible and tree is not None:
        script = image.with_suffix(".debugfs")
        script.write_text(ctime_commands(tree, epoch))
        run(["debugfs", "-w", "-f", str(script), str(image)],
            env={"E2FSPROGS_FAKE_TIME": str(epoch)})
        script.unlink()


def ctime_commands(tree: Path, epoch: int) -> str:
    """debugfs commands that set ctime and atime of every path of ``tree`` in the image."""
    lines = [f"sif / {field} @{epoch}" for field in ("ctime", "atime")]
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        for name in sorted(dirs + files):
            path = "/" + os.path.relpath(os.path.join(root, name), tree)
            if '"' in path or "\n" in path:
                raise BuildFailed(f"cannot make {path!r} reproducible (quote or newline)")
            lines += [f'sif "{path}" {field} @{epoch}' for field in ("ctime", "atime")]
    return "\n".join(lines) + "\n"


def clamp_times(tree: Path, epoch: int, atimes: bool = True) -> None:
    """No mtime newer than the epoch (the reproducible-builds convention) and, with
    ``atimes``, every atime the epoch (mke2fs and mcopy copy both into the image). Files
    that need no change are not touched: in a layered tree, touching copies a file up."""
    limit = epoch * 10**9
    for root, dirs, files in os.walk(tree):
        _clamp(root, limit, atimes)
        for name in files:
            _clamp(os.path.join(root, name), limit, atimes)
        for name in dirs:
            if os.path.islink(os.path.join(root, name)):
                _clamp(os.path.join(root, name), limit, atimes)


def _clamp(path: str, limit: int, atimes: bool) -> None:
    info = os.lstat(path)
    atime = limit if atimes else info.st_atime_ns
    if info.st_mtime_ns > limit or atime != info.st_atime_ns:
        os.utime(path, ns=(atime, min(info.st_mtime_ns, limit)), follow_symlinks=False)


def make_esp(image: Path, size: int, fs_uuid: str, files: dict[str, Path], epoch: int) -> None:
    """A FAT ESP holding ``files`` (path on the ESP -> host file). ``--invariant`` and
    copying a staged tree with its (clamped) times keep it byte-identical between builds."""
    image.unlink(missing_ok=True)
    run(["mkfs.fat", "--invariant", "-C", "-n", "ESP", "-i", fat_volume_id(fs_uuid),
         str(image), str(size // 1024)])
    staging = image.with_name(image.name + ".tree")
    for dest, source in files.items():
        target = staging / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    clamp_times(staging, epoch)
    # folders then files, each in sorted order (mcopy -s copies in the host folder's listing
    # order, which differs between filesystems: the FAT would differ between build hosts)
    for path in sorted(staging.rglob("*")):
        target = "::/" + path.relative_to(staging).as_posix()
        if path.is_dir():
            run(["mmd", "-i", str(image), target], env=MTOOLS_ENV)
        else:
            run(["mcopy", "-m", "-i", str(image), str(path), target], env=MTOOLS_ENV)
    shutil.rmtree(staging)
