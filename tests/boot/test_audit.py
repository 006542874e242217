"""`build audit` through libguestfs: clean on the default image, and every planted finding
is reported with its path."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from builder.audit.views import os_roots
from tests.conftest import needs_root_tools, run_build

pytestmark = [pytest.mark.boot, needs_root_tools()]
guestfs = pytest.importorskip("guestfs", reason="needs Debian's python3-guestfs")


def audit(image: Path) -> tuple[int, dict]:
    result = run_build("audit", str(image), "--json", timeout=600)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_default_image_is_clean(build_recipe) -> None:
    code, report = audit(build_recipe("debian-12-minimal.yaml").artifact("disk.qcow2"))
    assert code == 0, report
    assert report["errors"] == 0
    assert not [f for f in report["findings"] if f["severity"] == "error"]


def plant(image: Path) -> None:
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    g = guestfs.GuestFS(python_return_dict=True)
    g.add_drive_opts(str(image), format="qcow2")
    g.launch()
    (root,) = os_roots(g)
    g.mount(root, "/")
    g.write("/etc/ssh/ssh_host_ed25519_key", b"-----BEGIN OPENSSH PRIVATE KEY-----\nx\n")
    shadow = g.cat("/etc/shadow").replace("root:*:", "root:$6$salt$hashedpassword:")
    g.write("/etc/shadow", (shadow + "guest::20000:0:99999:7:::\n").encode())
    g.mkdir_p("/home/admin/.aws")
    g.write("/home/admin/.aws/credentials",
            b"[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = abc\n")
    g.write("/home/admin/deploy.pem", b"-----BEGIN RSA PRIVATE KEY-----\nMIIE\n")
    g.write("/root/.bash_history", b"curl -u admin:secret https://example.com\n")
    g.write("/usr/bin/backdoor", b"#!/bin/sh\n")
    g.chmod(0o777, "/usr/bin/backdoor")
    g.write("/usr/local/bin/rootme", b"\x7fELF")
    g.chmod(0o4755, "/usr/local/bin/rootme")
    g.shutdown()
    g.close()


def test_planted_findings_are_reported(build_recipe, tmp_path: Path) -> None:
    source = build_recipe("debian-12-minimal.yaml").artifact("disk.qcow2")
    copy = tmp_path / "planted.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    str(source), str(copy)], check=True)
    plant(copy)
    code, report = audit(copy)
    assert code == 3
    errors = {(f["check"], f["path"]) for f in report["findings"] if f["severity"] == "error"}
    assert errors >= {
        ("ssh-host-keys", "/etc/ssh/ssh_host_ed25519_key"),
        ("root-password", "/etc/shadow"),
        ("empty-password", "/etc/shadow"),
        ("cloud-credentials", "/home/admin/.aws/credentials"),
        ("private-keys", "/home/admin/deploy.pem"),
        ("shell-history", "/root/.bash_history"),
        ("world-writable", "/usr/bin/backdoor"),
        ("unowned-setuid", "/usr/local/bin/rootme"),
    }, report
    # (the table `build audit` prints without --json: tests/unit/test_audit_checks.py)
