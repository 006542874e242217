"""Stage 3: filesystem images made from a tree, with no mounts: ``mkfs.ext4 -d``,
``mkfs.xfs -p`` and mtools for FAT."""

from __future__ import annotations

from pathlib import Path

from builder.fsutil import create_sparse
from builder.run import run

MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}


def mkfs_ext4_argv(image: Path, tree: Path | None, uuid: str, label: str) -> list[str]:
    extended = f"root_owner=0:0,hash_seed={uuid},nodiscard"
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
              epoch: int) -> None:
    create_sparse(image, size)
    run(mkfs_ext4_argv(image, tree, uuid, label), env={"E2FSPROGS_FAKE_TIME": str(epoch)})


def make_esp(image: Path, size: int, fs_uuid: str, files: dict[str, Path]) -> None:
    """A FAT ESP holding ``files`` (path on the ESP -> host file)."""
    image.unlink(missing_ok=True)
    run(["mkfs.fat", "-C", "-n", "ESP", "-i", fat_volume_id(fs_uuid), str(image),
         str(size // 1024)])
    folders = sorted({str(Path(dest).parent) for dest in files} - {"/"})
    for folder in _with_parents(folders):
        run(["mmd", "-i", str(image), f"::{folder}"], env=MTOOLS_ENV)
    for dest, source in sorted(files.items()):
        run(["mcopy", "-i", str(image), str(source), f"::{dest}"], env=MTOOLS_ENV)


def _with_parents(folders: list[str]) -> list[str]:
    out: set[str] = set()
    for folder in folders:
        parts = Path(folder).parts[1:]
        for i in range(1, len(parts) + 1):
            out.add("/" + "/".join(parts[:i]))
    return sorted(out, key=lambda f: (f.count("/"), f))
