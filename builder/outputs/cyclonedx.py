"""sbom.cdx.json: the SPDX document's facts (builder.outputs.sbom) in CycloneDX 1.6 JSON,
for recipes that ask for it (``outputs.sbom: [spdx, cyclonedx]``). cyclonedx-python-lib
writes the format and its JSON schema validates the document before it is written. The
serial number comes from the image's hash and the timestamp from SOURCE_DATE_EPOCH, so two
reproducible builds give the same bytes."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.license import LicenseExpression
from cyclonedx.output.json import JsonV1Dot6
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL
from spdx_tools.spdx.model import SpdxNoAssertion

from builder.errors import BuildFailed
from builder.host.fsutil import atomic_write_bytes
from builder.outputs.sbom import (
    PACKAGE_NAME,
    VALIDATE_MAX,
    declared_license,
    dependencies,
    package_id,
    sbom_created,
)
from builder.plan import NAMESPACE, Plan

FILE_NAME = "sbom.cdx.json"
IMAGE_REF = "image"


def _ref(spdx_id: str) -> str:
    return spdx_id.removeprefix("SPDXRef-")


def _component(package: dict[str, Any], release: str) -> Component:
    names = package["licenses"]
    expression = declared_license(names)
    return Component(
        name=package["name"], version=package["version"], type=ComponentType.LIBRARY,
        bom_ref=_ref(package_id(package)),
        purl=PackageURL("deb", "debian", package["name"], package["version"],
                        {"arch": package["architecture"], "distro": release}),
        licenses=[] if isinstance(expression, SpdxNoAssertion) else
        [LicenseExpression(str(expression))],
        properties=[Property(name="amiforge:debian-source",
                             value=f"{package['source']} {package['source_version']}"),
                    *(Property(name="amiforge:debian-license", value=n) for n in names)])


def cyclonedx_document(plan: Plan, packages: list[dict[str, Any]], image_sha256: str,
                       created: dt.datetime) -> str:
    packages = sorted(packages, key=lambda p: (p["name"], p["architecture"]))
    image = Component(name=plan.name, type=ComponentType.OPERATING_SYSTEM, bom_ref=IMAGE_REF,
                      hashes=[HashType(alg=HashAlgorithm.SHA_256, content=image_sha256)],
                      description="the raw disk image amiforge built (disk.raw)")
    components: dict[str, Component] = {}
    for package in packages:  # (the tree's dpkg database: recipe scripts may write it)
        ref = package_id(package)
        if ref in components or not PACKAGE_NAME.match(package["name"]):
            raise BuildFailed(f"the CycloneDX SBOM cannot list the package "
                              f"{package['name'][:80]!r} ({package['architecture'][:20]}): "
                              "a name that is no Debian package name, or listed twice")
        components[ref] = _component(package, plan.os.release)
    bom = Bom(components=components.values(),
              serial_number=uuid.uuid5(NAMESPACE, f"cyclonedx\0{image_sha256}"),
              metadata=BomMetaData(component=image, timestamp=created))
    bom.register_dependency(image, components.values())
    by_ref = {c.bom_ref.value: c for c in components.values()}
    depends: dict[str, list[Component]] = {}
    for one, other in dependencies(packages):
        depends.setdefault(_ref(one), []).append(by_ref[_ref(other)])
    for ref, needed in depends.items():
        bom.register_dependency(by_ref[ref], needed)
    return JsonV1Dot6(bom).output_as_string(indent=2)


def write_cyclonedx(path: Path, plan: Plan, packages: list[dict[str, Any]],
                    image_sha256: str) -> None:
    """Write the document, validated against CycloneDX's schema first (up to VALIDATE_MAX
    packages, as the SPDX document: the test tiers validate every shipped recipe's)."""
    text = cyclonedx_document(plan, packages, image_sha256, sbom_created(plan))
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) \
        if len(packages) <= VALIDATE_MAX else None
    if error is not None:
        raise BuildFailed(f"the CycloneDX SBOM is not valid: {str(error)[:300]}")
    atomic_write_bytes(path, (text + "\n").encode())
