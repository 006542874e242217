"""A recipe from a pull request, built for real: its files, links and scripts stay inside
the image's tree, and its scripts see a private, minimal /dev."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from builder.plan import sha256_file
from tests.conftest import ROOT, copy_recipes, needs_root_tools, run_build
from tests.unit.test_tree_paths import snapshot

pytestmark = [pytest.mark.integration, needs_root_tools()]


def test_hostile_recipe_cannot_touch_the_host(tmp_path: Path, suite_cache: Path) -> None:
    recipes = copy_recipes(tmp_path / "recipes")
    sentinel = tmp_path / "host-sentinel"
    (sentinel / "keep").mkdir(parents=True)
    (sentinel / "keep/file").write_text("host data\n")
    (sentinel / "machine-id").write_text("host machine id\n")
    os.utime(sentinel / "keep/file", (1_000_000, 1_000_000))
    before = snapshot(sentinel)
    in_run = f"amiforge-hostile-{uuid.uuid4().hex[:8]}"  # Debian's var/run -> /run
    hostile = recipes / "hostile.yaml"
    hostile.write_text(f"""extends: debian-12-minimal.yaml
name: hostile-image
root_volume:
  files:
    - {{dest: /var/run/{in_run}/x, content: "from the recipe"}}
  scripts:
    - run: |
        rm -rf /var/tmp && ln -s {sentinel} /var/tmp
        rm -f /etc/machine-id && ln -s {sentinel}/machine-id /etc/machine-id
        ln -s {sentinel}/keep /root/.cache
        test -c /dev/null && test -c /dev/urandom && test -d /dev/pts
        test "$(ls /dev | wc -l)" -lt 20 || {{ ls /dev; echo "the host's /dev"; exit 1; }}
""")
    result = run_build(str(hostile), "-o", str(tmp_path / "out"), "--cache-dir",
                       str(suite_cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(sentinel) == before
    assert not Path("/run", in_run).exists()


def test_interrupt_while_results_land(tmp_path: Path, suite_cache: Path) -> None:
    """SIGINT right after the new disk.raw landed: the build finishes (exit 0), every
    artifact matches build-manifest.json, and no workspace is left."""
    out = tmp_path / "out"
    argv = ["recipes/debian-12-minimal.yaml", "-o", str(out), "--cache-dir", str(suite_cache)]
    assert run_build(*argv).returncode == 0
    old_inode = (out / "disk.raw").stat().st_ino
    process = subprocess.Popen([sys.executable, "-m", "builder", *argv], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True)
    while process.poll() is None:
        if (out / "disk.raw").stat().st_ino != old_inode:
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.002)
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 0, stderr[-2000:]
    manifest = json.loads((out / "build-manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        assert sha256_file(out / artifact["path"]) == artifact["sha256"], artifact["path"]
    assert not list(out.glob(".amiforge-tmp-*"))
