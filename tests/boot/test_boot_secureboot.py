"""UEFI Secure Boot, enforced: OVMF's SMM build with Microsoft's keys enrolled starts the
Secure Boot recipe's signed chain (shim, GRUB, kernel) and the system says Secure Boot is on;
the same firmware refuses the default recipe's unsigned GRUB."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.vm import VirtualMachine
from tests.boot.test_boot_arm64 import shared_build
from tests.boot.test_boot_minimal import check_configured
from tests.conftest import needs_root_tools, run_build

pytestmark = [pytest.mark.boot, needs_root_tools()]


def test_secure_boot_image_boots_with_secure_boot_enforced(build_recipe, ssh_key: Path) -> None:
    built = build_recipe("debian-13-secureboot.yaml")
    with VirtualMachine(built.artifact("disk.qcow2"), "uefi-secureboot") as vm:
        vm.wait_for(timeout=400)
        assert "UEFI Secure Boot is enabled" in vm.console()  # the kernel's EFI stub
        check_configured(vm, ssh_key)
        assert vm.ssh("admin", ssh_key, "mokutil --sb-state").strip() == "SecureBoot enabled"
        lockdown = vm.ssh("admin", ssh_key, "cat /sys/kernel/security/lockdown")
        assert "[integrity]" in lockdown or "[confidentiality]" in lockdown
        assert vm.ssh("admin", ssh_key, "hostname").strip() == "secureboot"
        # a kernel upgrade would not replace amiforge's grub.cfg (grub2-common's hooks)
        assert vm.ssh("admin", ssh_key, "ls /etc/kernel/postinst.d/ /etc/kernel/postrm.d/ "
                      "| grep -c update-grub || true").strip() == "0"
        assert "console=ttyS0" in vm.ssh("admin", ssh_key, "cat /boot/grub/grub.cfg")
    audit = run_build("audit", str(built.artifact("disk.qcow2")))
    assert audit.returncode == 0, audit.stdout


def test_enforcing_firmware_refuses_an_unsigned_bootloader(build_recipe) -> None:
    unsigned = build_recipe("debian-13-minimal.yaml").artifact("disk.qcow2")
    with VirtualMachine(unsigned, "uefi-secureboot") as vm:
        vm.wait_for(r"Access Denied|Security Violation", timeout=180)
        assert "login:" not in vm.console()
        assert "Booting `" not in vm.console()  # GRUB never ran


@pytest.mark.arm64
@pytest.mark.timeout(3600)  # see test_boot_arm64
def test_arm64_secure_boot_image_boots_with_secure_boot_enforced(build_recipe,
                                                                 ssh_key: Path) -> None:
    """Graviton's chain: AAVMF with Microsoft's keys enrolled starts Debian's signed arm64
    shim (BOOTAA64.EFI), GRUB and kernel. Its bootstrap is the arm64 recipe's, completed
    with the signed packages (one emulated bootstrap for both)."""
    shared_build(build_recipe)
    built = build_recipe("debian-13-arm64-secureboot.yaml")
    assert built.manifest["stages"]["bootstrap"]["source"] == "extended"
    with VirtualMachine(built.artifact("disk.qcow2"), "uefi-secureboot", arch="arm64") as vm:
        seconds = vm.wait_for(timeout=900)
        print(f"arm64 (uefi-secureboot): login prompt after {seconds:.1f}s")
        assert "UEFI Secure Boot is enabled" in vm.console()  # the kernel's EFI stub
        check_configured(vm, ssh_key)
        assert vm.ssh("admin", ssh_key, "mokutil --sb-state").strip() == "SecureBoot enabled"
        assert vm.ssh("admin", ssh_key, "dpkg --print-architecture").strip() == "arm64"
        lockdown = vm.ssh("admin", ssh_key, "cat /sys/kernel/security/lockdown")
        assert "[integrity]" in lockdown or "[confidentiality]" in lockdown
