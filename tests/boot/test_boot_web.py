"""The apps recipe (extends + nginx + cloud-init apps) builds, boots, and serves its page."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from builder.vm import VirtualMachine
from tests.conftest import needs_root_tools

pytestmark = [pytest.mark.boot, needs_root_tools()]


@pytest.mark.parametrize("recipe", ["debian-13-web.yaml", "debian-12-web.yaml"])
def test_nginx_page_answers(build_recipe, ssh_key: Path, recipe: str) -> None:
    built = build_recipe(recipe)
    with VirtualMachine(built.artifact("disk.qcow2"), "uefi", guest_ports=(22, 80)) as vm:
        vm.wait_for(timeout=400)
        assert vm.ssh("admin", ssh_key, "systemctl is-active nginx.service").strip() == "active"
        port = vm.forwards[80]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            page = response.read().decode()
        assert "<h1>amiforge web image</h1>" in page
        assert "Served from amiforge web image on port 80." in page
        assert vm.ssh("admin", ssh_key, "hostname").strip() == "web"
        assert vm.ssh("admin", ssh_key, "test -f /etc/cloud/cloud.cfg.d/01_amiforge.cfg "
                      "&& echo yes").strip() == "yes"
