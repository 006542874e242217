"""An image is built from its release, -updates and -security suites: right after the build
no installed package is older than what those suites serve (what `apt list --upgradable`
would say inside the image), the kernel included. The archive's indexes are read here,
independently of amiforge's code."""

from __future__ import annotations

import lzma
import re
import urllib.request

import pytest

from tests.conftest import needs_root_tools

pytestmark = [pytest.mark.integration, needs_root_tools()]


def newest_versions(uri: str, suite: str, component: str, arch: str) -> dict[str, str]:
    import apt_pkg

    apt_pkg.init_system()
    url = f"{uri}/dists/{suite}/{component}/binary-{arch}/Packages.xz"
    with urllib.request.urlopen(url, timeout=120) as response:
        text = lzma.decompress(response.read()).decode(errors="replace")
    newest: dict[str, str] = {}
    for paragraph in text.split("\n\n"):
        name = re.search(r"^Package: (\S+)$", paragraph, re.M)
        version = re.search(r"^Version: (\S+)$", paragraph, re.M)
        if name and version:
            old = newest.get(name[1])
            if old is None or apt_pkg.version_compare(version[1], old) > 0:
                newest[name[1]] = version[1]
    return newest


@pytest.mark.parametrize("recipe", ["debian-13-minimal.yaml", "debian-12-minimal.yaml"])
def test_nothing_is_upgradable_right_after_the_build(build_recipe, recipe: str) -> None:
    import apt_pkg

    manifest = build_recipe(recipe).manifest
    suites = [(s["uri"], s["suite"]) for s in manifest["archive"]]
    assert [suite for _, suite in suites][1:] == [
        f"{suites[0][1]}-updates", f"{suites[0][1]}-security"]
    archive: dict[str, str] = {}
    for uri, suite in suites:
        for name, version in newest_versions(uri, suite, "main", "amd64").items():
            if name not in archive or apt_pkg.version_compare(version, archive[name]) > 0:
                archive[name] = version
    upgradable = [f"{p['name']} {p['version']} -> {archive[p['name']]}"
                  for p in manifest["packages"]
                  if p["name"] in archive
                  and apt_pkg.version_compare(archive[p["name"]], p["version"]) > 0]
    assert upgradable == []
    kernel = next(p for p in manifest["packages"] if p["name"] == "linux-image-cloud-amd64")
    assert kernel["version"] == archive["linux-image-cloud-amd64"]
    assert all(s["date"] for s in manifest["archive"])
