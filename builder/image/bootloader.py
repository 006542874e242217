"""GRUB for BIOS and UEFI without grub-install (which needs a mounted, kernel-visible disk).

BIOS: ``core.img`` goes into the BIOS boot partition and ``boot.img`` into the MBR's code
area; two pointers tell the firmware where to look (boot.img's kernel sector at 0x5c and
diskboot's blocklist at the end of core.img's first sector). UEFI: a standalone GRUB at the
removable path ``EFI/BOOT/BOOTX64.EFI``. Both carry an early config that finds the root
filesystem by UUID and read /boot/grub/grub.cfg from it."""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

from builder.errors import BuildFailed
from builder.host import treepath
from builder.host.fsutil import read_at, read_regular_file, write_at
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
MAX_MODULE = 8 << 20  # GRUB's largest file (kernel.img, a module) is well under 1 MiB

COMMON_MODULES = ("part_gpt", "part_msdos", "ext2", "search", "search_fs_uuid",
                  "search_label", "normal", "configfile", "linux", "echo", "test", "serial",
                  "terminal", "gzio", "minicmd")
BIOS_MODULES = ("biosdisk", *COMMON_MODULES)
EFI_MODULES = ("fat", "efi_gop", "all_video", *COMMON_MODULES)
EFI_REMOVABLE = {"x86_64": ("x86_64-efi", "EFI/BOOT/BOOTX64.EFI"),
                 "arm64": ("arm64-efi", "EFI/BOOT/BOOTAA64.EFI")}
# Secure Boot: ESP path -> the file the image's shim-signed (and its shim-helpers) and
# grub-efi-ARCH-signed install. MokManager rides along (shim starts it when a MOK change
# is pending); the fallback loader does not (it would add boot entries and reset).
SIGNED_EFI = {"x86_64": {"EFI/BOOT/BOOTX64.EFI": "/usr/lib/shim/shimx64.efi.signed",
                         "EFI/BOOT/grubx64.efi":
                             "/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
                         "EFI/BOOT/mmx64.efi": "/usr/lib/shim/mmx64.efi.signed"},
              "arm64": {"EFI/BOOT/BOOTAA64.EFI": "/usr/lib/shim/shimaa64.efi.signed",
                        "EFI/BOOT/grubaa64.efi":
                            "/usr/lib/grub/arm64-efi-signed/grubaa64.efi.signed",
                        "EFI/BOOT/mmaa64.efi": "/usr/lib/shim/mmaa64.efi.signed"}}
SIGNED_GRUB_CONFIG = "EFI/debian/grub.cfg"
MAX_EFI_BINARY = 16 << 20  # signed GRUB is ~4 MiB


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
    if arch == "x86_64":
        run(grub_mkimage_argv(target, output, early_config, EFI_MODULES))
        return
    with tempfile.TemporaryDirectory(prefix="amiforge-grub-", dir=output.parent) as copy:
        modules = copy_modules(tree, f"/usr/lib/grub/{target}", Path(copy))
        run(grub_mkimage_argv(target, output, early_config, EFI_MODULES, modules))


def copy_modules(tree: Path, folder: str, target: Path) -> Path:
    """The image's GRUB folder, copied file by file: regular files only, never through a
    link (the image's scripts may have made ``echo.mod`` a link to a host file, which
    grub-mkimage, run as root, would copy into the bootloader), each size-bounded."""
    source = treepath.in_root(tree, folder)
    try:
        names = sorted(os.listdir(source))
    except OSError:
        raise BuildFailed(f"the image has no {folder} (grub-efi-arm64-bin)") from None
    for name in names:
        if name.endswith((".mod", ".lst", ".img")) and (source / name).is_file() and \
                not (source / name).is_symlink():
            data = read_regular_file(source / name, MAX_MODULE, f"{folder}/{name}",
                                     BuildFailed, follow_links=False)
            (target / name).write_bytes(data)
    if not (target / "kernel.img").is_file() or not (target / "linux.mod").is_file():
        raise BuildFailed(f"the image's {folder} lacks kernel.img or linux.mod")
    return target


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


def signed_efi_files(plan: Plan, tree: Path, work: Path) -> dict[str, Path]:
    """The ESP of a Secure Boot image (ESP path -> staged file): Debian's signed shim at the
    removable path, which loads the signed GRUB from its own folder; that GRUB's built-in
    prefix is /EFI/debian on the partition it was loaded from, so its config goes there and
    hands over to /boot/grub/grub.cfg. Taken from the image's own tree: regular files only,
    the last component never a link and any link on the way resolved inside the tree (the
    recipe's scripts may have made them links to host files). Kept up to date in an
    instance by nobody: no package there writes the ESP."""
    files = {}
    for dest, source in SIGNED_EFI[plan.arch].items():
        data = read_regular_file(treepath.in_root(tree, source), MAX_EFI_BINARY, source,
                                 BuildFailed, follow_links=False)
        staged = work / Path(dest).name
        staged.write_bytes(data)
        files[f"/{dest}"] = staged
    config = work / "grub-signed.cfg"
    config.write_text(early_config(plan, work).read_text() + "configfile $prefix/grub.cfg\n")
    files[f"/{SIGNED_GRUB_CONFIG}"] = config
    return files


def make_bios_core(plan: Plan, work: Path) -> Path | None:
    if plan.partition("bios-boot") is None:
        return None
    core = work / "core.img"
    build_bios_core(core, early_config(plan, work))
    return core
