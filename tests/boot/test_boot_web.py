"""The apps recipe (extends + nginx + cloud-init apps) builds, boots, and serves its page."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from builder.vm import VirtualMachine
from tests.conftest import needs_root_tools

pytestmark = [pytest.mark.boot, needs_root_tools()]


def test_nginx_page_answers(build_recipe, ssh_key: Path) -> None:
    """Debian 12's web image. (Debian 13's boots as an EC2 instance, with cloud-init:
    test_boot_ec2.)"""
    built = build_recipe("debian-12-web.yaml")
    with VirtualMachine(built.artifact("disk.qcow2"), "uefi", guest_ports=(22, 80)) as vm:
        vm.wait_for(timeout=400)
        check_web_page(vm, ssh_key)
        assert vm.ssh("admin", ssh_key, "hostname").strip() == "web"


def check_web_page(vm: VirtualMachine, key: Path) -> None:
    assert vm.ssh("admin", key, "systemctl is-active nginx.service").strip() == "active"
    port = vm.forwards[80]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
        page = response.read().decode()
    assert "<h1>amiforge web image</h1>" in page
    assert "Served from amiforge web image on port 80." in page
    assert vm.ssh("admin", key, "test -f /etc/cloud/cloud.cfg.d/01_amiforge.cfg "
                  "&& echo yes").strip() == "yes"


def check_cyclonedx(vm: VirtualMachine, key: Path, document: Path) -> None:
    """sbom.cdx.json is valid CycloneDX 1.6 and lists what dpkg-query lists inside the
    booted image, version for version."""
    text = document.read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    bom = json.loads(text)
    listed = vm.ssh("admin", key, "dpkg-query -W -f '${Package} ${Version}\\n'").splitlines()
    assert sorted(f"{c['name']} {c['version']}" for c in bom["components"]) == sorted(listed)
    assert bom["metadata"]["component"]["type"] == "operating-system"
