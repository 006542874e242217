"""Bundles from strangers: forged, malformed, oversized or planted bundles fail with exit 2
and write nothing; only a bundle that restores the original image exits 0."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.cli import main
from builder.outputs.bundle import (
    bundle_image,
    encrypt_key_material,
    gnu_sparse_headers,
    image_xml,
    machine_configuration_xml,
    manifest_xml,
    sign,
)
from tests.unit.test_bundle import IV, KEY

SIGNED = re.compile(r"<machine_configuration>.*</image>", re.S)


def small_image(path: Path) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(3 << 20)
        handle.write(bytes(range(256)) * 64)
        handle.seek(2 << 20)
        handle.write(b"amiforge" * 1000)
    return path


@pytest.fixture(scope="module")
def genuine(tmp_path_factory, keys, plan):
    folder = tmp_path_factory.mktemp("genuine")
    image = small_image(folder / "disk.raw")
    result = bundle_image(image, folder / "bundle", keys[0], plan, key=KEY, iv=IV)
    return image, result.manifest.parent


def unbundle_cli(manifest: Path, key: Path, *extra: str) -> int:
    return main(["unbundle", str(manifest), "--user-key", str(key), *extra])


def resign(text: str, private) -> str:
    """A manifest whose signed region was changed, signed again with the user's own key:
    what an attacker who has that key could make (tests of everything past the signature)."""
    signed = SIGNED.search(text).group(0)
    return re.sub(r"<signature>[0-9a-f]*</signature>",
                  f"<signature>{sign(signed, private)}</signature>", text)


def copy_bundle(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target / "image.manifest.xml"


def outputs(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --- forged manifests --------------------------------------------------------------------

def test_signed_text_in_a_comment_does_not_vouch_for_another_image(genuine, keys, tmp_path,
                                                                    capsys) -> None:
    _, bundle = genuine
    manifest = copy_bundle(bundle, tmp_path / "b")
    text = manifest.read_text()
    signed = SIGNED.search(text).group(0)
    evil_image = re.search(r"<image>.*</image>", signed, re.S).group(0)
    evil_image = evil_image.replace("<image>", "<image >").replace("<size>", "<size>1")
    forged = text.replace(signed, f"<!--{signed}-->"
                          + signed.split("<image>")[0] + evil_image)
    manifest.write_text(forged)
    out = tmp_path / "out"
    out.mkdir()
    assert unbundle_cli(manifest, keys[0].user_key, "-o", str(out / "x.raw")) == 2
    assert "may not hold comments" in capsys.readouterr().err
    assert outputs(out) == []


def test_a_second_image_element_is_refused(genuine, keys, tmp_path, capsys) -> None:
    _, bundle = genuine
    manifest = copy_bundle(bundle, tmp_path / "b")
    text = manifest.read_text()
    image = re.search(r"<image>.*</image>", text, re.S).group(0)
    manifest.write_text(text.replace("</image>", "</image>" + image.replace("<image>",
                                                                             "<image >"), 1))
    out = tmp_path / "out"
    out.mkdir()
    assert unbundle_cli(manifest, keys[0].user_key, "-o", str(out / "x.raw")) == 2
    assert "error:" in capsys.readouterr().err
    assert outputs(out) == []


@pytest.mark.parametrize("change, message", [
    (lambda t: t.replace('<parts count="1">', '<parts count="7">'), "lists 1 parts, expected 7"),
    (lambda t: t.replace('<parts count="1">', '<parts count="99999999999999">'),
     "part count is not a number"),
    (lambda t: t.replace('index="0"', 'index="-1"'), "part index is not a number"),
    (lambda t: re.sub(r"<size>\d+</size>", "<size>" + "9" * 5000 + "</size>", t),
     "image size is not a number"),
    (lambda t: re.sub(r"<size>\d+</size>", "<size>99999999999</size>", t),
     r"image size \(99999999999\) is not in"),
    (lambda t: t.replace("<filename>image.part.0</filename>",
                         "<filename>../../etc/passwd</filename>"), "filename is missing"),
    (lambda t: t.replace("<filename>image.part.0</filename>",
                         "<filename>image.part.9</filename>"), "part 0: cannot read"),
    (lambda t: t.replace("<digest", "<digest", 1).replace('SHA1">', 'SHA1">zz', 1),
     "digest is missing or malformed"),
])
def test_malformed_signed_fields_are_one_line_errors(genuine, keys, tmp_path, capsys, change,
                                                     message) -> None:
    _, bundle = genuine
    manifest = copy_bundle(bundle, tmp_path / "b")
    manifest.write_text(resign(change(manifest.read_text()), keys[1]))
    assert unbundle_cli(manifest, keys[0].user_key, "-o", str(tmp_path / "x.raw")) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x.raw").exists()


@pytest.mark.parametrize("content", [b"\xff\xfe<manifest/>", b"<!DOCTYPE x [<!ENTITY a 'b'>]>"
                                     b"<manifest>&a;</manifest>", b"<?php ?><manifest/>", b""])
def test_malformed_manifests(tmp_path, keys, capsys, content) -> None:
    manifest = tmp_path / "m.manifest.xml"
    manifest.write_bytes(content)
    assert unbundle_cli(manifest, keys[0].user_key, "-o", str(tmp_path / "x.raw")) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_special_files_are_refused_before_reading(tmp_path, keys, capsys) -> None:
    fifo = tmp_path / "m.manifest.xml"
    os.mkfifo(fifo)
    assert unbundle_cli(fifo, keys[0].user_key, "-o", str(tmp_path / "x.raw")) == 2
    assert "not a regular file" in capsys.readouterr().err


# --- the data ----------------------------------------------------------------------------

def custom_bundle(folder: Path, keys, plan, compressed: bytes, size: int,
                  digest: str) -> Path:
    """A bundle of arbitrary compressed content, signed with the user's own key."""
    folder.mkdir()
    encryptor = Cipher(algorithms.AES(KEY), modes.CBC(IV)).encryptor()
    padder = padding.PKCS7(128).padder()
    data = encryptor.update(padder.update(compressed) + padder.finalize()) + \
        encryptor.finalize()
    (folder / "image.part.0").write_bytes(data)
    bundle_keys = keys[0]
    material = {"ec2_key": encrypt_key_material(KEY, bundle_keys.ec2_public()),
                "user_key": encrypt_key_material(KEY, bundle_keys.user_public()),
                "ec2_iv": encrypt_key_material(IV, bundle_keys.ec2_public()),
                "user_iv": encrypt_key_material(IV, bundle_keys.user_public())}
    machine = machine_configuration_xml(plan)
    image = image_xml("image", "123456789012", digest, size, len(data), material,
                      ["image.part.0"], [hashlib.sha1(data).hexdigest()])
    manifest = folder / "image.manifest.xml"
    manifest.write_text(manifest_xml(machine, image, sign(machine + image, keys[1])))
    return manifest


def gzip_of(pieces) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join(compressor.compress(p) for p in pieces) + compressor.flush()


def test_decompression_bomb_is_refused_with_bounded_memory(tmp_path, keys, plan) -> None:
    header = gnu_sparse_headers("disk.raw", 1 << 20, [(0, 1 << 20)])
    bomb = gzip_of([header, *(bytes(1 << 20) for _ in range(512))])  # 512 MiB of zeros
    assert len(bomb) < 1 << 20
    manifest = custom_bundle(tmp_path / "b", keys, plan, bomb, 1 << 20, "0" * 40)
    # VmHWM: this process's peak (ru_maxrss would include the forking pytest's).
    script = ("import re, sys\nfrom builder.cli import main\n"
              f"code = main(['unbundle', {str(manifest)!r}, '--user-key', "
              f"{str(keys[0].user_key)!r}, '-o', {str(tmp_path / 'x.raw')!r}])\n"
              "status = open('/proc/self/status').read()\n"
              "print(re.search(r'VmHWM:\\s*(\\d+)', status).group(1))\nsys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 2, result.stderr
    assert "larger than the manifest says" in result.stderr
    assert int(result.stdout) < 200_000  # KiB: the old reader needed ~700 MB for this
    assert not (tmp_path / "x.raw").exists()


@pytest.mark.parametrize("name", ["..", "", "a/b", "../../etc/passwd"])
def test_tar_member_names_must_be_plain(tmp_path, keys, plan, capsys, name) -> None:
    data = b"x" * 512
    tar = gnu_sparse_headers(name, 4096, [(0, 512)]) + data + bytes(1024)
    manifest = custom_bundle(tmp_path / "b", keys, plan, gzip_of([tar]), 4096,
                             hashlib.sha1(tar).hexdigest())
    assert unbundle_cli(manifest, keys[0].user_key, "-o", str(tmp_path / "x.raw")) == 2
    assert "member name is not a plain file name" in capsys.readouterr().err
    assert not (tmp_path / "x.raw").exists()


def test_sparse_map_beyond_the_file_is_refused(tmp_path, keys, plan, capsys) -> None:
    tar = gnu_sparse_headers("disk.raw", 4096, [(1 << 30, 512)]) + b"x" * 512 + bytes(1024)
    manifest = custom_bundle(tmp_path / "b", keys, plan, gzip_of([tar]), 4096,
                             hashlib.sha1(tar).hexdigest())
    assert unbundle_cli(manifest, keys[0].user_key, "-o", str(tmp_path / "x.raw")) == 2
    assert "sparse map" in capsys.readouterr().err


# --- where the output goes ---------------------------------------------------------------

def test_existing_output_is_not_replaced_without_force(genuine, keys, tmp_path, capsys,
                                                       monkeypatch) -> None:
    image, bundle = genuine
    monkeypatch.chdir(tmp_path)
    (tmp_path / "image.raw").write_text("keep me")
    assert unbundle_cli(bundle / "image.manifest.xml", keys[0].user_key) == 2
    assert "already exists (pass --force" in capsys.readouterr().err
    assert (tmp_path / "image.raw").read_text() == "keep me"
    assert unbundle_cli(bundle / "image.manifest.xml", keys[0].user_key, "--force") == 0
    assert (tmp_path / "image.raw").read_bytes() == image.read_bytes()


def test_planted_links_are_not_followed(genuine, keys, tmp_path, monkeypatch) -> None:
    image, bundle = genuine
    victim = tmp_path / "victim"
    victim.write_text("host file")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / ".image.raw.partial").symlink_to(victim)  # the old temporary name
    (work / "image.raw").symlink_to(victim)
    assert unbundle_cli(bundle / "image.manifest.xml", keys[0].user_key) == 2
    assert unbundle_cli(bundle / "image.manifest.xml", keys[0].user_key, "--force") == 0
    assert victim.read_text() == "host file"
    assert not (work / "image.raw").is_symlink()
    assert (work / "image.raw").read_bytes() == image.read_bytes()


def test_the_manifest_does_not_choose_the_output_name(genuine, keys, tmp_path,
                                                      monkeypatch) -> None:
    """The tar member is called disk.raw; the output is named after the manifest file."""
    _, bundle = genuine
    monkeypatch.chdir(tmp_path)
    assert unbundle_cli(bundle / "image.manifest.xml", keys[0].user_key) == 0
    assert outputs(tmp_path) == ["image.raw"]


# --- fuzz --------------------------------------------------------------------------------

MUTATIONS = st.one_of(
    st.tuples(st.just("manifest-flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("manifest-insert"), st.integers(0, 10**6),
              st.sampled_from(["<!-- x -->", "<image >", "</image>", "<?x?>", " ", "\n",
                               "&amp;", "<part index=\"1\">", "\x00", "é"])),
    st.tuples(st.just("manifest-cut"), st.integers(0, 10**6), st.integers(1, 400)),
    st.tuples(st.just("part-flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("part-cut"), st.integers(0, 10**6), st.just(0)),
)


def _mutate(data: bytes, kind: str, position: int, value) -> bytes:
    position %= max(len(data), 1)
    if kind.endswith("flip"):
        return data[:position] + bytes([data[position] ^ value]) + data[position + 1:]
    if kind.endswith("insert"):
        return data[:position] + value.encode() + data[position:]
    if kind == "manifest-cut":
        return data[:position] + data[position + value:]
    return data[:position]


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=MUTATIONS)
def test_fuzz_unbundle(genuine, keys, tmp_path_factory, mutation) -> None:
    """Exit 0 only when the restored image is the original; otherwise exit 2, nothing
    written."""
    image, bundle = genuine
    work = tmp_path_factory.mktemp("fuzz")
    manifest = copy_bundle(bundle, work / "b")
    kind, position, value = mutation
    target = manifest if kind.startswith("manifest") else manifest.parent / "image.part.0"
    target.write_bytes(_mutate(target.read_bytes(), kind, position, value))
    out = work / "out"
    out.mkdir()
    code = unbundle_cli(manifest, keys[0].user_key, "-o", str(out / "x.raw"))
    if code == 0:
        assert (out / "x.raw").read_bytes() == image.read_bytes()
    else:
        assert code == 2
        assert outputs(out) == []
    shutil.rmtree(work)


def test_deeply_nested_manifest_is_refused_before_the_signature(genuine, keys, tmp_path,
                                                                 capsys) -> None:
    _, bundle = genuine
    manifest = copy_bundle(bundle, tmp_path / "b")
    text = manifest.read_text().replace("<release>0</release>",
                                        "<release>0</release>" + "<a>" * 5000 + "</a>" * 5000)
    manifest.write_text(text)
    assert unbundle_cli(manifest, keys[0].user_key, "-o", str(tmp_path / "x.raw")) == 2
    assert "nested deeper" in capsys.readouterr().err


def test_endless_sparse_map_is_refused_with_bounded_memory(tmp_path, keys, plan,
                                                           capsys) -> None:
    """Extension blocks that all say "another follows", 10 GiB declared: refused after the
    longest map an image can need, without keeping what it read."""
    header = bytearray(gnu_sparse_headers("disk.raw", 10 << 30, [(0, 512)]))
    header[482] = 1
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
    endless = bytearray(512)
    endless[504] = 1
    stream = gzip_of([bytes(header), *(bytes(endless) * 2048 for _ in range(64))])
    manifest = custom_bundle(tmp_path / "b", keys, plan, stream, 10 << 30, "0" * 40)
    assert unbundle_cli(manifest, keys[0].user_key, "-o", str(tmp_path / "x.raw")) == 2
    assert "sparse map is longer than any image needs" in capsys.readouterr().err


@pytest.mark.parametrize("field", [b"-600", b"0o10_000", b"1_7"])
def test_tar_numbers_are_plain_octal(tmp_path, keys, plan, capsys, field) -> None:
    tar = bytearray(gnu_sparse_headers("disk.raw", 4096, [(0, 512)]))
    tar[398:410] = field.ljust(11, b"\0") + b"\0"
    tar[148:156] = b" " * 8
    tar[148:156] = f"{sum(tar[:512]):06o}".encode() + b"\0 "
    data = bytes(tar) + b"x" * 512 + bytes(1024)
    manifest = custom_bundle(tmp_path / "b", keys, plan, gzip_of([data]), 4096,
                             hashlib.sha1(data).hexdigest())
    assert unbundle_cli(manifest, keys[0].user_key, "-o", str(tmp_path / "x.raw")) == 2
    assert "malformed number" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["manifest-is-a-folder", "key-is-a-fifo"])
def test_special_files_as_arguments(genuine, keys, tmp_path, capsys, what) -> None:
    _, bundle = genuine
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    manifest, key = (tmp_path, keys[0].user_key) if what == "manifest-is-a-folder" else \
        (bundle / "image.manifest.xml", fifo)
    assert unbundle_cli(manifest, key, "-o", str(tmp_path / "x.raw")) == 2
    assert "not a regular file" in capsys.readouterr().err
