"""Instance-store bundles: golden manifest, round trip, plain tools, and tampering."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from builder.errors import InputError
from builder.outputs.bundle import BundleKeys, bundle_image, gnu_sparse_headers
from builder.outputs.unbundle import BundleError, unbundle
from tests.unit.conftest import key_pair

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "bundle" / "image.manifest.xml"
KEY, IV = bytes(range(16)), bytes(range(16, 32))


def sparse_image(path: Path, size: int = 24 << 20) -> Path:
    """A sparse test image: data regions, an allocated all-zero region, and holes."""
    with open(path, "wb") as handle:
        handle.truncate(size)
        handle.seek(0)
        handle.write(bytes(range(256)) * 4096)                         # 1 MiB of pattern
        handle.seek(5 << 20)
        handle.write(b"amiforge" * 300_000)                            # ~2.3 MiB
        handle.seek(9 << 20)
        handle.write(bytes(1 << 20))                                   # allocated zeros
        handle.seek(12 << 20)
        handle.write(bytes((i * 7919) % 251 for i in range(3 << 20)))  # 3 MiB
        for i in range(30):                                            # many small regions
            handle.seek((16 << 20) + i * 65536)
            handle.write(b"x" * 100)
    return path


def normalized(text: str) -> str:
    """The manifest with its RSA-encrypted fields and signature masked: PKCS#1 v1.5
    encryption is randomized by design, so these differ on every run."""
    for tag in ("ec2_encrypted_key", "user_encrypted_key", "ec2_encrypted_iv",
                "user_encrypted_iv", "signature"):
        text = re.sub(f"(<{tag}[^>]*>)[0-9a-f]+(</{tag}>)", r"\1MASKED\2", text)
    return text


@pytest.fixture
def bundled(tmp_path: Path, keys, plan):
    image = sparse_image(tmp_path / "disk.raw")
    result = bundle_image(image, tmp_path / "bundle", keys[0], plan, key=KEY, iv=IV,
                          member="disk.raw")
    return image, result


def test_manifest_matches_golden(bundled) -> None:
    _, result = bundled
    text = normalized(result.manifest.read_text())
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_encrypted_fields_hold_key_and_iv(bundled, keys) -> None:
    _, result = bundled
    _, user_private, ec2_private = keys
    text = result.manifest.read_text()
    for who, private in (("user", user_private), ("ec2", ec2_private)):
        for what, value in (("key", KEY), ("iv", IV)):
            found = re.search(f"<{who}_encrypted_{what}[^>]*>([0-9a-f]+)<", text).group(1)
            plain = private.decrypt(bytes.fromhex(found), padding.PKCS1v15())
            assert plain == value.hex().encode()  # 32 hex characters, as ec2-ami-tools


def test_signature_covers_machine_configuration_and_image(bundled, keys) -> None:
    _, result = bundled
    text = result.manifest.read_text()
    signed = re.search(r"(<machine_configuration>.*</image>)", text).group(1)
    signature = re.search(r"<signature>([0-9a-f]+)</signature>", text).group(1)
    keys[1].public_key().verify(bytes.fromhex(signature), signed.encode(),
                                padding.PKCS1v15(), hashes.SHA1())


def test_round_trip(bundled, keys, tmp_path: Path) -> None:
    image, result = bundled
    restored = unbundle(result.manifest, keys[0].user_key, tmp_path / "restored.raw")
    assert restored.read_bytes() == image.read_bytes()
    assert os.stat(restored).st_blocks < os.stat(image).st_blocks + 8  # restored sparse


def test_plain_tools_read_the_bundle(bundled, tmp_path: Path) -> None:
    """openssl | gunzip | tar, the tools ec2-unbundle uses, restore the same image."""
    image, result = bundled
    parts = sorted(result.manifest.parent.glob("image.part.*"))
    assert [p.name for p in parts] == result.parts
    encrypted = b"".join(p.read_bytes() for p in parts)
    extract = tmp_path / "plain"
    extract.mkdir()
    pipeline = (f"openssl enc -d -aes-128-cbc -K {KEY.hex()} -iv {IV.hex()} | gunzip | "
                f"tar -x -S -C {extract}")
    subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], input=encrypted, check=True)
    assert [p.name for p in extract.iterdir()] == ["disk.raw"]
    assert (extract / "disk.raw").read_bytes() == image.read_bytes()


def test_parts_are_10_mib(tmp_path: Path, keys, plan) -> None:
    image = tmp_path / "random.raw"
    image.write_bytes(os.urandom(25 << 20))  # incompressible: 3 parts
    result = bundle_image(image, tmp_path / "b", keys[0], plan, key=KEY, iv=IV)
    sizes = [(tmp_path / "b" / name).stat().st_size for name in result.parts]
    assert result.parts == ["image.part.0", "image.part.1", "image.part.2"]
    assert sizes[:2] == [10 << 20, 10 << 20] and sum(sizes) == result.bundled_size


def test_many_sparse_regions_use_extension_headers() -> None:
    regions = [(i * 8192, 4096) for i in range(30)]
    headers = gnu_sparse_headers("disk.raw", 1 << 20, regions)
    assert len(headers) == 512 * 3  # 4 in the header, 21 + 6 (+ end marker) in two blocks
    assert headers[482] == 1


def test_tampered_part_names_the_part(bundled, keys, tmp_path: Path) -> None:
    _, result = bundled
    part = result.manifest.parent / result.parts[0]
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"part 0 \(image.part.0\): SHA-1 digest does not"):
        unbundle(result.manifest, keys[0].user_key, tmp_path / "x.raw")
    assert not (tmp_path / "x.raw").exists()
    assert not list(tmp_path.glob(".x.raw*"))


def test_wrong_key(bundled, tmp_path: Path) -> None:
    _, result = bundled
    _, other_key, _ = key_pair(tmp_path, "other")
    with pytest.raises(BundleError, match="signature does not match"):
        unbundle(result.manifest, other_key, tmp_path / "x.raw")


def test_truncated_manifest(bundled, keys, tmp_path: Path) -> None:
    _, result = bundled
    text = result.manifest.read_text()
    result.manifest.write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match="not a well-formed manifest"):
        unbundle(result.manifest, keys[0].user_key, tmp_path / "x.raw")


def test_changed_manifest_fails_signature(bundled, keys, tmp_path: Path) -> None:
    _, result = bundled
    text = result.manifest.read_text().replace("<user>123456789012</user>",
                                               "<user>999999999999</user>")
    result.manifest.write_text(text)
    with pytest.raises(BundleError, match="signature does not match"):
        unbundle(result.manifest, keys[0].user_key, tmp_path / "x.raw")


def test_missing_certificate_is_a_clear_error(keys, tmp_path: Path) -> None:
    broken = BundleKeys(tmp_path / "nope.pem", keys[0].user_key, keys[0].ec2_cert,
                        "123456789012")
    with pytest.raises(InputError, match=r"--user-cert .*nope.pem: cannot read"):
        broken.check()
    not_a_cert = tmp_path / "junk.pem"
    not_a_cert.write_text("junk")
    with pytest.raises(InputError, match=r"not a PEM X\.509 certificate"):
        BundleKeys(not_a_cert, keys[0].user_key, keys[0].ec2_cert, "123456789012").check()
    with pytest.raises(InputError, match="12 digits"):
        BundleKeys(keys[0].user_cert, keys[0].user_key, keys[0].ec2_cert, "123").check()



def test_sizes_of_8_gib_and_more_use_gnu_base_256(tmp_path: Path) -> None:
    """A 12-byte tar field holds 11 octal digits (< 8 GiB); instance-store images may be
    10 GiB. GNU tar writes larger numbers in base-256: Python's tarfile reads them back."""
    import tarfile

    size = 10 << 30
    headers = gnu_sparse_headers("disk.raw", size, [(0, 512), (size - 512, 512)])
    assert len(headers) == 512
    (tmp_path / "a.tar").write_bytes(headers + b"x" * 1024 + bytes(1024))
    with tarfile.open(tmp_path / "a.tar") as archive:
        (member,) = archive.getmembers()
    assert member.size == size
    assert [s for s in member.sparse if s[1]] == [(0, 512), (size - 512, 512)]
