"""Sizes with units: ``512MiB``, ``2GiB``, ``8G`` (binary units), plain integers are bytes."""

from __future__ import annotations

import re

UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(?P<number>\d+)(?P<unit>[KMGT]?)(?P<binary>iB)?|(?P<bytes>\d+)B", re.I)
_DECIMAL_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT])B\s*$", re.I)


MiB = 1 << 20
# The disk layout's fixed parts (the plan lays them out; the recipe rules check that the
# root volume has room for them and a root filesystem).
ALIGN = MiB
BIOS_BOOT_SIZE = MiB
ESP_SIZE = 64 * MiB
MIN_ROOT_PARTITION = 128 * MiB
MAX_DISK = 64 << 40  # EBS volumes are at most 64 TiB (io2 Block Express)


def layout_overhead(boot: str) -> int:
    """Bytes of a disk that are not the root partition: alignment, BIOS boot, ESP."""
    return (2 * ALIGN + (BIOS_BOOT_SIZE if boot in ("bios", "hybrid") else 0)
            + (ESP_SIZE if boot in ("uefi", "hybrid") else 0))


class SizeError(ValueError):
    pass


def parse_size(value: object) -> int:
    """Return a size in bytes, or raise SizeError with a hint."""
    if isinstance(value, bool):
        raise SizeError(f"{value!r} is not a size (try 2GiB)")
    if isinstance(value, int):
        if value <= 0:
            raise SizeError(f"{value!r} is not a positive size")
        return value
    if not isinstance(value, str):
        raise SizeError(f"{value!r} is not a size (try 2GiB)")
    match = _SIZE.fullmatch(value)
    if match and match.group("bytes"):
        return int(match.group("bytes"))
    if not match:
        raise SizeError(f"{value!r} is not a size (try {_hint(value)})")
    number = int(match.group("number"))
    if number <= 0:
        raise SizeError(f"{value!r} is not a positive size")
    return number * UNITS[match.group("unit").upper()]


def _hint(value: str) -> str:
    decimal = _DECIMAL_UNIT.match(value)
    if decimal and "." not in decimal.group(1):
        return f"{decimal.group(1)}{decimal.group(2).upper()}iB"
    return "2GiB"


def format_size(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]}{unit}iB"
    return f"{size}B"
