"""SIGINT at each stage: exit 130, nothing left behind (mounts, loop devices, processes,
temporary trees, half-written cache entries), and the earlier good output untouched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.plan import sha256_file
from tests.conftest import ROOT, copy_recipes, needs_root_tools

pytestmark = [pytest.mark.integration, needs_root_tools()]

# the first command of each stage, as `-v` logs it
STAGE_COMMANDS = {"bootstrap": "$ mmdebstrap --mode", "configure": "$ unshare",
                  "filesystem": "$ mkfs.ext4", "disk": "$ sfdisk", "convert": "$ qemu-img convert"}


def host_state() -> tuple[str, str]:
    mounts = "".join(sorted(Path("/proc/mounts").read_text().splitlines(keepends=True)))
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return mounts, loops


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(cmdline.decode(errors="replace"))
    return found


@pytest.mark.parametrize("stage", list(STAGE_COMMANDS))
def test_interrupt_at_stage(stage: str, tmp_path: Path, suite_cache: Path) -> None:
    recipes = copy_recipes(tmp_path / "recipes")
    (recipes / "files/motd").write_text(f"interrupted at {stage}\n")  # configure must run
    out = tmp_path / "out"
    out.mkdir()
    good = {"disk.raw": b"an earlier good image", "build-manifest.json": b"{}"}
    for name, data in good.items():
        (out / name).write_bytes(data)
    cache_args = ["--no-cache"] if stage == "bootstrap" else ["--cache-dir", str(suite_cache)]
    before = host_state()
    process = subprocess.Popen(
        [sys.executable, "-m", "builder", str(recipes / "debian-12-minimal.yaml"), "-v",
         "-o", str(out), *cache_args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    log = []
    assert process.stderr is not None
    for line in process.stderr:
        log.append(line)
        if STAGE_COMMANDS[stage] in line:
            time.sleep(0.5 if stage != "bootstrap" else 5)
            process.send_signal(signal.SIGINT)
            break
    rest = process.communicate(timeout=300)[1]
    assert process.returncode == 130, "".join(log[-20:]) + rest
    assert "Traceback" not in rest
    assert host_state() == before
    assert processes_mentioning(str(tmp_path)) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(good)
    for name, data in good.items():
        assert (out / name).read_bytes() == data
    assert not list(suite_cache.glob("stages/*/.tmp-*"))


def test_second_build_of_the_same_output_directory_is_refused(tmp_path: Path,
                                                              suite_cache: Path) -> None:
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "builder", "recipes/debian-12-minimal.yaml", "-o", str(out),
         "--cache-dir", str(suite_cache)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not out.exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        second = subprocess.run(
            [sys.executable, "-m", "builder", "recipes/debian-12-minimal.yaml", "-o", str(out),
             "--cache-dir", str(suite_cache)], cwd=ROOT, capture_output=True, text=True)
        assert second.returncode == 2
        assert "another amiforge build is using this output directory" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=300)


def test_audit_error_fails_the_build_unless_waived(tmp_path: Path, suite_cache: Path) -> None:
    recipes = copy_recipes(tmp_path / "recipes")
    leaky = recipes / "leaky.yaml"
    leaky.write_text("extends: debian-12-minimal.yaml\nname: leaky-image\nroot_volume:\n"
                     "  files:\n    - {dest: /etc/app/deploy.key, mode: \"0600\", content: "
                     "\"-----BEGIN RSA PRIVATE KEY-----\\nMIIE\\n\"}\n")
    result = subprocess.run([sys.executable, "-m", "builder", str(leaky), "-o",
                             str(tmp_path / "out"), "--cache-dir", str(suite_cache)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert "fails the shared-AMI audit" in result.stderr
    assert "private-keys /etc/app/deploy.key" in result.stderr
    assert not (tmp_path / "out").exists()
    leaky.write_text(leaky.read_text() + "audit:\n  allow:\n    - {check: private-keys, "
                     "reason: a throw-away demo key for the training image}\n")
    result = subprocess.run([sys.executable, "-m", "builder", str(leaky), "-o",
                             str(tmp_path / "out"), "--cache-dir", str(suite_cache)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "out/build-manifest.json").read_text())
    assert manifest["audit"]["waivers"] == [
        {"check": "private-keys", "reason": "a throw-away demo key for the training image"}]
    assert any(f["severity"] == "waived" for f in manifest["audit"]["findings"])
    raw = next(a for a in manifest["artifacts"] if a["path"] == "disk.raw")
    assert sha256_file(tmp_path / "out/disk.raw") == raw["sha256"]


def test_scripts_cannot_leave_processes_running(tmp_path: Path, suite_cache: Path) -> None:
    recipes = copy_recipes(tmp_path / "recipes")
    daemon = recipes / "daemon.yaml"
    daemon.write_text("extends: debian-12-minimal.yaml\nname: daemon-image\nroot_volume:\n"
                      "  scripts:\n    - run: (sleep 31337 </dev/null >/dev/null 2>&1 &)\n")
    result = subprocess.run([sys.executable, "-m", "builder", str(daemon), "-o",
                             str(tmp_path / "out"), "--cache-dir", str(suite_cache)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert processes_mentioning("sleep 31337") == []
