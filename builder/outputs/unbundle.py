"""Read an instance-store bundle back: verify the manifest's signature and every digest,
decrypt, decompress, and restore the image byte for byte (sparse). The inverse of
:mod:`builder.outputs.bundle`.

A bundle may come from a stranger, so nothing in it is trusted before it is checked:

- the fields used (parts, digests, size, key, iv) are parsed from exactly the bytes the
  signature covers, and the manifest may hold no comments, processing instructions, DTDs,
  CDATA or repeated elements (so a second ``<image >`` cannot hide behind the signed one);
- every number and name is checked against a pattern and a bound before it is used;
- memory stays bounded (decompression is fed at most 1 MiB at a time, never the whole
  output of a part), and the restored image can be no larger than the signed size;
- the manifest never picks a path: parts are plain file names beside the manifest, opened
  without following links, and the output is the caller's ``-o`` (default: the manifest's
  prefix + ``.raw`` in the current folder), written to a new temporary file and never
  replacing an existing file without ``force``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
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

from builder.errors import InputError
from builder.host.fsutil import read_regular_file
from builder.outputs.bundle import PART_SIZE, load_private_key
from builder.outputs.sparsetar import READ, BundleError, Reader, restore

__all__ = ["BundleError", "unbundle"]

MAX_MANIFEST = 1 << 20
MAX_IMAGE = 10 << 30           # AWS: instance-store root volumes are at most 10 GiB
MAX_PARTS = MAX_IMAGE // PART_SIZE + 64
MAX_TAR_OVERHEAD = 64 << 20    # headers and sparse maps around the image's data
MAX_XML_DEPTH = 8              # manifest > image > parts > part > digest is 4

_DECLARATION = re.compile(r'\A<\?xml version="1\.0"( encoding="UTF-8")?\?>\s*')
_HEX40 = re.compile(r"\A[0-9a-f]{40}\Z")
_HEX = re.compile(r"\A(?:[0-9a-f]{2}){1,2048}\Z")
_NUMBER = re.compile(r"\A[0-9]{1,12}\Z")
_FILE_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9._-]{0,254}\Z")
# the manifest's top-level elements, in order; each exactly once
_TOP = ("version", "bundler", "machine_configuration", "image", "signature")
_REPEATED = {"part", "mapping", "product_code"}


@dataclass(frozen=True)
class Part:
    index: int
    filename: str
    digest: str


@dataclass(frozen=True)
class SignedManifest:
    """The manifest's signed text and signature, structure already checked."""

    path: Path
    signed_text: str
    signature: str


@dataclass(frozen=True)
class Manifest:
    """The fields of a verified manifest, parsed from its signed text alone."""

    path: Path
    digest: str
    size: int
    user_key: str
    user_iv: str
    parts: list[Part]


# --- the manifest --------------------------------------------------------------------------

def _read_bounded(path: Path, limit: int, what: str, follow_links: bool = False) -> bytes:
    return read_regular_file(path, limit, f"{path}: {what}", BundleError, follow_links)


def _element(text: str, path: Path) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise BundleError(f"{path}: not a well-formed manifest ({exc})") from None


def _check_unique_children(root: ElementTree.Element, path: Path) -> None:
    """No element repeats where the format has one, and nothing is nested deeper than the
    format nests (walked without recursion: the document is a stranger's)."""
    pending = [(root, 0)]
    while pending:
        element, depth = pending.pop()
        if depth > MAX_XML_DEPTH:
            raise BundleError(f"{path}: the manifest is nested deeper than the format allows")
        seen: set[str] = set()
        for child in element:
            if child.tag in seen and child.tag not in _REPEATED:
                raise BundleError(f"{path}: the manifest repeats <{child.tag}>")
            seen.add(child.tag)
            pending.append((child, depth + 1))


def _signed_region(text: str, path: Path) -> str:
    """``<machine_configuration>…</machine_configuration><image>…</image>``: each tag once."""
    for tag in ("machine_configuration", "image"):
        if len(re.findall(rf"<{tag}[\s/>]", text)) != 1 or text.count(f"<{tag}>") != 1 \
                or text.count(f"</{tag}>") != 1:
            raise BundleError(f"{path}: the manifest must hold exactly one <{tag}>")
    match = re.search(r"(<machine_configuration>.*</machine_configuration>)\s*"
                      r"(<image>.*</image>)", text, re.S)
    if match is None:
        raise BundleError(f"{path}: <machine_configuration> must come right before <image>")
    return match.group(1) + match.group(2)


def read_manifest(path: Path) -> SignedManifest:
    """The signed text and signature of a manifest whose structure is as ec2-bundle-image
    writes it; anything else (comments, DTDs, repeated or unknown elements) is refused."""
    try:
        text = _read_bounded(path, MAX_MANIFEST, "the manifest", True).decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{path}: the manifest is not UTF-8 text") from None
    body = _DECLARATION.sub("", text, count=1)
    for marker, what in (("<!", "comments, DTDs or CDATA"), ("<?", "processing instructions")):
        if marker in body:
            raise BundleError(f"{path}: the manifest may not hold {what}")
    root = _element(body, path)
    if root.tag != "manifest" or tuple(child.tag for child in root) != _TOP:
        raise BundleError(f"{path}: not an EC2 bundle manifest (expected <manifest> holding "
                          f"{', '.join(f'<{t}>' for t in _TOP)} in that order)")
    _check_unique_children(root, path)
    signature = (root.findtext("signature") or "").strip()
    if not _HEX.match(signature):
        raise BundleError(f"{path}: the signature is not hex")
    return SignedManifest(path, _signed_region(body, path), signature)


def verify_signature(manifest: SignedManifest, key: rsa.RSAPrivateKey) -> None:
    try:
        key.public_key().verify(bytes.fromhex(manifest.signature),
                                manifest.signed_text.encode(), asym.PKCS1v15(), hashes.SHA1())
    except (InvalidSignature, ValueError):
        raise BundleError(f"{manifest.path}: the signature does not match: the manifest was "
                          "changed, or it was signed with another key than --user-key") from None


def _field(image: ElementTree.Element, name: str, pattern: re.Pattern[str], path: Path) -> str:
    value = (image.findtext(name) or "").strip()
    if not pattern.match(value):
        raise BundleError(f"{path}: the manifest's {name} is missing or malformed")
    return value


def _number(value: str | None, what: str, low: int, high: int, path: Path) -> int:
    if value is None or not _NUMBER.match(value.strip()):
        raise BundleError(f"{path}: the manifest's {what} is not a number")
    number = int(value)
    if not low <= number <= high:
        raise BundleError(f"{path}: the manifest's {what} ({number}) is not in {low}..{high}")
    return number


def parse_signed(manifest: SignedManifest) -> Manifest:
    """The fields amiforge uses, from the signed text alone (after the signature held)."""
    path = manifest.path
    image = _element(f"<signed>{manifest.signed_text}</signed>", path).find("image")
    assert image is not None  # _signed_region found it
    parts_element = image.find("parts")
    if parts_element is None:
        raise BundleError(f"{path}: the manifest lists no parts")
    count = _number(parts_element.get("count"), "part count", 1, MAX_PARTS, path)
    parts = []
    for position, element in enumerate(parts_element):
        index = _number(element.get("index"), "part index", 0, MAX_PARTS, path)
        filename = _field(element, "filename", _FILE_NAME, path)
        if index != position or filename in {p.filename for p in parts}:
            raise BundleError(f"{path}: the parts must be listed once each, in order")
        parts.append(Part(index, filename, _field(element, "digest", _HEX40, path)))
    if len(parts) != count:
        raise BundleError(f"{path}: the manifest lists {len(parts)} parts, expected {count}")
    return Manifest(path=path, digest=_field(image, "digest", _HEX40, path),
                    size=_number(image.findtext("size"), "image size", 1, MAX_IMAGE, path),
                    user_key=_field(image, "user_encrypted_key", _HEX, path),
                    user_iv=_field(image, "user_encrypted_iv", _HEX, path), parts=parts)


def _decrypt_field(value: str, key: rsa.RSAPrivateKey, what: str) -> bytes:
    try:
        plain = bytes.fromhex(key.decrypt(bytes.fromhex(value), asym.PKCS1v15()).decode())
    except ValueError:
        plain = b""
    if len(plain) != 16:
        raise BundleError(f"cannot decrypt the bundle's {what} with --user-key "
                          "(is it the key the bundle was made for?)")
    return plain


# --- the data stream ---------------------------------------------------------------------

def _verified_parts(manifest: Manifest) -> Iterator[bytes]:
    for part in manifest.parts:
        data = _read_bounded(manifest.path.parent / part.filename, PART_SIZE,
                             f"part {part.index}")
        if hashlib.sha1(data).hexdigest() != part.digest:
            raise BundleError(f"part {part.index} ({part.filename}): SHA-1 digest does not "
                              "match the manifest (the part is damaged or was changed)")
        yield data


def _inflate(inflater: zlib._Decompress, data: bytes) -> Iterator[bytes]:
    """Decompress ``data`` at most READ bytes at a time (a small part can inflate to GiBs)."""
    while data:
        if inflater.eof:
            raise BundleError("the image archive has data after its end")
        yield inflater.decompress(data, READ)
        data = inflater.unconsumed_tail


def _plain_stream(manifest: Manifest, key: bytes, iv: bytes,
                  digest: hashlib._Hash) -> Iterator[bytes]:
    """The tar stream, hashed as it goes; never more than the signed size allows."""
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    inflater = zlib.decompressobj(31)
    limit, total = manifest.size + MAX_TAR_OVERHEAD, 0
    try:
        for data in _verified_parts(manifest):
            for plain in _inflate(inflater, unpadder.update(decryptor.update(data))):
                total += len(plain)
                if total > limit:
                    raise BundleError("the image archive is larger than the manifest says")
                digest.update(plain)
                yield plain
        tail = unpadder.update(decryptor.finalize()) + unpadder.finalize()
        for plain in _inflate(inflater, tail):
            digest.update(plain)
            yield plain
        rest = inflater.flush()
    except (ValueError, zlib.error) as exc:
        raise BundleError(f"the bundle does not decrypt or decompress cleanly ({exc})") from None
    if not inflater.eof or inflater.unused_data:
        raise BundleError("the image archive is truncated or has data after its end")
    digest.update(rest)
    yield rest


# --- the whole ---------------------------------------------------------------------------

def default_output(manifest_path: Path) -> Path:
    """The bundle's prefix (from the manifest's file name, not its content) + ``.raw``."""
    return Path.cwd() / (manifest_path.name.removesuffix(".manifest.xml") + ".raw")


def unbundle(manifest_path: Path, user_key: Path, output: Path | None = None,
             force: bool = False) -> Path:
    target = output or default_output(manifest_path)
    if (target.exists() or target.is_symlink()) and not force:
        raise InputError(f"{target}: already exists (pass --force to replace it)")
    if target.is_dir():
        raise InputError(f"{target}: is a folder")
    signed = read_manifest(manifest_path)
    key = load_private_key(user_key)
    verify_signature(signed, key)
    manifest = parse_signed(signed)
    aes_key = _decrypt_field(manifest.user_key, key, "key")
    aes_iv = _decrypt_field(manifest.user_iv, key, "iv")
    digest = hashlib.sha1()
    reader = Reader(_plain_stream(manifest, aes_key, aes_iv, digest))
    try:
        fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial",
                                       dir=target.parent)
    except OSError as exc:
        raise InputError(f"{target}: cannot write there: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            size = restore(reader, handle, manifest.size)
        if digest.hexdigest() != manifest.digest:
            raise BundleError("the image digest does not match the manifest")
        if size != manifest.size:
            raise BundleError(f"the image is {size} bytes, the manifest says {manifest.size}")
        os.chmod(partial, 0o644)
        _place(Path(partial), target, force)
        return target
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def _place(partial: Path, target: Path, force: bool) -> None:
    if force:
        os.replace(partial, target)
        return
    try:
        os.link(partial, target)  # fails if anything appeared at target meanwhile
    except FileExistsError:
        raise InputError(f"{target}: already exists (pass --force to replace it)") from None
