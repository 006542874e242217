"""sbom.spdx.json: the image's software bill of materials (SPDX 2.3), from dpkg's database
in the finished tree.

The configure stage reads, inside the tree, each installed package's name, version,
architecture, source package, dependencies and the license names its Debian copyright file
declares (package_facts: kept with the stage in the cache). The document is made after the
disk image is hashed (write_sbom): the image is the package the document describes, and it
contains every Debian package. spdx-tools writes the format and validates it before the
file is written (up to VALIDATE_MAX packages); a reproducible build dates it from
SOURCE_DATE_EPOCH, so two reproducible builds give the same bytes.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from license_expression import ExpressionError
from spdx_tools.common.spdx_licensing import spdx_licensing
from spdx_tools.spdx.model import (
    Actor,
    ActorType,
    Checksum,
    ChecksumAlgorithm,
    CreationInfo,
    Document,
    ExternalPackageRef,
    ExternalPackageRefCategory,
    Package,
    PackagePurpose,
    Relationship,
    RelationshipType,
    SpdxNoAssertion,
)
from spdx_tools.spdx.writer.write_anything import write_file

from builder import __version__
from builder.errors import BuildFailed
from builder.host import treepath
from builder.plan import Plan

FILE_NAME = "sbom.spdx.json"
STATUS = "/var/lib/dpkg/status"
DEP5_FORMAT = re.compile(r"Format(?:-Specification)?: *https?://www\.debian\.org/doc/"
                         r"packaging-manuals/copyright-format/1\.0/?\s*$")
# Debian's short license names (copyright-format 1.0) that SPDX spells otherwise
DEBIAN_NAMES = {"expat": "MIT", "artistic": "Artistic-1.0", "bsd-2-clause": "BSD-2-Clause",
                "bsd-3-clause": "BSD-3-Clause", "bsd-4-clause": "BSD-4-Clause"}
IMAGE_ID = "SPDXRef-Image"
PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+$")  # Debian policy 5.6.1
COPYRIGHT_MAX = 1 << 20
VALIDATE_MAX = 1000
LICENSE_LINES_MAX = 64
LICENSE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,99}$")


# --- facts, read in the tree by the configure stage ---------------------------------------

def status_paragraphs(tree: Path) -> Iterator[dict[str, str]]:
    """The installed packages' paragraphs of dpkg's status file, read inside the tree (a
    host tool given the tree's path would follow a ``var/lib/dpkg -> /proc/self/root/...``
    link to the host's own database). Continuation lines are left out."""
    yield from parse_status(treepath.read_text(tree, STATUS))


def parse_status(text: str) -> Iterator[dict[str, str]]:
    """The installed packages' paragraphs of a dpkg status file's text."""
    for paragraph in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z0-9-]+): ?(.*)$", paragraph, re.M))
        state = fields.get("Status", "").split()
        if state[2:] == ["installed"] and "Package" in fields:  # held ones too
            yield fields


def package_facts(tree: Path) -> list[dict[str, Any]]:
    """What the SBOM says of each installed package."""
    facts = []
    for fields in status_paragraphs(tree):
        name, version = fields["Package"], fields.get("Version", "")
        source = fields.get("Source", name).split(" (")
        facts.append({
            "name": name, "version": version, "architecture": fields.get("Architecture", ""),
            "source": source[0],
            "source_version": source[1].rstrip(")") if len(source) > 1 else version,
            "depends": _relations(fields.get("Pre-Depends", "") + "," +
                                  fields.get("Depends", "")),
            "provides": _relations(fields.get("Provides", "")),
            "licenses": debian_licenses(tree, name) if PACKAGE_NAME.match(name) else []})
    return sorted(facts, key=lambda p: (p["name"], p["architecture"]))


def _relations(field: str) -> list[list[str]]:
    """Depends: "a (>= 1) | b, c:any" -> [["a", "b"], ["c"]] (names only)."""
    groups = []
    for group in field.split(","):
        names = [re.split(r"[\s(:\[]", alt.strip(), maxsplit=1)[0] for alt in group.split("|")]
        if any(names):
            groups.append([n for n in names if n])
    return groups


def debian_licenses(tree: Path, package: str) -> list[str]:
    """The License lines (first lines, as written) a machine-readable copyright file
    declares; none for a file in free form, a missing one, or one past the limits (a
    recipe's script may have written any of them)."""
    try:
        text = treepath.read_text(tree, f"/usr/share/doc/{package}/copyright", COPYRIGHT_MAX)
    except BuildFailed:
        return []
    if not DEP5_FORMAT.match(text.split("\n", 1)[0]):
        return []
    lines = {" ".join(v.split()) for v in re.findall(r"^License: *(\S[^\n]*)$", text, re.M)}
    if len(lines) > LICENSE_LINES_MAX or any(len(line) > 200 for line in lines):
        return []
    return sorted(lines)


# --- the document ---------------------------------------------------------------------------

def spdx_license(debian_name: str) -> str | None:
    """SPDX's identifier for a Debian license name, or None where SPDX has none."""
    if not LICENSE_NAME.match(debian_name):  # (a recipe's script may write any text there)
        return None
    name = DEBIAN_NAMES.get(debian_name.lower(), debian_name)
    # Debian writes "GPL-2+", SPDX's list knows "GPL-2.0+" (GPL-2.0-or-later)
    name = re.sub(r"^((?:A|L)?GPL|GFDL)-(\d)(\+?)$", r"\1-\2.0\3", name, flags=re.I)
    try:
        info = spdx_licensing.validate(name)
    except (ExpressionError, AttributeError):  # (license-expression 30.4 raises the latter)
        return None
    if info.errors or info.invalid_symbols or " " in info.normalized_expression:
        return None
    return str(info.normalized_expression)


def declared_license(lines: list[str]) -> Any:
    """Every License line of a copyright file covers some files (AND); within a line "or"
    is a choice (OR) and "and" or a comma a conjunction. NOASSERTION unless SPDX has an
    identifier for every name."""
    terms = []
    for line in lines:
        choices = []
        for choice in re.split(r"\s+or\s+", line):
            ids = [spdx_license(n) for n in re.split(r"\s*,\s*(?:and\s+)?|\s+and\s+", choice)
                   if n]
            if not ids or None in ids:
                return SpdxNoAssertion()
            choices.append(" AND ".join(sorted(set(ids))))  # type: ignore[arg-type]
        terms.append(" OR ".join(f"({c})" for c in sorted(set(choices))))
    if not terms:
        return SpdxNoAssertion()
    # (simplified: flat, sorted, and what an AND already requires is not repeated in an OR)
    return spdx_licensing.parse(" AND ".join(f"({t})" for t in sorted(set(terms)))).simplify()


def purl(package: dict[str, Any], release: str) -> str:
    """The package URL (purl-spec's deb type); the version's ':' and '+' percent-encoded."""
    return (f"pkg:deb/debian/{quote(package['name'], safe='')}@"
            f"{quote(package['version'], safe='')}?arch={quote(package['architecture'], safe='')}"
            f"&distro={release}")


def package_id(package: dict[str, Any]) -> str:
    """An SPDX element id: letters, digits, '.' and '-' only (others hex-escaped)."""
    raw = f"{package['name']}-{package['architecture']}"
    return "SPDXRef-deb-" + re.sub(r"[^A-Za-z0-9.-]", lambda m: f"-{ord(m[0]):02X}", raw)


def sbom_document(plan: Plan, packages: list[dict[str, Any]], image_sha256: str,
                  created: dt.datetime) -> Document:
    packages = sorted(packages, key=lambda p: (p["name"], p["architecture"]))
    recipe = plan.sources[0]
    image = Package(IMAGE_ID, plan.name, SpdxNoAssertion(), file_name="disk.raw",
                    files_analyzed=False, primary_package_purpose=PackagePurpose.OPERATING_SYSTEM,
                    checksums=[Checksum(ChecksumAlgorithm.SHA256, image_sha256)],
                    license_concluded=SpdxNoAssertion(), license_declared=SpdxNoAssertion(),
                    copyright_text=SpdxNoAssertion(),
                    comment=f"the raw disk image amiforge built from the recipe "
                            f"{recipe.name} (sha256 {recipe.sha256})")
    listed = [image] + [_package(p, plan.os.release) for p in packages]
    relations = [Relationship("SPDXRef-DOCUMENT", RelationshipType.DESCRIBES, IMAGE_ID)]
    relations += [Relationship(IMAGE_ID, RelationshipType.CONTAINS, package_id(p))
                  for p in packages]
    relations += [Relationship(a, RelationshipType.DEPENDS_ON, b)
                  for a, b in dependencies(packages)]
    info = CreationInfo("SPDX-2.3", "SPDXRef-DOCUMENT", plan.name,
                        f"https://amiforge.invalid/spdx/{plan.name}/{image_sha256}",
                        [Actor(ActorType.TOOL, f"amiforge-{__version__}")], created)
    return Document(info, packages=listed, relationships=relations)


def _package(package: dict[str, Any], release: str) -> Package:
    names = package["licenses"]
    return Package(
        package_id(package), package["name"], SpdxNoAssertion(), version=package["version"],
        files_analyzed=False, supplier=SpdxNoAssertion(),
        source_info=f"built from the Debian source package {package['source']} "
                    f"{package['source_version']}",
        license_concluded=SpdxNoAssertion(), license_declared=declared_license(names),
        license_comment=("its Debian copyright file's License lines: " + "; ".join(names))
        if names
        else "no machine-readable Debian copyright file",
        copyright_text=SpdxNoAssertion(),
        external_references=[ExternalPackageRef(ExternalPackageRefCategory.PACKAGE_MANAGER,
                                                "purl", purl(package, release))])


def dependencies(packages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(package id, package id) for each dependency the image satisfies: a package of that
    name, else one that provides it (the first alternative so satisfied)."""
    by_name = {p["name"]: p for p in packages}
    for p in packages:
        for provided in p["provides"]:
            by_name.setdefault(provided[0], p)
    pairs = set()
    for p in packages:
        for group in p["depends"]:
            found = next((by_name[n] for n in group if n in by_name), None)
            if found is not None and found is not p:
                pairs.add((package_id(p), package_id(found)))
    return sorted(pairs)


def sbom_created(plan: Plan) -> dt.datetime:
    """When the document was made: SOURCE_DATE_EPOCH in a reproducible build."""
    return (dt.datetime.fromtimestamp(plan.source_date_epoch, dt.UTC) if plan.reproducible
            else dt.datetime.now(dt.UTC)).replace(microsecond=0)


def write_sbom(path: Path, plan: Plan, packages: list[dict[str, Any]],
               image_sha256: str) -> None:
    """Write the document. spdx-tools validates it first and refuses an invalid one; its
    validation takes time quadratic in the packages (3 s for 1000, 55 s for 4000), so an
    image of more packages is written without (the test tiers validate every shipped
    recipe's)."""
    document = sbom_document(plan, packages, image_sha256, sbom_created(plan))
    try:
        write_file(document, str(path), validate=len(packages) <= VALIDATE_MAX)
    except ValueError as exc:
        raise BuildFailed(f"the SBOM is not valid SPDX: {exc}") from None


def write_sboms(plan: Plan, folder: Path, packages: list[dict[str, Any]],
                image_sha256: str) -> list[Path]:
    """The documents the recipe asks for (outputs.sbom), in ``folder``."""
    from builder.outputs.cyclonedx import FILE_NAME as CYCLONEDX
    from builder.outputs.cyclonedx import write_cyclonedx

    written = []
    if "spdx" in plan.sbom_formats:
        written.append(folder / FILE_NAME)
        write_sbom(written[-1], plan, packages, image_sha256)
    if "cyclonedx" in plan.sbom_formats:
        written.append(folder / CYCLONEDX)
        write_cyclonedx(written[-1], plan, packages, image_sha256)
    return written
