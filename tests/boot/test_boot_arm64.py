"""The Graviton recipe: built on this x86_64 host through qemu-user, booted under
qemu-system-aarch64 (virt machine, AAVMF, TCG), configured like the amd64 images, and
clean for `build audit`, and reproducible. One build, shared by the session (it is the
slowest one, and reproducible: SOURCE_DATE_EPOCH), and one more cold build to compare."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.plan import sha256_file
from builder.vm import VirtualMachine
from tests.boot.test_boot_minimal import check_configured, check_sbom
from tests.conftest import FIXED_EPOCH, Built, build_shipped, needs_root_tools, run_build

# an emulated build and a TCG boot, while `make test` runs the rest alongside: more than
# the suite's 1500 s on a slow day
pytestmark = [pytest.mark.boot, pytest.mark.arm64, pytest.mark.timeout(3600),
              needs_root_tools()]
RECIPE = "debian-13-arm64.yaml"


def shared_build(build_recipe) -> Built:
    return build_recipe(RECIPE)


def test_arm64_image_boots_and_is_configured(build_recipe, ssh_key: Path) -> None:
    built = shared_build(build_recipe)
    packages = {p["name"]: p for p in built.manifest["packages"]}
    assert packages["linux-image-cloud-arm64"]["architecture"] == "arm64"
    assert packages["openssh-server"]["architecture"] == "arm64"
    with VirtualMachine(built.artifact("disk.qcow2"), "uefi", arch="arm64") as vm:
        seconds = vm.wait_for(timeout=900)
        print(f"arm64 (uefi): login prompt after {seconds:.1f}s")
        check_configured(vm, ssh_key)
        check_sbom(vm, ssh_key, built)
        assert vm.ssh("admin", ssh_key, "dpkg --print-architecture").strip() == "arm64"
        assert vm.ssh("admin", ssh_key, "uname -m").strip() == "aarch64"
        assert vm.ssh("admin", ssh_key, "hostname").strip() == "graviton"
        cmdline = vm.ssh("admin", ssh_key, "cat /proc/cmdline")
        assert "console=ttyAMA0,115200n8" in cmdline and "console=ttyS0,115200n8" in cmdline


def test_arm64_image_passes_the_audit(build_recipe) -> None:
    pytest.importorskip("guestfs", reason="needs Debian's python3-guestfs")
    result = run_build("audit", str(shared_build(build_recipe).artifact("disk.qcow2")), "--json",
                       timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_two_cold_arm64_builds_are_bit_identical(build_recipe, ssh_key: Path,
                                                 fresh_cache: Path, tmp_path: Path) -> None:
    """The shared build and a second one from an empty stage cache (the same downloads)."""
    first = shared_build(build_recipe)
    second = build_shipped(RECIPE, tmp_path / "out", fresh_cache, ssh_key, epoch=FIXED_EPOCH)
    assert second.manifest["stages"]["bootstrap"]["source"] == "built"
    for name in ("disk.raw", "disk.qcow2"):
        assert sha256_file(second.artifact(name)) == sha256_file(first.artifact(name)), name
