"""sbom.spdx.json: package facts read from a tree's dpkg database and copyright files, the
SPDX document spdx-tools writes and validates, read back by spdx-tools' own parser."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from spdx_tools.spdx.model import RelationshipType
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from builder.errors import BuildFailed
from builder.outputs.sbom import (
    debian_licenses,
    declared_license,
    package_facts,
    package_id,
    purl,
    spdx_license,
    write_sbom,
)

pytestmark = pytest.mark.unit

STATUS = """\
Package: libstdc++6
Status: install ok installed
Architecture: amd64
Source: gcc-14 (14.2.0-19)
Version: 14.2.0-19
Depends: gcc-14-base (= 14.2.0-19), libc6 (>= 2.38)
Description: GNU Standard C++ Library v3
 a continuation line: Depends: not-a-field

Package: libc6
Status: install ok installed
Architecture: amd64
Version: 2.41-12
Provides: libc6-dev-shim
Description: GNU C Library

Package: gcc-14-base
Status: install ok installed
Architecture: amd64
Version: 14.2.0-19

Package: removed-one
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: tzdata
Status: install ok installed
Architecture: all
Version: 2025b-4+deb13u1
Pre-Depends: debconf (>= 0.5) | debconf-2.0
Depends: libc6-dev-shim
"""

DEP5 = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: glibc

Files: *
Copyright: the authors
License: LGPL-2.1+
 The text.

Files: debian/*
License: GPL-2+ or Expat
"""


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(STATUS)
    docs = root / "usr/share/doc"
    for name, text in {"libc6": DEP5, "gcc-14-base": "free-form copyright text\n",
                       "tzdata": DEP5.replace("License: GPL-2+ or Expat",
                                              "License: public-domain")}.items():
        (docs / name).mkdir(parents=True)
        (docs / name / "copyright").write_text(text)
    (docs / "libstdc++6").symlink_to("gcc-14-base")  # a doc folder shared with another
    return root


def test_package_facts_from_the_status_file(tree: Path) -> None:
    facts = {p["name"]: p for p in package_facts(tree)}
    assert sorted(facts) == ["gcc-14-base", "libc6", "libstdc++6", "tzdata"]  # installed
    assert facts["libstdc++6"]["source"] == "gcc-14"
    assert facts["libstdc++6"]["source_version"] == "14.2.0-19"
    assert facts["libc6"]["source"] == "libc6"  # no Source field: its own name
    assert facts["libstdc++6"]["depends"] == [["gcc-14-base"], ["libc6"]]
    assert facts["tzdata"]["depends"] == [["debconf", "debconf-2.0"], ["libc6-dev-shim"]]
    assert facts["libc6"]["licenses"] == ["GPL-2+ or Expat", "LGPL-2.1+"]
    assert facts["gcc-14-base"]["licenses"] == []  # not machine-readable
    assert facts["libstdc++6"]["licenses"] == []


def test_license_lines_as_packages_write_them(tree: Path) -> None:
    (tree / "usr/share/doc/libc6/copyright").write_text(
        DEP5 + "\nFiles: x\nLicense: GPL-2+, AFL-2.1,\n\n"
        "Files: y\nLicense: BSD-3-clause, and Zlib\n")
    assert debian_licenses(tree, "libc6") == ["BSD-3-clause, and Zlib", "GPL-2+ or Expat",
                                              "GPL-2+, AFL-2.1,", "LGPL-2.1+"]
    assert str(declared_license(debian_licenses(tree, "libc6"))) == (
        "AFL-2.1 AND BSD-3-Clause AND GPL-2.0-or-later AND LGPL-2.1-or-later AND Zlib")
    assert str(declared_license(["GPL-2+ or Expat", "Zlib"])) == \
        "Zlib AND (GPL-2.0-or-later OR MIT)"


def test_hostile_copyright_files_name_no_license(tree: Path) -> None:
    copyright_file = tree / "usr/share/doc/libc6/copyright"
    copyright_file.write_text(DEP5 + "".join(f"\nFiles: f{i}\nLicense: L{i}\n"
                                             for i in range(100)))
    assert debian_licenses(tree, "libc6") == []  # more License lines than any real file
    copyright_file.write_text(DEP5 + "x" * (1 << 20))
    assert debian_licenses(tree, "libc6") == []  # past 1 MiB
    copyright_file.unlink()
    copyright_file.symlink_to("/etc/shadow")
    assert debian_licenses(tree, "libc6") == []  # a link is not read
    assert debian_licenses(tree, "a" * 5000) == []
    assert debian_licenses(tree, "nul\0byte") == []


def test_odd_status_entries(tree: Path) -> None:
    status = tree / "var/lib/dpkg/status"
    status.write_text(STATUS + "\nPackage: held\nStatus: hold ok installed\nVersion: 1\n"
                      "Architecture: amd64&distro=evil\n\nPackage: Bad/../Name\n"
                      "Status: install ok installed\nVersion: 1\nArchitecture: all\n")
    facts = {p["name"]: p for p in package_facts(tree)}
    assert "held" in facts  # apt-mark hold: still installed
    assert purl(facts["held"], "trixie").endswith("?arch=amd64%26distro%3Devil&distro=trixie")
    assert facts["Bad/../Name"]["licenses"] == []  # not a Debian name: no file looked up


def test_a_missing_copyright_file_names_no_license(tree: Path) -> None:
    assert debian_licenses(tree, "not-there") == []


@pytest.mark.parametrize(("debian", "spdx"), [
    ("GPL-2+", "GPL-2.0-or-later"), ("GPL-2", "GPL-2.0-only"), ("LGPL-2.1+", "LGPL-2.1-or-later"),
    ("GPL-3+", "GPL-3.0-or-later"), ("Expat", "MIT"), ("BSD-3-clause", "BSD-3-Clause"),
    ("Zlib", "Zlib"), ("Apache-2.0", "Apache-2.0"), ("public-domain", None),
    ("permissive", None), ("GPL-2+ with OpenSSL exception", None), ("AFL-2.1,", None),
    ("MIT)", None), ("GPL-2 OR MIT", None), ("$(reboot)", None), ("x" * 5000, None)])
def test_debian_license_names_in_spdx(debian: str, spdx: str | None) -> None:
    assert spdx_license(debian) == spdx


def test_purl_and_element_ids_are_escaped() -> None:
    package = {"name": "libstdc++6", "version": "1:2.41+dfsg-1", "architecture": "arm64"}
    assert purl(package, "trixie") == \
        "pkg:deb/debian/libstdc%2B%2B6@1%3A2.41%2Bdfsg-1?arch=arm64&distro=trixie"
    assert package_id(package) == "SPDXRef-deb-libstdc-2B-2B6-arm64"


def test_document_is_valid_spdx_and_reads_back(tree: Path, plan, tmp_path: Path) -> None:
    path = tmp_path / "sbom.spdx.json"
    write_sbom(path, plan, package_facts(tree), "ab" * 32)
    document = parse_file(str(path))
    assert validate_full_spdx_document(document) == []
    assert document.creation_info.spdx_version == "SPDX-2.3"
    assert document.creation_info.created.timestamp() == plan.source_date_epoch
    names = {p.name: p for p in document.packages}
    assert set(names) == {plan.name, "gcc-14-base", "libc6", "libstdc++6", "tzdata"}
    image = names[plan.name]
    assert image.comment.endswith(f"the recipe {plan.sources[0].name} "
                                  f"(sha256 {plan.sources[0].sha256})")  # no host path
    assert image.checksums[0].value == "ab" * 32
    assert str(names["libc6"].license_declared) == \
        "LGPL-2.1-or-later AND (GPL-2.0-or-later OR MIT)"
    assert str(names["tzdata"].license_declared) == "NOASSERTION"  # public-domain: no SPDX id
    relations = {(r.spdx_element_id, r.relationship_type, r.related_spdx_element_id)
                 for r in document.relationships}
    assert ("SPDXRef-DOCUMENT", RelationshipType.DESCRIBES, image.spdx_id) in relations
    contains = {r for r in relations if r[1] == RelationshipType.CONTAINS}
    assert len(contains) == 4
    ids = {name: p.spdx_id for name, p in names.items()}
    depends = {(a, b) for a, kind, b in relations if kind == RelationshipType.DEPENDS_ON}
    assert depends == {(ids["libstdc++6"], ids["gcc-14-base"]),
                       (ids["libstdc++6"], ids["libc6"]),
                       (ids["tzdata"], ids["libc6"])}  # through libc6's Provides
    refs = names["libc6"].external_references
    assert refs[0].locator == "pkg:deb/debian/libc6@2.41-12?arch=amd64&distro=bookworm"


def test_same_facts_give_the_same_bytes(tree: Path, plan, tmp_path: Path) -> None:
    first, second = tmp_path / "a.spdx.json", tmp_path / "b.spdx.json"
    write_sbom(first, plan, package_facts(tree), "cd" * 32)
    write_sbom(second, plan, list(reversed(package_facts(tree))), "cd" * 32)
    assert first.read_bytes() == second.read_bytes()
    assert json.loads(first.read_text())["spdxVersion"] == "SPDX-2.3"


def test_an_invalid_document_is_refused(tree: Path, plan, tmp_path: Path) -> None:
    with pytest.raises(BuildFailed, match="not valid SPDX"):
        write_sbom(tmp_path / "x.spdx.json", plan, package_facts(tree), "not a sha256")


def test_cyclonedx_document_is_valid_and_says_what_spdx_says(tree: Path, plan,
                                                              tmp_path: Path) -> None:
    from builder.outputs.cyclonedx import write_cyclonedx

    first, second = tmp_path / "a.cdx.json", tmp_path / "b.cdx.json"
    write_cyclonedx(first, plan, package_facts(tree), "ab" * 32)
    write_cyclonedx(second, plan, list(reversed(package_facts(tree))), "ab" * 32)
    assert first.read_bytes() == second.read_bytes()  # reproducible
    bom = json.loads(first.read_text())
    assert bom["specVersion"] == "1.6"
    assert bom["metadata"]["timestamp"].startswith(
        dt.datetime.fromtimestamp(plan.source_date_epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    image = bom["metadata"]["component"]
    assert image["hashes"] == [{"alg": "SHA-256", "content": "ab" * 32}]
    components = {c["name"]: c for c in bom["components"]}
    assert set(components) == {"gcc-14-base", "libc6", "libstdc++6", "tzdata"}
    assert components["libc6"]["purl"] == \
        "pkg:deb/debian/libc6@2.41-12?arch=amd64&distro=bookworm"
    assert components["libc6"]["licenses"] == [
        {"expression": "LGPL-2.1-or-later AND (GPL-2.0-or-later OR MIT)"}]
    assert "licenses" not in components["tzdata"]  # public-domain: no SPDX id
    refs = {c["bom-ref"]: c["name"] for c in bom["components"]}
    depends = {(refs[d["ref"]], refs[o]) for d in bom["dependencies"] if d["ref"] in refs
               for o in d.get("dependsOn", [])}
    assert depends == {("libstdc++6", "gcc-14-base"), ("libstdc++6", "libc6"),
                       ("tzdata", "libc6")}
    with pytest.raises(BuildFailed, match="not valid"):
        write_cyclonedx(tmp_path / "x.cdx.json", plan, package_facts(tree), "not a sha256")
    twice = package_facts(tree) + package_facts(tree)[:1]  # a status file listing one twice
    with pytest.raises(BuildFailed, match="listed twice"):
        write_cyclonedx(tmp_path / "y.cdx.json", plan, twice, "ab" * 32)
