"""build diff's pure parts: what differs between two releases, and how it is shown."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from builder.diff.compare import compare, compare_files, compare_packages
from builder.diff.guest import FileEntry, parse_sha256sum
from builder.diff.release import Release, checked_format, load_release
from builder.diff.render import markdown, text
from builder.errors import InputError


def pkg(name: str, version: str, arch: str = "amd64") -> dict[str, str]:
    return {"name": name, "version": version, "architecture": arch}


def by_key(*packages: dict[str, str]) -> dict[str, dict[str, str]]:
    return {f"{p['name']}:{p['architecture']}": p for p in packages}


def test_packages_added_removed_upgraded_in_debian_version_order() -> None:
    a = by_key(pkg("curl", "8.14.1-2"), pkg("libssl3t64", "3.5.1-1"), pkg("vim", "2:9.1-1"))
    b = by_key(pkg("curl", "8.14.1-2"), pkg("libssl3t64", "3.5.10-1"), pkg("nginx", "1.26-3"),
               pkg("vim", "2:9.0-1"))
    changes = compare_packages(a, b)
    assert [p["name"] for p in changes["added"]] == ["nginx"]
    assert changes["removed"] == []
    # 3.5.10 is newer than 3.5.1 (not as strings); an epoch counts first
    assert changes["upgraded"] == [{"name": "libssl3t64", "architecture": "amd64",
                                    "a": "3.5.1-1", "b": "3.5.10-1"}]
    assert [p["name"] for p in changes["downgraded"]] == ["vim"]


def entry(**changes: object) -> FileEntry:
    base = {"kind": "file", "mode": 0o644, "uid": 0, "gid": 0, "size": 5, "sha256": "a" * 64,
            "target": None}
    return FileEntry(**{**base, **changes})


def test_files_added_removed_and_what_changed() -> None:
    a = {"/etc": entry(kind="dir", mode=0o755, size=4096, sha256=None),
         "/etc/motd": entry(), "/etc/old": entry()}
    b = {"/etc": entry(kind="dir", mode=0o755, size=8192, sha256=None),  # not a change
         "/etc/motd": entry(size=7, sha256="b" * 64, mode=0o600), "/usr/sbin/nginx": entry()}
    files = compare_files(a, b)
    assert [e["path"] for e in files["added"]] == ["/usr/sbin/nginx"]
    assert [e["path"] for e in files["removed"]] == ["/etc/old"]
    assert files["changed"] == [{"path": "/etc/motd", "changes": {
        "mode": ["0644", "0600"], "size": [5, 7], "sha256": ["a" * 64, "b" * 64]}}]


def release(label: str, **fields: object) -> Release:
    return Release(label, Path("/nonexistent.raw"), "raw", **fields)


def manifest(sha: str, size: int = 1 << 31) -> dict:
    return {"artifacts": [{"format": "raw", "sha256": sha, "virtual_size": size,
                           "allocated_size": 100}], "packages": []}


def test_equal_releases_and_the_ami_s_attributes() -> None:
    request = {"Name": "r-1", "BootMode": "uefi", "BlockDeviceMappings": [
        {"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 2}}]}
    a = release("a", name="r-1", manifest=manifest("x"), request=request, files={},
                packages=by_key(pkg("linux-image-6.12.57+deb13-cloud-amd64", "6.12.57-1")))
    same = compare(a, a)
    assert same.equal and "no difference" in text(same)
    changed = {**request, "Name": "r-2", "BlockDeviceMappings": [
        {"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 4}},
        {"DeviceName": "/dev/sdb", "VirtualName": "ephemeral0"}]}
    b = release("b", name="r-2", manifest=manifest("y", 1 << 32), request=changed, files={},
                packages=by_key(pkg("linux-image-6.12.58+deb13-cloud-amd64", "6.12.58-1")))
    diff = compare(a, b)
    assert not diff.equal
    assert diff.ami == [{"field": "Name", "a": "r-1", "b": "r-2"}]
    assert [d["device"] for d in diff.block_devices] == ["/dev/sdb", "/dev/xvda"]
    assert diff.kernel == {"a": ["linux-image-6.12.57+deb13-cloud-amd64 6.12.57-1"],
                           "b": ["linux-image-6.12.58+deb13-cloud-amd64 6.12.58-1"]}
    assert diff.sizes == [{"field": "disk_size", "a": 1 << 31, "b": 1 << 32}]
    shown = text(diff)
    assert "2.0 GiB" in shown and "4.0 GiB" in shown and "Kernel" in shown
    assert json.loads(json.dumps(diff.to_dict()))["equal"] is False


def test_markdown_cells_cannot_break_the_table_or_carry_html() -> None:
    a = release("a", files={}, manifest=manifest("x"))
    b = release("b", files={"/etc/a|b\n<script>": entry()}, manifest=manifest("x"))
    notes = markdown(compare(a, b))
    row = next(line for line in notes.splitlines() if "script" in line)
    assert row.count(" | ") == 2 and "<script>" not in notes and "\\|" in row


def test_sha256sum_output_with_escaped_names() -> None:
    sums = parse_sha256sum("a" * 64 + "  ./etc/motd\n\\" + "b" * 64 +
                           "  ./odd\\nname\\\\x\\ry\n")
    assert sums == {"/etc/motd": "a" * 64, "/odd\nname\\x\ry": "b" * 64}


def test_text_shows_control_characters_as_escapes() -> None:
    a = release("a", files={}, manifest=manifest("x"))
    b = release("b", files={"/etc/\x1b[2Kforged\nline": entry()}, manifest=manifest("x"))
    shown = text(compare(a, b))
    assert "\x1b" not in shown and "\\x1b[2Kforged\\x0aline" in shown


def test_images_with_a_backing_file_or_another_format_are_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    child = tmp_path / "child.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(child)], check=True)
    with pytest.raises(InputError, match="backing file"):
        checked_format(child)
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "1M"], check=True)
    with pytest.raises(InputError, match="vmdk"):
        checked_format(vmdk)
    assert checked_format(base) == "raw"
    external = tmp_path / "external.qcow2"  # its data lives in another file of the host
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={base},data_file_raw=on", str(external), "1M"], check=True)
    with pytest.raises(InputError, match="external data file"):
        checked_format(external)
    disguised = tmp_path / "disk.raw"  # a *.raw file is read as raw, never probed
    disguised.write_bytes(child.read_bytes())
    assert checked_format(disguised) == "raw"
    link = tmp_path / "link.raw"
    link.symlink_to(base)
    with pytest.raises(InputError, match="not a regular file"):
        checked_format(link)


def test_an_output_directory_must_hold_its_manifest_and_image(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"build-manifest\.json: not found"):
        load_release(tmp_path)
    (tmp_path / "build-manifest.json").write_text(json.dumps({
        "packages": [], "artifacts": [{"format": "raw", "path": "../../etc/passwd"}]}))
    with pytest.raises(InputError, match="raw image"):
        load_release(tmp_path / "build-manifest.json")
    with pytest.raises(InputError, match="no such output directory"):
        load_release(tmp_path / "missing")
    for broken in ({"packages": [], "artifacts": ["x"]},
                   {"packages": [], "artifacts": [{"format": "raw", "path": "disk.raw"}]}):
        (tmp_path / "disk.raw").write_bytes(bytes(512))
        (tmp_path / "build-manifest.json").write_text(json.dumps(broken))
        with pytest.raises(InputError, match="build-manifest"):
            load_release(tmp_path)
