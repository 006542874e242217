"""build diff between real builds: the minimal and the web recipe (nginx and what it needs
added, files changed, the AMI renamed), read through libguestfs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import needs_root_tools, run_build

pytestmark = [pytest.mark.integration, needs_root_tools()]


def test_diff_of_the_minimal_and_the_web_image(build_recipe) -> None:
    minimal = build_recipe("debian-13-minimal.yaml").output_dir
    web = build_recipe("debian-13-web.yaml").output_dir
    result = run_build("diff", str(minimal), str(web / "build-manifest.json"), "--json")
    assert result.returncode == 1, result.stderr[-2000:]
    diff = json.loads(result.stdout)
    added = {p["name"] for p in diff["packages"]["added"]}
    assert {"nginx", "nginx-common"} <= added
    assert not diff["packages"]["removed"]
    names = {r["field"]: (r["a"], r["b"]) for r in diff["ami"]}
    assert names["Name"][0].startswith("debian-13-minimal-")
    assert names["Name"][1].startswith("debian-13-web-")
    files = diff["files"]
    assert "/usr/sbin/nginx" in {f["path"] for f in files["added"]}
    changed = {f["path"]: f["changes"] for f in files["changed"]}
    assert "sha256" in changed["/etc/hostname"]  # "web", not "debian"
    notes = run_build("diff", str(minimal), str(web), "--markdown", "--no-files")
    assert notes.returncode == 1
    assert "### Packages" in notes.stdout and "| + | nginx |" in notes.stdout
    # a bare image: its packages read from its dpkg database, its size from the file
    same = run_build("diff", str(minimal), str(minimal / "disk.raw"), "--no-files")
    assert same.returncode == 0, same.stdout + same.stderr[-2000:]
    assert "no difference" in same.stdout
