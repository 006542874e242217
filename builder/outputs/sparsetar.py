"""The one-member GNU sparse tar (old GNU 'S' header, as `tar -S` writes it) that an
instance-store bundle wraps its image in: written as a stream from a sparse file, and read
back with every field checked (the reader's input may come from a stranger)."""

from __future__ import annotations

import array
import os
import re
from collections.abc import Iterator
from pathlib import Path

from builder.errors import InputError
from builder.host.fsutil import data_extents

BLOCK = 512
ZERO_GRANULE = 4096
CHUNK = 1 << 20
READ = 1 << 20
MAX_REGIONS = 1 << 20          # data regions of the sparse member (16 bytes each here)
_FILE_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9._-]{0,254}\Z")


class BundleError(InputError):
    """The bundle does not verify: a digest, the signature, or its structure."""


# --- writing -----------------------------------------------------------------------------

def sparse_map(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of every region holding non-zero data, in 4 KiB granules."""
    regions: list[tuple[int, int]] = []
    zero = bytes(ZERO_GRANULE)
    for start, length in data_extents(fd, size):
        position = start
        while position < start + length:
            chunk = os.pread(fd, min(CHUNK, start + length - position), position)
            if chunk.count(0) != len(chunk):
                for i in range(0, len(chunk), ZERO_GRANULE):
                    if chunk[i:i + ZERO_GRANULE] != zero[:len(chunk[i:i + ZERO_GRANULE])]:
                        _add_region(regions, position + i,
                                    min(ZERO_GRANULE, len(chunk) - i))
            position += len(chunk)
    return regions


def _add_region(regions: list[tuple[int, int]], offset: int, length: int) -> None:
    if regions and regions[-1][0] + regions[-1][1] == offset:
        regions[-1] = (regions[-1][0], regions[-1][1] + length)
    else:
        regions.append((offset, length))


def _field(value: int, width: int) -> bytes:
    """A tar number field: octal and NUL where it fits, else GNU tar's base-256 (a first
    byte of 0x80, then big-endian binary), as GNU tar writes sizes and offsets of 8 GiB and
    more in a 12-byte field."""
    if value < 8 ** (width - 1):
        return f"{value:0{width - 1}o}".encode() + b"\0"
    return b"\x80" + value.to_bytes(width - 1, "big")


def _sparse_entries(regions: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    entries = list(regions)
    if not entries or entries[-1][0] + entries[-1][1] < size:
        entries.append((size, 0))  # GNU tar's marker for a file that ends in a hole
    return entries


def gnu_sparse_headers(name: str, size: int, regions: list[tuple[int, int]],
                       mtime: int = 0) -> bytes:
    """An old-GNU sparse header ('S') plus extension blocks, as `tar -S` writes them."""
    entries = _sparse_entries(regions, size)
    stored = sum(length for _, length in regions)
    header = bytearray(BLOCK)
    header[0:len(name)] = name.encode()
    header[100:108] = _field(0o644, 8)
    header[108:116] = _field(0, 8)
    header[116:124] = _field(0, 8)
    header[124:136] = _field(stored, 12)
    header[136:148] = _field(mtime, 12)
    header[156:157] = b"S"
    header[257:265] = b"ustar  \0"
    header[265:269] = b"root"
    header[297:301] = b"root"
    for i, (offset, length) in enumerate(entries[:4]):
        header[386 + i * 24:398 + i * 24] = _field(offset, 12)
        header[398 + i * 24:410 + i * 24] = _field(length, 12)
    header[482] = 1 if len(entries) > 4 else 0
    header[483:495] = _field(size, 12)
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
    blocks = [bytes(header)]
    rest = entries[4:]
    while rest:
        ext = bytearray(BLOCK)
        for i, (offset, length) in enumerate(rest[:21]):
            ext[i * 24:i * 24 + 12] = _field(offset, 12)
            ext[i * 24 + 12:i * 24 + 24] = _field(length, 12)
        rest = rest[21:]
        ext[504] = 1 if rest else 0
        blocks.append(bytes(ext))
    return b"".join(blocks)


def tar_stream(image: Path, member: str) -> Iterator[bytes]:
    """The whole tar archive holding ``image`` as one sparse member, in pieces."""
    with open(image, "rb") as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        regions = sparse_map(fd, size)
        yield gnu_sparse_headers(member, size, regions)
        stored = 0
        for offset, length in regions:
            for position in range(offset, offset + length, CHUNK):
                chunk = os.pread(fd, min(CHUNK, offset + length - position), position)
                stored += len(chunk)
                yield chunk
        if stored % BLOCK:
            yield bytes(BLOCK - stored % BLOCK)
        yield bytes(2 * BLOCK)


# --- reading -----------------------------------------------------------------------------

class Reader:
    """Exact-size reads from a stream of byte pieces (each at most READ bytes)."""

    def __init__(self, pieces: Iterator[bytes]):
        self._pieces = pieces
        self._buffer = bytearray()

    def read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            piece = next(self._pieces, None)
            if piece is None:
                raise BundleError("the image archive ends early")
            self._buffer += piece
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    def only_zeros_left(self) -> bool:
        if self._buffer.count(0) != len(self._buffer):
            return False
        self._buffer.clear()
        return all(piece.count(0) == len(piece) for piece in self._pieces)


def _number(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU tar's base-256, for 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\0 ").strip()
    if not text:
        return 0
    if not re.fullmatch(rb"[0-7]{1,12}", text):
        raise BundleError("the image archive has a malformed number in a header")
    return int(text, 8)


class _Regions:
    """The sparse member's data regions as they are read: ascending, inside the file,
    at most MAX_REGIONS of them, kept compactly."""

    def __init__(self, size: int):
        self.size, self.offsets, self.lengths = size, array.array("Q"), array.array("Q")

    def add(self, entry: bytes) -> None:
        offset, length = _number(entry[:12]), _number(entry[12:24])
        if not length:
            return
        end = self.offsets[-1] + self.lengths[-1] if self.offsets else 0
        if offset < end or offset + length > self.size:
            raise BundleError("the image archive's sparse map is out of order or too large")
        if len(self.offsets) >= MAX_REGIONS:
            raise BundleError(f"the image archive has more than {MAX_REGIONS} data regions")
        self.offsets.append(offset)
        self.lengths.append(length)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self.offsets, self.lengths, strict=True)


def _sparse_member(reader: Reader, max_size: int) -> tuple[int, _Regions]:
    """The member's size and data regions, checked as they are read."""
    header = reader.read(BLOCK)
    if _number(header[148:156]) != sum(header[:148]) + 8 * 32 + sum(header[156:]):
        raise BundleError("the image archive's header checksum is wrong")
    name = header[:100].split(b"\0")[0]
    if not _FILE_NAME.match(name.decode("ascii", "replace")) or name in (b".", b".."):
        raise BundleError("the image archive's member name is not a plain file name")
    if header[156:157] != b"S":
        raise BundleError("the image archive's member is not a GNU sparse file")
    size = _number(header[483:495])
    if size > max_size:
        raise BundleError(f"the image archive holds {size} bytes, the manifest says {max_size}")
    regions = _Regions(size)
    for i in range(4):
        regions.add(header[386 + i * 24:410 + i * 24])
    extended, blocks = header[482], 0
    while extended:
        blocks += 1
        if blocks > MAX_REGIONS // 21 + 1:
            raise BundleError("the image archive's sparse map is longer than any image needs")
        block = reader.read(BLOCK)
        for i in range(21):
            regions.add(block[i * 24:i * 24 + 24])
        extended = block[504]
    return size, regions


def restore(reader: Reader, handle: object, max_size: int) -> int:
    size, regions = _sparse_member(reader, max_size)
    out = handle  # a binary file opened for writing
    stored = 0
    for offset, length in regions:
        out.seek(offset)  # type: ignore[attr-defined]
        for position in range(0, length, READ):
            out.write(reader.read(min(READ, length - position)))  # type: ignore[attr-defined]
        stored += length
    out.truncate(size)  # type: ignore[attr-defined]
    reader.read(-stored % BLOCK)
    if not reader.only_zeros_left():
        raise BundleError("the image archive holds more than one member")
    return size
