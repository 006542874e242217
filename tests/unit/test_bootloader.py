import struct

from builder.image.bootloader import SECTOR, patch_boot, patch_core


def test_patch_core_points_blocklist_at_following_sectors() -> None:
    core = bytes(range(256)) * 10  # 2560 bytes -> 5 sectors
    patched = patch_core(core, core_lba=2048)
    assert len(patched) == 5 * SECTOR
    start, length, segment = struct.unpack_from("<QHH", patched, SECTOR - 12)
    assert (start, length, segment) == (2049, 4, 0x820)
    assert patched[SECTOR:] == core[SECTOR:].ljust(4 * SECTOR, b"\0")


def test_patch_boot_keeps_bpb_and_sets_kernel_sector() -> None:
    boot = bytes([0xEB, 0x63, 0x90]) + bytes(509)
    mbr = bytes(3) + b"B" * (0x5A - 3) + bytes(SECTOR - 0x5A)
    patched = patch_boot(boot, mbr, core_lba=2048)
    assert len(patched) == 0x1B8  # never touches the disk signature or partition table
    assert patched[:3] == boot[:3]
    assert patched[3:0x5A] == b"B" * (0x5A - 3)
    assert struct.unpack_from("<Q", patched, 0x5C)[0] == 2048
    assert patched[0x66:0x68] == b"\x90\x90"


def test_the_images_grub_modules_never_follow_a_link_to_the_host(tmp_path) -> None:
    """arm64's modules come from the image: a script's `ln -s /root/secret echo.mod`
    must not bring a host file into the bootloader."""
    from pathlib import Path

    import pytest

    from builder.errors import BuildFailed
    from builder.image.bootloader import copy_modules

    secret = tmp_path / "host-secret"
    secret.write_text("host credentials\n")
    folder = tmp_path / "tree/usr/lib/grub/arm64-efi"
    folder.mkdir(parents=True)
    for name in ("kernel.img", "linux.mod", "moddep.lst"):
        (folder / name).write_bytes(b"grub " + name.encode())
    (folder / "echo.mod").symlink_to(secret)
    (folder / "fifo.mod").unlink(missing_ok=True)
    import os

    os.mkfifo(folder / "fifo.mod")
    copy = tmp_path / "copy"
    copy.mkdir()
    copy_modules(tmp_path / "tree", "/usr/lib/grub/arm64-efi", copy)
    assert sorted(p.name for p in copy.iterdir()) == ["kernel.img", "linux.mod", "moddep.lst"]
    assert not any("host credentials" in p.read_text() for p in copy.iterdir())
    (tmp_path / "tree/usr/lib/grub").rename(tmp_path / "elsewhere")
    (tmp_path / "tree/usr/lib/grub").symlink_to(Path("/usr/lib/grub"))  # re-rooted: itself
    with pytest.raises(BuildFailed, match="arm64-efi"):  # a loop, inside the tree
        copy_modules(tmp_path / "tree", "/usr/lib/grub/arm64-efi", tmp_path / "copy2")


def test_secure_boot_esp_takes_the_images_signed_files_never_through_a_link(tmp_path) -> None:
    """The signed shim and GRUB come from the image's packages; a script's link to a host
    file must not put that file on the ESP."""

    import pytest

    from builder.errors import BuildFailed
    from builder.image.bootloader import SIGNED_EFI, SIGNED_GRUB_CONFIG, signed_efi_files
    from builder.plan import make_plan
    from builder.recipe.load import LoadOptions, load_recipe
    from tests.conftest import FIXED_EPOCH, RECIPES

    plan = make_plan(load_recipe(RECIPES / "debian-13-secureboot.yaml",
                                 LoadOptions(source_date_epoch=FIXED_EPOCH)))
    tree, work = tmp_path / "tree", tmp_path / "work"
    work.mkdir()
    for source in SIGNED_EFI["x86_64"].values():
        (tree / source.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tree / source.lstrip("/")).write_bytes(source.encode())
    files = signed_efi_files(plan, tree, work)
    assert files["/EFI/BOOT/BOOTX64.EFI"].read_bytes() == b"/usr/lib/shim/shimx64.efi.signed"
    config = files[f"/{SIGNED_GRUB_CONFIG}"].read_text()
    assert str(plan.root.fs_uuid) in config and config.endswith("configfile $prefix/grub.cfg\n")
    secret = tmp_path / "host-secret"
    secret.write_text("host credentials\n")
    grub = tree / "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"
    grub.unlink()
    grub.symlink_to(secret)
    with pytest.raises(BuildFailed, match=r"grubx64\.efi\.signed"):
        signed_efi_files(plan, tree, work)
