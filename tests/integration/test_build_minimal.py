"""Real builds of the default recipe: outputs, manifest, layout, and failure hygiene."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from builder.plan import sha256_file
from tests.conftest import ROOT, needs_root_tools, run_build

pytestmark = [pytest.mark.integration, needs_root_tools()]
RECIPE = "debian-13-minimal.yaml"  # the default


def test_outputs_and_manifest(build_recipe) -> None:
    built = build_recipe(RECIPE)
    names = sorted(p.name for p in built.output_dir.iterdir())
    assert names == ["build-manifest.json", "disk.qcow2", "disk.raw", "register-image.json",
                     "sbom.spdx.json", "snapshots.json"]
    manifest = built.manifest
    assert manifest["amiforge_version"]
    assert manifest["recipe"]["sha256"] == sha256_file(ROOT / "recipes" / RECIPE)
    by_format = {a["format"]: a for a in manifest["artifacts"]}
    assert set(by_format) == {"raw", "qcow2"}
    for artifact in by_format.values():
        path = built.output_dir / artifact["path"]
        assert artifact["sha256"] == sha256_file(path)
        assert artifact["file_size"] == path.stat().st_size
        assert artifact["virtual_size"] == 2 << 30
    raw = built.output_dir / "disk.raw"
    assert os.stat(raw).st_blocks * 512 < 700 << 20, "disk.raw should be sparse"
    assert set(manifest["timings"]) == {"bootstrap", "configure", "filesystem", "disk",
                                        "convert"}
    packages = {p["name"]: p for p in manifest["packages"]}
    assert {"openssh-server", "linux-image-cloud-amd64", "sudo", "systemd-sysv"} <= set(packages)
    assert packages["openssh-server"]["architecture"] == "amd64"
    assert "==> bootstrap" in built.stderr and "==> convert" in built.stderr
    assert [s["suite"] for s in manifest["archive"]] == [
        "trixie", "trixie-updates", "trixie-security"]
    assert all(s["date"].endswith("UTC") for s in manifest["archive"])


def test_partition_table_is_what_the_manifest_says(build_recipe) -> None:
    built = build_recipe(RECIPE)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(built.artifact("disk.raw"))],
                                      capture_output=True, check=True, text=True).stdout)
    found = [(int(p["start"]) * 512, int(p["size"]) * 512, p["type"], p["name"])
             for p in table["partitiontable"]["partitions"]]
    expected = [(p["start"], p["size"], p["type_guid"], p["name"])
                for p in built.manifest["partitions"]]
    assert found == expected
    assert [p["name"] for p in built.manifest["partitions"]] == ["bios-boot", "esp", "root"]
    assert table["partitiontable"]["label"] == "gpt"


def test_root_filesystem_uuid_matches_manifest(build_recipe, tmp_path: Path) -> None:
    built = build_recipe(RECIPE)
    root = built.manifest["partitions"][-1]
    blkid = subprocess.run(["blkid", "-p", "-O", str(root["start"]), "-o", "export",
                            str(built.artifact("disk.raw"))], capture_output=True, text=True)
    assert f"UUID={root['filesystem_uuid']}" in blkid.stdout
    assert "TYPE=ext4" in blkid.stdout


def _snapshot() -> tuple[str, str]:
    mounts = Path("/proc/mounts").read_text()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return mounts, loops


def test_failed_build_exits_1_with_tool_output_and_leaves_nothing(tmp_path: Path) -> None:
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: broken-image\nroot_volume:\n  packages: [no-such-package-xyz]\n")
    out = tmp_path / "out"
    before = _snapshot()
    result = run_build(str(recipe), "--output-dir", str(out), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "error: mmdebstrap failed" in result.stderr
    assert "no-such-package-xyz" in result.stderr  # the tool's own last lines are shown
    assert "Traceback" not in result.stderr
    assert not out.exists(), "a failed build must not leave an output directory it created"
    assert _snapshot() == before


def test_failed_build_keeps_earlier_good_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "disk.raw").write_bytes(b"good image")
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: broken-image\nroot_volume:\n  packages: [no-such-package-xyz]\n")
    result = run_build(str(recipe), "--output-dir", str(out), cwd=tmp_path)
    assert result.returncode == 1
    assert sorted(p.name for p in out.iterdir()) == ["disk.raw"]
    assert (out / "disk.raw").read_bytes() == b"good image"
