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
