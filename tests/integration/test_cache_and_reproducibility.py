"""Fast rebuilds from the stage cache, bit-identical images, parallel builds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from builder.plan import sha256_file
from tests.conftest import (
    FIXED_EPOCH,
    ROOT,
    build_shipped,
    copy_recipes,
    needs_root_tools,
    read_root_file,
    run_build,
)

pytestmark = [pytest.mark.integration, needs_root_tools()]


REPRODUCED = ("disk.raw", "disk.qcow2", "sbom.spdx.json")  # the SBOM is dated by the epoch


def stages(output_dir: Path) -> dict[str, str]:
    manifest = json.loads((output_dir / "build-manifest.json").read_text())
    return {name: info["source"] for name, info in manifest["stages"].items()}


def test_two_cold_builds_are_bit_identical(build_recipe, tmp_path: Path, fresh_cache: Path,
                                           ssh_key: Path) -> None:
    """The suite's shared build of the default recipe and one from an empty stage cache
    (the same downloads), made at another wall-clock time in another folder."""
    first = build_recipe("debian-13-minimal.yaml")
    out = tmp_path / "somewhere" / "out"
    second = build_shipped("debian-13-minimal.yaml", out, fresh_cache, ssh_key,
                           epoch=FIXED_EPOCH)
    assert stages(out)["bootstrap"] == "built"
    digests = [tuple(sha256_file(built.artifact(name)) for name in REPRODUCED)
               for built in (first, second)]
    assert digests[0] == digests[1]
    same = run_build("diff", str(first.output_dir), str(out))
    assert same.returncode == 0 and "no difference" in same.stdout, same.stdout

    # The configured tree is cached as the overlay's upper layer alone (a few files, not
    # the ~9000 of the tree). With the filesystem entry gone, the image is made again from
    # the layered entry (read-only overlay of it and the bootstrap): the same bytes.
    (configured,) = (fresh_cache / "stages/configure").glob("*/upper")
    assert sum(1 for _ in configured.rglob("*")) < 200
    for entry in (fresh_cache / "stages/filesystem").iterdir():
        subprocess.run(["rm", "-rf", str(entry)], check=True)
    again = build_shipped("debian-13-minimal.yaml", tmp_path / "from-layers", fresh_cache,
                          ssh_key, epoch=FIXED_EPOCH)
    assert stages(again.output_dir)["configure"] == "cache"
    assert stages(again.output_dir)["filesystem"] == "built"
    assert tuple(sha256_file(again.artifact(name)) for name in REPRODUCED) == digests[0]
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()  # nothing leaked


def test_one_file_change_rebuilds_from_the_cached_bootstrap(
        tmp_path: Path, suite_cache: Path, ssh_key: Path) -> None:
    """With the suite's stage cache (the default recipe's bootstrap is made once per
    session, by whichever build comes first)."""
    recipes = copy_recipes(tmp_path / "recipes")
    public = ssh_key.with_suffix(".pub").read_text().strip()
    args = ["--cache-dir", str(suite_cache), "--var", f"admin_key={public}",
            "-o", str(tmp_path / "out")]
    first = run_build(str(recipes / "debian-12-minimal.yaml"), *args)
    assert first.returncode == 0, first.stderr[-2000:]

    (recipes / "files/motd").write_text("a new message of the day\n")
    second = run_build(str(recipes / "debian-12-minimal.yaml"), *args, "-v")
    assert second.returncode == 0, second.stderr[-2000:]
    sources = stages(tmp_path / "out")
    assert sources["bootstrap"] == "cache" and sources["configure"] == "built"
    assert "configure not cached: changed: sources" in second.stderr  # -v says why
    assert read_root_file(tmp_path / "out/disk.raw", "/etc/motd") == b"a new message of the day\n"

    third = run_build(str(recipes / "debian-12-minimal.yaml"), *args)
    assert third.returncode == 0
    assert stages(tmp_path / "out")["filesystem"] == "cache"

    # Where overlayfs cannot take a path (a comma in it), trees are copied instead.
    (recipes / "files/motd").write_text("copied, not layered\n")
    out = tmp_path / "out,copied"
    fourth = run_build(str(recipes / "debian-12-minimal.yaml"), *args[:-2], "-o", str(out))
    assert fourth.returncode == 0, fourth.stderr[-2000:]
    assert stages(out)["bootstrap"] == "cache" and stages(out)["configure"] == "built"
    assert read_root_file(out / "disk.raw", "/etc/motd") == b"copied, not layered\n"
    trees = [p.parent for p in (suite_cache / "stages/configure").glob("*/*")
             if p.name in ("tree", "upper")]
    newest = max(trees, key=lambda p: (p / "meta.json").stat().st_mtime)
    assert (newest / "tree/etc/motd").read_text() == "copied, not layered\n"


def test_parallel_builds_share_a_bootstrap_and_survive_pruning(
        tmp_path: Path, fresh_cache: Path) -> None:
    """Two recipes with one bootstrap, built at once while the cache is pruned again and
    again: the bootstrap is made once (the other build waits for it), and both images are
    whole."""
    recipes = copy_recipes(tmp_path / "recipes")
    variant = (recipes / "debian-12-minimal.yaml").read_text().replace(
        "hostname: debian", "hostname: variant")
    (recipes / "variant.yaml").write_text(variant)
    out = tmp_path / "out"
    pruner = subprocess.Popen(
        [sys.executable, "-c", (
            "import subprocess, sys, time\n"
            "end = time.time() + 240\n"
            "while time.time() < end:\n"
            f"    subprocess.run([sys.executable, '-m', 'builder', 'cache', '--prune', "
            f"'--cache-dir', '{fresh_cache}'], capture_output=True)\n"
            "    time.sleep(1)\n")], cwd=ROOT)
    try:
        result = run_build(str(recipes / "debian-12-minimal.yaml"), str(recipes / "variant.yaml"),
                           "-j", "2", "--cache-dir", str(fresh_cache), "-o", str(out))
    finally:
        pruner.kill()
        pruner.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "==> summary" in result.stderr
    for name in ("debian-12-minimal", "variant"):
        manifest = json.loads((out / name / "build-manifest.json").read_text())
        for artifact in manifest["artifacts"]:
            assert sha256_file(out / name / artifact["path"]) == artifact["sha256"]
        table = subprocess.run(["sfdisk", "--json", str(out / name / "disk.raw")],
                               capture_output=True, text=True, check=True).stdout
        assert len(json.loads(table)["partitiontable"]["partitions"]) == 3
    sources = sorted(stages(out / name)["bootstrap"] for name in ("debian-12-minimal", "variant"))
    assert sources == ["built", "cache"]


def test_one_failure_does_not_stop_the_others(tmp_path: Path, suite_cache: Path) -> None:
    recipes = copy_recipes(tmp_path / "recipes")
    (recipes / "broken.yaml").write_text(
        "name: broken-image\nroot_volume:\n  packages: [no-such-package-xyz]\n")
    out = tmp_path / "out"
    result = run_build(str(recipes / "broken.yaml"), str(recipes / "debian-12-minimal.yaml"),
                       "-j", "2", "--cache-dir", str(suite_cache), "-o", str(out))
    assert result.returncode == 1
    assert (out / "debian-12-minimal" / "disk.raw").exists()
    assert not (out / "broken").exists()
    assert "[broken] error: mmdebstrap failed" in result.stderr
