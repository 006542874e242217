"""GRUB for BIOS and UEFI without grub-install (which needs a mounted, kernel-visible disk).

BIOS: ``core.img`` goes into the BIOS boot partition and ``boot.img`` into the MBR's code
area; two pointers tell the firmware where to look (boot.img's kernel sector at 0x5c and
diskboot's blocklist at the end of core.img's first sector). UEFI: a standalone GRUB at the
removable path ``EFI/BOOT/BOOTX64.EFI``. Both carry an early config that finds the root
filesystem by UUID and read /boot/grub/grub.cfg from it."""

from __future__ import annotations

import struct
from pathlib import Path

from builder.errors import BuildFailed
from builder.host import treepath
from builder.host.fsutil import read_at, write_at
from builder.host.run import run
from builder.plan import Plan
from builder.templates import render_template

GRUB_LIB = Path("/usr/lib/grub")
SECTOR = 512
BOOT_KERNEL_SECTOR = 0x5C
BOOT_DRIVE_CHECK = 0x66
BOOT_BPB = (0x03, 0x5A)
MBR_CODE_END = 0x1B8
CORE_SEGMENT = 0x820

COMMON_MODULES = ("part_gpt", "part_msdos", "ext2", "search", "search_fs_uuid",
                  "search_label", "normal", "configfile", "linux", "echo", "test", "serial",
                  "terminal", "gzio", "minicmd")
BIOS_MODULES = ("biosdisk", *COMMON_MODULES)
EFI_MODULES = ("fat", "efi_gop", "all_video", *COMMON_MODULES)
EFI_REMOVABLE = {"x86_64": ("x86_64-efi", "EFI/BOOT/BOOTX64.EFI"),
                 "arm64": ("arm64-efi", "EFI/BOOT/BOOTAA64.EFI")}


def grub_mkimage_argv(target: str, output: Path, early_config: Path,
                      modules: tuple[str, ...], module_dir: Path | None = None) -> list[str]:
    return ["grub-mkimage", "-O", target, "-o", str(output), "-c", str(early_config),
            "-p", "/boot/grub", "-d", str(module_dir or GRUB_LIB / target), *modules]


def build_bios_core(output: Path, early_config: Path) -> None:
    run(grub_mkimage_argv("i386-pc", output, early_config, BIOS_MODULES))


def build_efi_image(arch: str, output: Path, early_config: Path, tree: Path) -> None:
    """The standalone UEFI GRUB. x86_64 takes the host's modules; arm64 the image's own
    (grub-efi-arm64-bin is arm64-only in Debian: an x86_64 host has no arm64-efi modules),
    so the modules match the release the image runs."""
    target, _ = EFI_REMOVABLE[arch]
    modules = None if arch == "x86_64" else treepath.in_root(tree, f"/usr/lib/grub/{target}")
    if modules is not None and not (modules / "linux.mod").is_file():
        raise BuildFailed(f"the image has no /usr/lib/grub/{target} (grub-efi-arm64-bin)")
    run(grub_mkimage_argv(target, output, early_config, EFI_MODULES, modules))


def patch_core(core: bytes, core_lba: int) -> bytes:
    """Point diskboot's blocklist (end of core.img's first sector) at the sectors after it."""
    sectors = -(-len(core) // SECTOR)
    patched = bytearray(core.ljust(sectors * SECTOR, b"\0"))
    struct.pack_into("<QHH", patched, SECTOR - 12, core_lba + 1, sectors - 1, CORE_SEGMENT)
    return bytes(patched)


def patch_boot(boot: bytes, existing_mbr: bytes, core_lba: int) -> bytes:
    """boot.img's code for the MBR: keep the disk's BPB area, point at core.img, and
    skip the boot-drive check as grub-setup does for hard disks."""
    patched = bytearray(boot[:MBR_CODE_END])
    start, end = BOOT_BPB
    patched[start:end] = existing_mbr[start:end]
    struct.pack_into("<Q", patched, BOOT_KERNEL_SECTOR, core_lba)
    patched[BOOT_DRIVE_CHECK:BOOT_DRIVE_CHECK + 2] = b"\x90\x90"
    return bytes(patched)


def install_bios(disk: Path, core_img: Path, partition_start: int, partition_size: int) -> None:
    core_lba = partition_start // SECTOR
    core = patch_core(core_img.read_bytes(), core_lba)
    if len(core) > partition_size:
        raise BuildFailed(f"GRUB core.img ({len(core)} bytes) does not fit the BIOS boot "
                         f"partition ({partition_size} bytes)")
    boot = patch_boot((GRUB_LIB / "i386-pc/boot.img").read_bytes(),
                      read_at(disk, 0, SECTOR), core_lba)
    write_at(disk, partition_start, core)
    write_at(disk, 0, boot)


def early_config(plan: Plan, work: Path) -> Path:
    """GRUB's embedded config (find the root filesystem), shared by the BIOS and EFI
    images of one build."""
    path = work / "grub-early.cfg"
    if not path.exists():
        path.write_text(render_template("grub-early.cfg.j2", plan=plan))
    return path


def make_bios_core(plan: Plan, work: Path) -> Path | None:
    if plan.partition("bios-boot") is None:
        return None
    core = work / "core.img"
    build_bios_core(core, early_config(plan, work))
    return core
