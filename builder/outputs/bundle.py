"""Instance-store bundles (manifest version 2007-10-10), made and read back as streams.

Making one: the image is written as a one-member GNU sparse tar (holes and all-zero blocks
are not stored, as `tar -S` does), the SHA-1 of that tar stream is the image digest, the
stream is gzip-compressed (in parallel, pigz-style: one gzip stream whose deflate blocks
are made by worker threads, each primed with the previous 32 KiB), encrypted with
AES-128-CBC (PKCS#7) and cut into 10 MiB parts. Nothing holds the image in memory and no
second full-size copy is written. The key and iv are RSA-encrypted (PKCS#1 v1.5) for the
EC2 certificate and the user's certificate; the manifest is signed with the user's key.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import struct
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from builder import __version__
from builder.errors import InputError
from builder.host.fsutil import read_regular_file
from builder.outputs.ami import BUNDLE_PREFIX, bundle_mappings
from builder.outputs.sparsetar import gnu_sparse_headers, tar_stream

__all__ = ["BundleKeys", "bundle_image", "gnu_sparse_headers"]

if TYPE_CHECKING:
    from builder.plan import Plan

MANIFEST_VERSION = "2007-10-10"
PART_SIZE = 10 << 20
WINDOW = 32 << 10
# Measured on a Debian image (bench/): deflate level 8 with memLevel 6 (smaller blocks, so
# Huffman tables adapt more often) is smaller than `gzip -9` and, on two threads, several
# times faster. zlib's memLevel 9 costs ~0.5% in size on such images.
DEFAULT_LEVEL = 8
MEM_LEVEL = 6
COMPRESS_CHUNK = 4 << 20


# --- keys --------------------------------------------------------------------------------

@dataclass(frozen=True)
class BundleKeys:
    user_cert: Path
    user_key: Path
    ec2_cert: Path
    account_id: str

    def user_public(self) -> rsa.RSAPublicKey:
        return _rsa_public(_certificate(self.user_cert, "--user-cert").public_key(), "--user-cert")

    def ec2_public(self) -> rsa.RSAPublicKey:
        return _rsa_public(_certificate(self.ec2_cert, "--ec2-cert").public_key(), "--ec2-cert")

    def user_private(self) -> rsa.RSAPrivateKey:
        return load_private_key(self.user_key, "--user-key")

    def check(self) -> None:
        """Fail early, before any build work, if a key or certificate cannot be used."""
        if not (len(self.account_id) == 12 and self.account_id.isdigit()):
            raise InputError(f"--account-id {self.account_id!r}: an AWS account id is 12 digits")
        self.user_public(), self.ec2_public(), self.user_private()


def _read(path: Path, option: str) -> bytes:
    return read_regular_file(path, 1 << 20, f"{option} {path}", InputError)


def _certificate(path: Path, option: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, option))
    except ValueError:
        raise InputError(f"{option} {path}: not a PEM X.509 certificate") from None


def _rsa_public(key: object, option: str) -> rsa.RSAPublicKey:
    if not isinstance(key, rsa.RSAPublicKey):
        raise InputError(f"{option}: the certificate's key must be RSA")
    return key


def load_private_key(path: Path, option: str = "--user-key") -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, option), password=None)
    except (ValueError, TypeError):
        raise InputError(f"{option} {path}: not an unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise InputError(f"{option} {path}: the key must be RSA")
    return key


# --- parallel gzip -----------------------------------------------------------------------

def _deflate(data: bytes, dictionary: bytes, level: int, last: bool) -> bytes:
    options = {"zdict": dictionary} if dictionary else {}
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15, MEM_LEVEL, **options)
    out = compressor.compress(data)
    return out + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _rechunk(pieces: Iterator[bytes], size: int) -> Iterator[bytes]:
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


def parallel_gzip(pieces: Iterator[bytes], level: int = DEFAULT_LEVEL,
                  workers: int | None = None) -> Iterator[bytes]:
    """One gzip stream (readable by plain gunzip) compressed by several threads."""
    workers = workers or max(1, os.cpu_count() or 1)
    yield b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + (b"\x02" if level == 9 else b"\x00") + b"\x03"
    crc, total, previous = 0, 0, b""
    pending: deque[concurrent.futures.Future[bytes]] = deque()
    chunks = _rechunk(pieces, COMPRESS_CHUNK)
    current = next(chunks, b"")
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            following = next(chunks, None)
            crc = zlib.crc32(current, crc)
            total += len(current)
            pending.append(pool.submit(_deflate, current, previous[-WINDOW:], level,
                                       following is None))
            previous = current
            while len(pending) > 2 * workers or (following is None and pending):
                yield pending.popleft().result()
            if following is None:
                break
            current = following
    yield struct.pack("<II", crc & 0xFFFFFFFF, total & 0xFFFFFFFF)


# --- encryption and parts ----------------------------------------------------------------

@dataclass
class PartWriter:
    directory: Path
    prefix: str
    part_size: int = PART_SIZE
    digests: list[str] = field(default_factory=list)
    written: int = 0
    _handle: BinaryIO | None = None
    _hash: object = None
    _in_part: int = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._handle is None:
                self._open()
            assert self._handle is not None
            room = self.part_size - self._in_part
            piece = view[:room]
            self._handle.write(piece)
            self._hash.update(piece)  # type: ignore[attr-defined]
            self._in_part += len(piece)
            self.written += len(piece)
            view = view[len(piece):]
            if self._in_part == self.part_size:
                self._close()

    def _temporary(self, index: int) -> Path:
        return self.directory / f".{self.prefix}.part.{index}.tmp"

    def _open(self) -> None:
        self._handle = open(self._temporary(len(self.digests)), "wb")  # noqa: SIM115
        self._hash = hashlib.sha1()
        self._in_part = 0

    def _close(self) -> None:
        assert self._handle is not None
        self._handle.close()
        self.digests.append(self._hash.hexdigest())  # type: ignore[attr-defined]
        self._handle = None

    def finish(self) -> list[str]:
        """Close the last part and give the parts their final, zero-padded names."""
        if self._handle is not None:
            self._close()
        width = len(str(len(self.digests)))
        names = []
        for index in range(len(self.digests)):
            name = part_name(self.prefix, index, width)
            os.replace(self._temporary(index), self.directory / name)
            names.append(name)
        return names


def part_name(prefix: str, index: int, width: int) -> str:
    return f"{prefix}.part.{index:0{width}d}"


def encrypt_key_material(value: bytes, public: rsa.RSAPublicKey) -> str:
    """Key or iv as 32 hex characters, RSA PKCS#1 v1.5 encrypted, hex-encoded."""
    return public.encrypt(value.hex().encode(), asym.PKCS1v15()).hex()


# --- the manifest ------------------------------------------------------------------------

@dataclass(frozen=True)
class BundleResult:
    manifest: Path
    parts: list[str]
    image_digest: str
    image_size: int
    bundled_size: int


def machine_configuration_xml(plan: Plan) -> str:
    mappings = "".join(f"<mapping><virtual>{v}</virtual><device>{d}</device></mapping>"
                       for v, d in bundle_mappings(plan.ami))
    return (f"<machine_configuration><architecture>{plan.arch}</architecture>"
            f"<block_device_mapping>{mappings}</block_device_mapping>"
            "</machine_configuration>")


def image_xml(name: str, account: str, digest: str, size: int, bundled: int,
              keys: dict[str, str], parts: list[str], part_digests: list[str]) -> str:
    part_xml = "".join(
        f"<part index=\"{i}\"><filename>{n}</filename>"
        f"<digest algorithm=\"SHA1\">{d}</digest></part>"
        for i, (n, d) in enumerate(zip(parts, part_digests, strict=True)))
    return (f"<image><name>{name}</name><user>{account}</user><type>machine</type>"
            f"<digest algorithm=\"SHA1\">{digest}</digest><size>{size}</size>"
            f"<bundled_size>{bundled}</bundled_size>"
            f"<ec2_encrypted_key algorithm=\"AES-128-CBC\">{keys['ec2_key']}</ec2_encrypted_key>"
            f"<user_encrypted_key algorithm=\"AES-128-CBC\">{keys['user_key']}"
            "</user_encrypted_key>"
            f"<ec2_encrypted_iv>{keys['ec2_iv']}</ec2_encrypted_iv>"
            f"<user_encrypted_iv>{keys['user_iv']}</user_encrypted_iv>"
            f"<parts count=\"{len(parts)}\">{part_xml}</parts></image>")


def manifest_xml(machine_configuration: str, image: str, signature: str) -> str:
    return ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<manifest>"
            f"<version>{MANIFEST_VERSION}</version>"
            f"<bundler><name>amiforge</name><version>{__version__}</version>"
            "<release>0</release></bundler>"
            f"{machine_configuration}{image}<signature>{signature}</signature></manifest>\n")


def sign(text: str, private: rsa.RSAPrivateKey) -> str:
    return private.sign(text.encode(), asym.PKCS1v15(), hashes.SHA1()).hex()


def bundle_image(image: Path, out_dir: Path, keys: BundleKeys, plan: Plan, *,
                 key: bytes | None = None, iv: bytes | None = None,
                 level: int = DEFAULT_LEVEL,
                 prefix: str = BUNDLE_PREFIX, member: str = "disk.raw") -> BundleResult:
    """Write ``prefix``.part.N and ``prefix``.manifest.xml into ``out_dir``."""
    key = key or os.urandom(16)
    iv = iv or os.urandom(16)
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1()  # the 2007-10-10 format is SHA-1 throughout

    def hashed(pieces: Iterator[bytes]) -> Iterator[bytes]:
        for piece in pieces:
            digest.update(piece)
            yield piece

    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    padder = padding.PKCS7(128).padder()
    writer = PartWriter(out_dir, prefix)
    for compressed in parallel_gzip(hashed(tar_stream(image, member)), level):
        writer.write(encryptor.update(padder.update(compressed)))
    writer.write(encryptor.update(padder.finalize()) + encryptor.finalize())
    parts = writer.finish()
    encrypted = {"ec2_key": encrypt_key_material(key, keys.ec2_public()),
                 "user_key": encrypt_key_material(key, keys.user_public()),
                 "ec2_iv": encrypt_key_material(iv, keys.ec2_public()),
                 "user_iv": encrypt_key_material(iv, keys.user_public())}
    size = image.stat().st_size
    machine = machine_configuration_xml(plan)
    image_part = image_xml(prefix, keys.account_id, digest.hexdigest(), size, writer.written,
                           encrypted, parts, writer.digests)
    signature = sign(machine + image_part, keys.user_private())
    manifest = out_dir / f"{prefix}.manifest.xml"
    manifest.write_text(manifest_xml(machine, image_part, signature))
    return BundleResult(manifest, parts, digest.hexdigest(), size, writer.written)
