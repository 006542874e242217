"""Read an instance-store bundle back: verify the manifest's signature and every digest,
decrypt, decompress, and restore the image byte for byte (sparse). The inverse of
:mod:`builder.bundle`; any mismatch is an error that names what does not match."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import padding as asym
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from builder.bundle import BLOCK, load_private_key
from builder.errors import InputError

READ = 1 << 20


class BundleError(InputError):
    """The bundle does not verify: a digest, the signature, or its structure."""


@dataclass(frozen=True)
class Part:
    index: int
    filename: str
    digest: str


@dataclass(frozen=True)
class Manifest:
    path: Path
    signed_text: str
    signature: str
    image_name: str
    digest: str
    size: int
    user_key: str
    user_iv: str
    parts: list[Part]


def _find(root: ElementTree.Element, path: str, manifest: Path) -> str:
    element = root.find(path)
    if element is None or element.text is None:
        raise BundleError(f"{manifest}: manifest has no {path}")
    return element.text.strip()


def read_manifest(path: Path) -> Manifest:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read manifest: {exc.strerror or exc}") from None
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise BundleError(f"{path}: not a complete manifest ({exc})") from None
    signed = re.search(r"(<machine_configuration>.*</machine_configuration>)\s*"
                       r"(<image>.*</image>)", text, re.S)
    if root.tag != "manifest" or signed is None:
        raise BundleError(f"{path}: not an EC2 bundle manifest")
    parts = [Part(int(p.get("index", "-1")), _find(p, "filename", path),
                  _find(p, "digest", path)) for p in root.findall("image/parts/part")]
    count = int(root.find("image/parts").get("count", "-1"))  # type: ignore[union-attr]
    if count != len(parts) or [p.index for p in parts] != list(range(count)):
        raise BundleError(f"{path}: the manifest lists {len(parts)} parts, expected {count}")
    return Manifest(path=path, signed_text=signed.group(1) + signed.group(2),
                    signature=_find(root, "signature", path),
                    image_name=_find(root, "image/name", path),
                    digest=_find(root, "image/digest", path),
                    size=int(_find(root, "image/size", path)),
                    user_key=_find(root, "image/user_encrypted_key", path),
                    user_iv=_find(root, "image/user_encrypted_iv", path), parts=parts)


def verify_signature(manifest: Manifest, key: rsa.RSAPrivateKey) -> None:
    try:
        key.public_key().verify(bytes.fromhex(manifest.signature),
                                manifest.signed_text.encode(), asym.PKCS1v15(), hashes.SHA1())
    except (InvalidSignature, ValueError):
        raise BundleError(f"{manifest.path}: the signature does not match: the manifest was "
                          "changed, or it was signed with another key than --user-key") from None


def _decrypt_field(value: str, key: rsa.RSAPrivateKey, what: str) -> bytes:
    try:
        return bytes.fromhex(key.decrypt(bytes.fromhex(value), asym.PKCS1v15()).decode())
    except ValueError:
        raise BundleError(f"cannot decrypt the bundle's {what} with --user-key "
                          "(is it the key the bundle was made for?)") from None


def _verified_parts(manifest: Manifest) -> Iterator[bytes]:
    for part in manifest.parts:
        path = manifest.path.parent / part.filename
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"part {part.index} ({part.filename}): cannot read: "
                              f"{exc.strerror or exc}") from None
        if hashlib.sha1(data).hexdigest() != part.digest:
            raise BundleError(f"part {part.index} ({part.filename}): SHA-1 digest does not "
                              "match the manifest (the part is damaged or was changed)")
        yield data


def _plain_stream(manifest: Manifest, key: bytes, iv: bytes,
                  digest: hashlib._Hash) -> Iterator[bytes]:
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    inflater = zlib.decompressobj(31)
    try:
        for data in _verified_parts(manifest):
            plain = inflater.decompress(unpadder.update(decryptor.update(data)))
            digest.update(plain)
            yield plain
        tail = unpadder.update(decryptor.finalize()) + unpadder.finalize()
        plain = inflater.decompress(tail) + inflater.flush()
    except (ValueError, zlib.error) as exc:
        raise BundleError(f"the bundle does not decrypt or decompress cleanly ({exc})") from None
    digest.update(plain)
    yield plain


class _Reader:
    """Exact-size reads from a stream of byte pieces."""

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

    def drain(self) -> bytes:
        rest = bytes(self._buffer) + b"".join(self._pieces)
        self._buffer.clear()
        return rest


def _number(field: bytes) -> int:
    text = field.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def _sparse_member(reader: _Reader) -> tuple[str, int, list[tuple[int, int]]]:
    header = reader.read(BLOCK)
    stored_sum = _number(header[148:156])
    if stored_sum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
        raise BundleError("the image archive's header checksum is wrong")
    name = header[:100].split(b"\0")[0].decode()
    if header[156:157] != b"S":
        raise BundleError(f"the image archive member {name!r} is not a GNU sparse file")
    entries = [(_number(header[386 + i * 24:398 + i * 24]),
                _number(header[398 + i * 24:410 + i * 24])) for i in range(4)]
    extended, size = header[482], _number(header[483:495])
    while extended:
        block = reader.read(BLOCK)
        entries += [(_number(block[i * 24:i * 24 + 12]), _number(block[i * 24 + 12:i * 24 + 24]))
                    for i in range(21)]
        extended = block[504]
    return name, size, [(o, n) for o, n in entries if n]


def _restore(reader: _Reader, target: Path) -> tuple[str, int]:
    name, size, regions = _sparse_member(reader)
    stored = 0
    with open(target, "wb") as handle:
        for offset, length in regions:
            handle.seek(offset)
            for position in range(0, length, READ):
                handle.write(reader.read(min(READ, length - position)))
            stored += length
        handle.truncate(size)
    reader.read(-stored % BLOCK)
    if reader.drain().strip(b"\0"):
        raise BundleError("the image archive holds more than one member")
    return name, size


def unbundle(manifest_path: Path, user_key: Path, output: Path | None = None) -> Path:
    manifest = read_manifest(manifest_path)
    key = load_private_key(user_key)
    verify_signature(manifest, key)
    aes_key = _decrypt_field(manifest.user_key, key, "key")
    aes_iv = _decrypt_field(manifest.user_iv, key, "iv")
    digest = hashlib.sha1()
    reader = _Reader(_plain_stream(manifest, aes_key, aes_iv, digest))
    partial = None
    try:
        probe = output or Path.cwd() / "image.raw"
        partial = probe.with_name(f".{probe.name}.partial")
        name, size = _restore(reader, partial)
        target = output or Path.cwd() / Path(name).name
        if digest.hexdigest() != manifest.digest:
            raise BundleError("the image digest does not match the manifest")
        if size != manifest.size:
            raise BundleError(f"the image is {size} bytes, the manifest says {manifest.size}")
        os.replace(partial, target)
        return target
    finally:
        if partial is not None:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
