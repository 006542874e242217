"""Argument lists for external programs are pure functions; check them without running."""

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from builder.host.chroot import chroot_argv
from builder.host.fsutil import allocated_bytes
from builder.image.filesystem import fat_volume_id, make_ext4, mkfs_ext4_argv, mkfs_xfs_argv
from builder.plan import OSPlan
from builder.stages.bootstrap import (
    DEFER_INITRAMFS,
    DROP_HOST_KEYS,
    MAKE_INITRAMFS,
    PLACE_HOST_KEYS,
    SAFE_IO_AGAIN,
    mmdebstrap_argv,
    write_seed_files,
)
from builder.stages.convert import convert_args
from builder.vm import qemu_argv

OS = OSPlan(distribution="debian", release="bookworm", mirror="http://deb.debian.org/debian",
            security_mirror="http://security.debian.org/debian-security",
            suites=("bookworm", "bookworm-updates", "bookworm-security"),
            components=("main", "contrib"), architecture="amd64",
            packages=("systemd-sysv", "vim"), initramfs_modules=("virtio_blk",))


def test_mmdebstrap_without_cache() -> None:
    argv = mmdebstrap_argv(OS, Path("/w/tree"), None)
    assert argv[0] == "mmdebstrap"
    assert "--mode=unshare" in argv and "--variant=minbase" in argv
    assert "--include=systemd-sysv,vim" in argv
    assert "--architectures=amd64" in argv
    assert argv[-5:] == [
        "bookworm", "/w/tree",  # the release and target; then the sources, release first
        "deb http://deb.debian.org/debian bookworm main contrib",
        "deb http://deb.debian.org/debian bookworm-updates main contrib",
        "deb http://security.debian.org/debian-security bookworm-security main contrib"]
    assert argv[-6] == "--"
    assert not any(a.startswith("--setup-hook") for a in argv)
    assert "--dpkgopt=path-exclude=/usr/share/man/*" in argv


def test_mmdebstrap_seeds_the_initramfs_config_before_the_kernel_is_installed() -> None:
    argv = mmdebstrap_argv(OS, Path("/w/tree"), None, Path("/w/tree seed"))
    hooks = [a.removeprefix("--essential-hook=") for a in argv
             if a.startswith("--essential-hook=")]
    assert hooks == [
        PLACE_HOST_KEYS,
        'mkdir -p "$1"/etc/initramfs-tools/conf.d "$1"/etc/initramfs-tools/hooks',
        "copy-in '/w/tree seed/amiforge.conf' /etc/initramfs-tools/conf.d",
        "copy-in '/w/tree seed/amiforge-drivers' /etc/initramfs-tools/hooks",
        DEFER_INITRAMFS,
    ]
    customize = [a.removeprefix("--customize-hook=") for a in argv
                 if a.startswith("--customize-hook=")]
    assert MAKE_INITRAMFS in customize  # made once, with every package in place
    assert "update-initramfs -c -k all" in MAKE_INITRAMFS
    assert MAKE_INITRAMFS.index("--remove") < MAKE_INITRAMFS.index("update-initramfs -c")
    # dpkg's backup of its diversions does not keep the diversion in the image
    assert MAKE_INITRAMFS.index("--remove") < MAKE_INITRAMFS.index(
        'chroot "$1" cp -p /var/lib/dpkg/diversions /var/lib/dpkg/diversions-old')


def test_dpkg_skips_fsync_while_bootstrapping_but_not_in_the_image() -> None:
    argv = mmdebstrap_argv(OS, Path("/w/tree"), None)
    assert "--dpkgopt=force-unsafe-io" in argv
    assert f"--customize-hook={SAFE_IO_AGAIN}" in argv
    assert "99mmdebstrap" in SAFE_IO_AGAIN


def test_openssh_makes_no_host_keys_while_bootstrapping() -> None:
    """Empty placeholders stop openssh-server's postinst from making keys (seconds of
    emulated RSA); only the empty ones are removed again."""
    argv = mmdebstrap_argv(OS, Path("/w/tree"), None)
    assert f"--essential-hook={PLACE_HOST_KEYS}" in argv
    assert f"--customize-hook={DROP_HOST_KEYS}" in argv
    for kind in ("rsa", "ecdsa", "ed25519"):
        assert f"/etc/ssh/ssh_host_{kind}_key" in PLACE_HOST_KEYS
    assert '[ ! -s "$key" ]' in DROP_HOST_KEYS


def test_host_tools_are_put_back_after_every_other_hook() -> None:
    argv = mmdebstrap_argv(OS, Path("/w/tree"), None, Path("/w/seed"), None,
                           Path("/w/seed/native"))
    extract = [a for a in argv if a.startswith("--extract-hook=")]
    assert len(extract) == 1 and '[ ! -e "$1"/amiforge-native ]' in extract[0]
    customize = [a.removeprefix("--customize-hook=") for a in argv
                 if a.startswith("--customize-hook=")]
    put_back = next(i for i, hook in enumerate(customize)
                    if "rm -rf \"$1\"/amiforge-native" in hook)
    # mkinitramfs's utilities go in right before it runs (leftovers() reads the result),
    # and everything is put back by the last hook
    made = customize.index(MAKE_INITRAMFS)
    assert "cp --remove-destination --preserve=mode /w/seed/native/usr/bin/gzip" in \
        customize[made - 1]
    assert put_back == len(customize) - 1
    assert not any("native" in a for a in mmdebstrap_argv(OS, Path("/w/tree"), None))


def test_initramfs_seed_lists_the_plans_drivers(tmp_path: Path) -> None:
    os_plan = dataclasses.replace(OS, initramfs_modules=("virtio_blk", "xfs"))
    seed = write_seed_files(os_plan, tmp_path / "seed")
    conf = (seed / "amiforge.conf").read_text().splitlines()
    assert "MODULES=list" in conf and "COMPRESSLEVEL=1" in conf
    hook = seed / "amiforge-drivers"
    assert hook.stat().st_mode & 0o777 == 0o755
    assert hook.read_text().splitlines()[-1] == "manual_add_modules virtio_blk xfs"


def test_mmdebstrap_cache_hooks_quote_the_path() -> None:
    argv = mmdebstrap_argv(OS, Path("/w/tree"), Path("/cache dir/apt"))
    assert "--skip=essential/unlink" in argv
    assert "--setup-hook=sync-in '/cache dir/apt' /var/cache/apt/archives/" in argv
    assert "--customize-hook=sync-out /var/cache/apt/archives '/cache dir/apt'" in argv


def test_mkfs_ext4_is_deterministic_and_grub_compatible() -> None:
    argv = mkfs_ext4_argv(Path("root.img"), Path("tree"), "1234", "root")
    assert argv[:2] == ["mkfs.ext4", "-q"]
    assert argv[argv.index("-U"):argv.index("-U") + 2] == ["-U", "1234"]
    assert "hash_seed=1234" in argv[argv.index("-E") + 1]
    assert "assume_storage_prezeroed=1" in argv[argv.index("-E") + 1]
    assert "^orphan_file" in argv[argv.index("-O") + 1]  # GRUB 2.06 cannot read it
    assert argv[-3:] == ["-d", "tree", "root.img"]


def test_mkfs_xfs() -> None:
    assert mkfs_xfs_argv(Path("d.img"), "u", "data", None) == [
        "mkfs.xfs", "-q", "-f", "-L", "data", "-m", "uuid=u", "d.img"]


def test_fat_volume_id() -> None:
    assert fat_volume_id("766D-BCF5") == "766DBCF5"


def test_convert_args() -> None:
    assert convert_args(Path("d.raw"), Path("d.qcow2"), "qcow2") == [
        "convert", "-q", "-f", "raw", "-O", "qcow2", "d.raw", "d.qcow2"]
    assert "-c" in convert_args(Path("a"), Path("b"), "qcow2", compress=True)
    assert "subformat=streamOptimized" in convert_args(Path("a"), Path("b"), "vmdk")
    vhd = convert_args(Path("a"), Path("b"), "vhd")
    assert vhd[vhd.index("-O") + 1] == "vpc" and "subformat=fixed,force_size=on" in vhd


def test_chroot_argv_passes_values_as_arguments() -> None:
    argv = chroot_argv(Path("/t"), ["useradd", "x; rm -rf /"])
    assert argv[:5] == ["unshare", "--mount", "--pid", "--fork", "--kill-child"]
    assert argv[-3:] == ["/t", "useradd", "x; rm -rf /"]  # never spliced into the script


def test_qemu_uses_tcg_and_forwards_to_loopback(tmp_path: Path) -> None:
    argv = qemu_argv("uefi", [tmp_path / "d.qcow2"], tmp_path, {22: 2222})
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert any("OVMF_CODE" in a for a in argv)
    assert argv[-1] == "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:2222-:22"


def test_qemu_for_arm64_is_the_virt_machine_with_aavmf(tmp_path: Path) -> None:
    argv = qemu_argv("uefi", [tmp_path / "d.qcow2"], tmp_path, {22: 2222}, arch="arm64")
    assert argv[0] == "qemu-system-aarch64"
    assert argv[argv.index("-machine") + 1] == "virt"
    assert any("AAVMF_CODE" in a for a in argv) and not any("OVMF_CODE" in a for a in argv)


def test_an_arm64_machine_gives_its_devices_time_under_tcg(tmp_path: Path) -> None:
    """A systemd credential in SMBIOS (OEM strings): a drop-in for every device unit,
    arm64 only (x86_64 guests start udevd within systemd's 90 s)."""
    import base64
    plain = qemu_argv("uefi", [tmp_path / "d.qcow2"], tmp_path, {22: 2222})
    assert not [a for a in plain if a.startswith("type=11,")]
    argv = qemu_argv("uefi", [tmp_path / "d.qcow2"], tmp_path, {22: 2222}, arch="arm64")
    oem = [a for a in argv if a.startswith("type=11,")]
    assert len(oem) == 1 and "," not in oem[0].removeprefix("type=11,")
    name, _, encoded = oem[0].removeprefix("type=11,value=").partition("=")
    assert name == "io.systemd.credential.binary:systemd.unit-dropin.dev-.device"
    assert base64.b64decode(encoded).decode().splitlines() == [
        "[Unit]", "JobRunningTimeoutSec=600"]


def test_arm64_plan_boots_uefi_with_both_serial_consoles(tmp_path: Path) -> None:
    from builder.plan import make_plan
    from builder.recipe.load import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: graviton\narch: arm64\nroot_volume: {boot: uefi}\n")
    plan = make_plan(load_recipe(recipe))
    assert [p.name for p in plan.partitions] == ["esp", "root"]
    assert {"console=ttyAMA0,115200n8", "console=ttyS0,115200n8"} <= set(plan.kernel_cmdline)
    assert {"linux-image-cloud-arm64", "grub-efi-arm64-bin"} <= set(plan.os.packages)
    assert "xen_blkfront" not in plan.os.initramfs_modules
    assert plan.os.architecture == "arm64"


def test_a_foreign_architecture_needs_qemu_user(tmp_path: Path, monkeypatch) -> None:
    from builder import tools
    from builder.errors import ToolMissing
    from builder.plan import make_plan
    from builder.recipe.load import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: graviton\narch: arm64\nroot_volume: {boot: uefi}\n")
    plan = make_plan(load_recipe(recipe))
    monkeypatch.setattr(tools, "BINFMT", tmp_path / "no-binfmt")
    with pytest.raises(ToolMissing) as missing:
        tools.check_tools(plan)
    assert any("qemu-user-static" in line for line in missing.value.lines())



def test_ext4_image_needs_no_lazy_init_in_the_guest(tmp_path: Path) -> None:
    """Every block group's inode table is marked zeroed (the kernel would otherwise zero
    them at first mount) and nothing but the tree's data and metadata is allocated."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("x\n")
    image = tmp_path / "root.img"
    make_ext4(image, 256 << 20, tree, "0b6b5a2e-8d2b-4c1e-9a53-2f4f5e6d7c8b", "root", 0)
    report = subprocess.run(["dumpe2fs", str(image)], capture_output=True, text=True,
                            check=True).stdout
    groups = re.findall(r"^Group \d+: .*$", report, re.MULTILINE)
    assert groups and all("ITABLE_ZEROED" in group for group in groups)
    assert allocated_bytes(image) < 8 << 20


def test_sh_programs_are_stopped_with_their_children_on_interrupt(tmp_path) -> None:
    """qemu-img runs through `sh`: an interrupt stops it and what it started, as run()
    does for every other program."""
    import os
    import signal
    import time

    from builder.host.run import run_sh

    marker = f"amiforge-sh-test-{os.getpid()}"

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sh("sh", ["-c", f"sleep 300 & exec -a {marker} sleep 300"], "testing")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    time.sleep(0.5)
    alive = [p for p in os.listdir("/proc") if p.isdigit() and
             marker.encode() in _cmdline(p)]
    assert alive == []


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def test_sh_program_failure_is_a_tool_error() -> None:
    from builder.errors import ToolFailed
    from builder.host.run import qemu_img

    with pytest.raises(ToolFailed, match="qemu-img failed"):
        qemu_img("info", "/nonexistent/image.raw")


def test_an_ec2_like_machine_has_nvme_disks_with_ebs_serials(tmp_path: Path) -> None:
    disks = [tmp_path / "root.qcow2", tmp_path / "data.qcow2", tmp_path / "store.qcow2"]
    argv = qemu_argv("uefi", disks, tmp_path, {22: 2222}, ec2=True, instance_store=1)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert "nvme,serial=vol00000000000000001,drive=disk0" in devices
    assert "nvme,serial=vol00000000000000002,drive=disk1" in devices
    assert "nvme,serial=AWS00000000000000001,drive=disk2" in devices  # instance store
    assert not any("if=virtio" in a for a in argv)
    smbios = argv[argv.index("-smbios") + 1]
    assert smbios.startswith("type=1,manufacturer=Amazon EC2,")
    # ds-identify's AWS test: product serial and UUID equal, both starting with "ec2"
    uuid = argv[argv.index("-uuid") + 1]
    assert uuid.startswith("ec2") and f"serial={uuid}" in smbios
    assert len("vol00000000000000001") == 20  # an EBS volume id without its dash


def test_an_ec2_like_machine_reaches_its_metadata_service_on_its_own_link(
        tmp_path: Path) -> None:
    argv = qemu_argv("uefi", [tmp_path / "root.qcow2"], tmp_path, {22: 2222}, ec2=True,
                     imds_command="/opt/py,3/python -m builder.imds 4242")
    nic = argv[argv.index("-nic") + 1]
    assert nic == ("user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:2222-:22,"
                   "net=169.254.169.0/24,restrict=on,ipv6=off,"
                   "guestfwd=tcp:169.254.169.254:80-cmd:"
                   "/opt/py,,3/python -m builder.imds 4242")
    plain = qemu_argv("uefi", [tmp_path / "root.qcow2"], tmp_path, {22: 2222})
    assert plain[plain.index("-nic") + 1] == \
        "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:2222-:22"


def test_secure_boot_firmware_runs_with_smm(tmp_path: Path) -> None:
    argv = qemu_argv("uefi-secureboot", [tmp_path / "d.qcow2"], tmp_path, {22: 2222})
    assert "q35,smm=on" in argv and "driver=cfi.pflash01,property=secure,value=on" in argv
    assert any(a.endswith("OVMF_CODE_4M.ms.fd") for a in argv)
