"""Programs a build needs, found up front and reported with their purpose and package;
their versions, for the keys of what they make."""

from __future__ import annotations

import functools
import platform
import shutil
from pathlib import Path

from builder.errors import ToolFailed, ToolMissing
from builder.host.run import package_for, run
from builder.plan import Plan
from builder.stages import native_tools

STAGE_FORMAT = 4  # bump when a stage's output changes for the same inputs


@functools.cache
def tool_version(*argv: str) -> str:
    """The first line of a tool's version output: part of the key of what it makes."""
    try:
        return (run(list(argv), capture=True).strip().splitlines() or ["unknown"])[0]
    except (ToolFailed, ToolMissing, OSError):
        return "unknown"

BASE = {
    "mmdebstrap": "bootstrapping the root tree",
    "unshare": "running commands inside the new root",
    "sfdisk": "writing the partition table",
    "qemu-img": "converting disk images",
    "dpkg-query": "listing installed packages",
    "debugfs": "fixing inode times of reproducible filesystems",
    "grub-script-check": "checking the generated grub.cfg",
}
BY_FILESYSTEM = {"ext4": {"mkfs.ext4": "making ext4 filesystems"},
                 "xfs": {"mkfs.xfs": "making xfs filesystems"}}
UEFI = {"mkfs.fat": "making the EFI system partition", "mcopy": "filling the ESP",
        "grub-mkimage": "making the UEFI bootloader"}
BIOS = {"grub-mkimage": "making the BIOS bootloader"}
GRUB_FILES = {"bios": ("i386-pc/boot.img", "grub-pc-bin"),
              "uefi": ("x86_64-efi/linux.mod", "grub-efi-amd64-bin")}


HOST_ARCH = {"aarch64": "arm64"}.get(platform.machine(), platform.machine())
QEMU_ARCH = {"arm64": "aarch64", "x86_64": "x86_64"}
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def foreign_binaries_run(arch: str) -> bool:
    """The kernel hands ``arch`` binaries to qemu-user (binfmt_misc, registered by
    qemu-user-static and binfmt-support)."""
    try:
        return (BINFMT / f"qemu-{QEMU_ARCH[arch]}").read_text().startswith("enabled")
    except OSError:
        return False


def required_programs(plan: Plan, filesystems: set[str]) -> dict[str, str]:
    needed = dict(BASE)
    for fs in filesystems | {plan.root_filesystem}:
        needed.update(BY_FILESYSTEM[fs])
    if plan.partition("esp"):
        needed.update(UEFI)
    if plan.partition("bios-boot"):
        needed.update(BIOS)
    if native_tools.wanted(plan.os):
        needed["patchelf"] = "the host's dpkg helpers and shell standing in for the emulated ones"
    return needed


def check_tools(plan: Plan, filesystems: set[str] = frozenset()) -> None:
    missing = [(name, purpose, package_for(name))
               for name, purpose in required_programs(plan, set(filesystems)).items()
               if shutil.which(name) is None]
    for mode, (relative, package) in GRUB_FILES.items():
        wanted = plan.partition("bios-boot" if mode == "bios" else "esp")
        if wanted and plan.arch == "x86_64" and not (Path("/usr/lib/grub") / relative).exists():
            missing.append((f"/usr/lib/grub/{relative}", f"{mode} boot", package))
    if plan.arch != HOST_ARCH and not foreign_binaries_run(plan.arch):
        missing.append((f"binfmt_misc handler qemu-{QEMU_ARCH[plan.arch]}",
                        f"running the {plan.arch} image's programs on this {HOST_ARCH} host",
                        "qemu-user-static binfmt-support"))
    if missing:
        raise ToolMissing(missing)
