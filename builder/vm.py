"""Boot an image under QEMU and talk to it: the project's boot-test helper.

QEMU runs with TCG (nested KVM is unreliable on CI hosts), on a copy-on-write overlay so the
image is never modified, with the serial console in a log file. ``wait_for`` watches the
console for a pattern (a login prompt by default); ``ssh`` runs a command in the guest over a
forwarded port. Used by the test suite and by ``build boot``."""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from builder.errors import BuildFailed, ToolFailed
from builder.host.run import qemu_img, run, spawn, stop
from builder.imds import GUEST_NETWORK, IMDS_ADDRESS, Instance, MetadataService
from builder.stages.convert import image_info

log = logging.getLogger("amiforge.vm")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")  # qemu-efi-aarch64
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
FIRMWARE_VARS = {"x86_64": OVMF_VARS, "arm64": AAVMF_VARS}
# (arm64: AAVMF with Microsoft's keys enrolled; the virt machine has no SMM to guard them)
AAVMF_SECURE_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.ms.fd")
AAVMF_SECURE_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.ms.fd")

# Secure Boot enforced: OVMF's SMM build with Microsoft's keys enrolled (Debian's ovmf);
# the firmware starts only what those keys' chain signed (shim, which trusts Debian's)
OVMF_SECURE_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.ms.fd")
OVMF_SECURE_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
SECURE_VARS = {"x86_64": OVMF_SECURE_VARS, "arm64": AAVMF_SECURE_VARS}
FIRMWARES = ("bios", "uefi", "uefi-secureboot")
LOGIN_PROMPT = r"login:"
CONSOLE_STALL = 150  # seconds without a byte on the console: the guest has stopped
# the kernel's last word before it starts init (x86_64 and arm64): the hang CONSOLE_STALL
# is for happens before it; a silence after it is a slow machine's services starting
USERSPACE = "Freeing unused kernel"
PANIC = "Kernel panic - not syncing"  # (seen under TCG on a busy machine, early in a boot)
SSH_CONNECT_FAILED = 255
EC2_UUID = "ec2e1f4a-5c3b-4d2e-8f00-000000000001"
# TCG runs a guest 10-30 times slower than hardware: an emulated arm64 Debian 13 starts udevd
# about 130 s into its boot, after systemd's 90 s for a device job (DefaultDeviceTimeoutSec)
# has run out, so the serial getty on ttyAMA0 failed ("Timed out waiting for device
# dev-ttyAMA0.device", seen in CI). An arm64 machine gives its devices more time with a
# drop-in for every device unit (dev-.device.d, systemd's prefix drop-in) passed as a
# system credential in SMBIOS (systemd.unit-dropin.*, systemd 256 and later; older
# systemd ignores it); the image itself is not changed. Less than the arm64 tests' 900 s
# wait, so a device that never comes still ends in emergency mode on the console in time.
# (x86_64 guests start udevd in time; they keep systemd's 90 s.)
DEVICE_TIMEOUT = 600
SLOW_DEVICES_DROPIN = f"[Unit]\nJobRunningTimeoutSec={DEVICE_TIMEOUT}\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def image_format(image: Path) -> str:
    return str(image_info(image)["format"])


def image_size(image: Path) -> int:
    """The disk's size as a guest sees it (a qcow2's virtual size)."""
    return int(str(image_info(image)["virtual-size"]))


def ebs_serial(index: int) -> str:
    """An EBS-like NVMe serial (the volume id without its dash: what Nitro instances show
    and what amazon-ec2-utils' udev rules read), fixed per disk position."""
    return f"vol{index + 1:017x}"


def instance_store_serial(index: int) -> str:
    """What Nitro shows for an instance-store NVMe disk: "AWS" and 17 hex digits."""
    return f"AWS{index + 1:017X}"


def disk_argv(disks: list[Path], nvme: bool, instance_store: int = 0) -> list[str]:
    """virtio disks, or (an EC2-like machine) NVMe controllers with EBS-like serials, the
    last ``instance_store`` with instance-store serials."""
    argv: list[str] = []
    first_store = len(disks) - instance_store
    for index, disk in enumerate(disks):
        if not nvme:
            argv += ["-drive", f"file={disk},format=qcow2,if=virtio"]
            continue
        serial = ebs_serial(index) if index < first_store else \
            instance_store_serial(index - first_store)
        argv += ["-drive", f"file={disk},format=qcow2,if=none,id=disk{index}",
                 "-device", f"nvme,serial={serial},drive=disk{index}"]
    return argv


def qemu_argv(firmware: str, disks: list[Path], work: Path, forwards: dict[int, int],
              memory_mib: int = 1024, arch: str = "x86_64", ec2: bool = False,
              imds_command: str | None = None, instance_store: int = 0) -> list[str]:
    """x86_64: the q35 machine, SeaBIOS or OVMF. arm64: the virt machine (a PL011 console,
    ttyAMA0) with AAVMF; UEFI only, as on Graviton. ``imds_command`` (EC2-like machines)
    serves the guest's connections to 169.254.169.254:80."""
    if arch == "arm64":
        argv = ["qemu-system-aarch64", "-accel", "tcg", "-machine", "virt", "-cpu", "cortex-a72"]
        code = AAVMF_SECURE_CODE if firmware == "uefi-secureboot" else AAVMF_CODE
    elif firmware == "uefi-secureboot":  # its variables are protected by SMM
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35,smm=on",
                "-global", "driver=cfi.pflash01,property=secure,value=on"]
        code = OVMF_SECURE_CODE
    else:
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35"]
        code = OVMF_CODE
    argv += ["-m", str(memory_mib), "-smp", "2", "-nographic", "-no-reboot",
             "-serial", "mon:stdio"]
    if firmware in ("uefi", "uefi-secureboot"):
        argv += ["-drive", f"if=pflash,format=raw,readonly=on,file={code}",
                 "-drive", f"if=pflash,format=raw,file={work / 'vars.fd'}"]
    argv += disk_argv(disks, nvme=ec2, instance_store=instance_store)
    if ec2:  # what an instance's firmware says: cloud-init (ds-identify) takes a machine
        # whose product UUID and serial are equal and start with "ec2" for EC2
        argv += ["-smbios", f"type=1,manufacturer=Amazon EC2,product=amiforge-ec2-like,"
                 f"serial={EC2_UUID}", "-uuid", EC2_UUID]
    if arch == "arm64":
        argv += ["-smbios", f"type=11,value={slow_devices_credential()}"]
    # Entropy for the guest: TCG's CPU has no RDRAND, and a boot that waits in getrandom()
    # can stall past the timeout (seen once in CI).
    argv += ["-device", "virtio-rng-pci"]
    return [*argv, "-nic", user_network(forwards, ec2, imds_command)]


def slow_devices_credential() -> str:
    """SMBIOS OEM string for SLOW_DEVICES_DROPIN (base64: the drop-in has newlines, and
    QEMU's option syntax would take a comma as the end of the value)."""
    encoded = base64.b64encode(SLOW_DEVICES_DROPIN.encode()).decode()
    return f"io.systemd.credential.binary:systemd.unit-dropin.dev-.device={encoded}"


def user_network(forwards: dict[int, int], ec2: bool, imds_command: str | None) -> str:
    """QEMU's user network: host ports forwarded to the guest's. On an EC2-like machine the
    guest's /24 holds 169.254.169.254 (QEMU forwards only addresses of its own network),
    connections to it on port 80 go to ``imds_command``, and nothing else leaves the
    guest: restricted, without IPv6, it cannot reach the host's own services (QEMU maps
    the rest of that /24 to the host's loopback) nor the host's metadata service at
    [fd00:ec2::254] on an EC2 host, which cloud-init asks alongside the IPv4 one."""
    nic = "user,model=virtio-net-pci" + "".join(
        f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in sorted(forwards.items()))
    if ec2:
        nic += f",net={GUEST_NETWORK},restrict=on,ipv6=off"
    if ec2 and imds_command:  # (a comma in an option's value is written twice)
        nic += f",guestfwd=tcp:{IMDS_ADDRESS}:80-cmd:{imds_command.replace(',', ',,')}"
    return nic


@dataclass
class VirtualMachine:
    image: Path
    firmware: str = "bios"
    arch: str = "x86_64"
    extra_disks: list[Path] = field(default_factory=list)
    instance_store: list[Path] = field(default_factory=list)  # (ec2) after extra_disks
    ec2: bool = False              # NVMe disks with EBS-like serials, EC2's SMBIOS, IMDSv2
    root_size: int | None = None   # the root volume larger than the image (bytes), as EBS's
    instance: Instance | None = None  # (ec2) what the metadata service says
    guest_ports: tuple[int, ...] = (22,)
    forwards: dict[int, int] = field(default_factory=dict)
    imds: MetadataService | None = None
    _work: Path | None = None
    _disks: list[Path] = field(default_factory=list)
    _proc: subprocess.Popen[bytes] | None = None
    _started: float = 0.0
    _seen_pattern: bool = False

    def __enter__(self) -> VirtualMachine:
        try:
            if self.ec2:
                self.imds = MetadataService(self.instance or Instance(architecture=self.arch))
                self.imds.__enter__()
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self._cleanup()
        finally:
            if self.imds is not None:
                self.imds.__exit__()

    def _start(self) -> None:
        """A fresh machine: new overlays, new firmware variables, QEMU started."""
        self._work = Path(tempfile.mkdtemp(prefix="amiforge-vm-"))
        self._disks = [self._overlay(disk, i) for i, disk in
                       enumerate([self.image, *self.extra_disks, *self.instance_store])]
        if self.arch == "arm64" and self.firmware == "bios":
            raise BuildFailed("arm64 images boot with UEFI only (--firmware uefi or "
                              "uefi-secureboot)")
        if self.firmware == "uefi":
            shutil.copyfile(FIRMWARE_VARS[self.arch], self._work / "vars.fd")
        elif self.firmware == "uefi-secureboot":
            shutil.copyfile(SECURE_VARS[self.arch], self._work / "vars.fd")
        self._spawn()

    def _spawn(self) -> None:
        assert self._work is not None
        self.forwards = {port: free_port() for port in self.guest_ports}
        self._started = time.monotonic()
        self._proc = spawn(qemu_argv(self.firmware, self._disks, self._work, self.forwards,
                                     arch=self.arch, ec2=self.ec2,
                                     imds_command=self.imds and self.imds.relay_command(),
                                     instance_store=len(self.instance_store)),
                           log_path=self.console_log)

    def power_on_again(self, timeout: float = 120) -> None:
        """Start the machine again on the same disks and firmware variables, once the guest
        has powered itself off or asked to reboot (QEMU runs with -no-reboot): a second
        boot of the same instance. The first boot's console is kept in console-1.log."""
        assert self._proc is not None and self._work is not None
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BuildFailed(f"the guest did not shut down within {timeout:.0f}s") from None
        self._close_ssh()
        boots = len(list(self._work.glob("console-*.log"))) + 1
        self.console_log.rename(self._work / f"console-{boots}.log")
        self._spawn()

    def reboot(self, user: str, key: Path, timeout: float = 300) -> float:
        """Reboot the guest from inside, as an instance reboots (same disks, same instance
        and metadata), and wait for its login prompt again."""
        self.ssh(user, key, "sudo -n systemd-run --on-active=1 systemctl reboot")
        self.power_on_again()
        try:
            return self.wait_for(timeout=timeout)
        except BuildFailed:
            if PANIC not in self.console():
                raise
        # TCG now and then panics a kernel early in its boot (an emulation fault, before
        # the root is mounted): power the same instance on once more
        log.warning("the guest's kernel panicked after the reboot: powering it on again")
        assert self._proc is not None
        self._proc.kill()
        self.power_on_again()
        return self.wait_for(timeout=timeout)

    def _close_ssh(self) -> None:
        assert self._work is not None
        for master in self._work.glob("ssh-*"):  # before the guest goes: a clean exit
            with contextlib.suppress(ToolFailed):
                run(["ssh", "-o", f"ControlPath={master}", "-O", "exit", "guest"],
                    capture=True)
            master.unlink(missing_ok=True)

    def _cleanup(self) -> None:
        if self._work is not None:
            self._close_ssh()
        if self._proc is not None:
            stop(self._proc)
            self._proc = None
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def _overlay(self, disk: Path, index: int) -> Path:
        assert self._work is not None
        overlay = self._work / f"disk{index}.qcow2"
        size = [str(self.root_size)] if index == 0 and self.root_size else []
        qemu_img("create", "-q", "-f", "qcow2", "-F", image_format(disk), "-b",
                 str(disk.resolve()), str(overlay), *size)
        return overlay

    def _multiplexing(self) -> list[str]:
        """One SSH connection per VM, reused by every command: a key exchange costs about a
        second in an emulated guest."""
        assert self._work is not None
        return ["-o", "ControlMaster=auto", "-o", f"ControlPath={self._work}/ssh-%C",
                "-o", "ControlPersist=300"]

    @property
    def console_log(self) -> Path:
        assert self._work is not None
        return self._work / "console.log"

    def console(self) -> str:
        return self.console_log.read_bytes().decode(errors="replace")

    def wait_for(self, pattern: str = LOGIN_PROMPT, timeout: float = 300) -> float:
        """Seconds from QEMU's start until ``pattern`` shows on the console.

        A first boot whose console stays silent for CONSOLE_STALL seconds is started once
        more from scratch, with a warning: TCG now and then stops a guest for good early in
        its boot (seen in CI: a kernel silent after 1 s, the same image booting in 20 s
        on the next try), and so is one whose kernel panicked. A later wait (after a reboot
        the test asked for) is not restarted, since the disks hold that boot's state; a
        panic then fails it at once."""
        regex = re.compile(pattern)
        restarts = 0 if self._seen_pattern else 1
        seen, silent_since = -1, time.monotonic()
        while time.monotonic() < self._started + timeout:
            text = self.console()
            if regex.search(text):
                self._seen_pattern = True
                return time.monotonic() - self._started
            if self._proc is not None and self._proc.poll() is not None:
                break
            if len(text) != seen:
                seen, silent_since = len(text), time.monotonic()
            why = self._hung(text, time.monotonic() - silent_since)
            if why and not restarts and PANIC in text:  # it will not come back
                break
            if why and restarts:
                log.warning("%s: starting the machine again", why)
                restarts -= 1
                self._cleanup()
                self._start()
                seen, silent_since = -1, time.monotonic()
                continue
            time.sleep(0.5)
        raise BuildFailed(f"no {pattern!r} on the console within {timeout:.0f}s; last lines:\n"
                          + "\n".join(self.console().splitlines()[-15:]))

    @staticmethod
    def _hung(text: str, silent: float) -> str | None:
        """Why a booting guest looks hung (None if it does not): its kernel panicked, or its
        console has been silent for CONSOLE_STALL seconds before the kernel started init
        (at a login prompt it is only idle; after init, silence is systemd's quiet work on
        a slow machine)."""
        if PANIC in text:
            return "the guest's kernel panicked"
        if (silent > CONSOLE_STALL and not re.search(LOGIN_PROMPT, text)
                and USERSPACE not in text):
            return (f"the console has been silent for {CONSOLE_STALL}s "
                    f"(last: {text.splitlines()[-1:]!r})")
        return None

    def ssh(self, user: str, key: Path, command: str, timeout: float = 120) -> str:
        """Run ``command`` in the guest; retries while sshd is still coming up."""
        argv = ["ssh", "-i", str(key), "-p", str(self.forwards[22]), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", *self._multiplexing(),
                f"{user}@127.0.0.1", command]
        deadline = time.monotonic() + timeout
        while True:
            try:
                return run(argv, capture=True)
            except ToolFailed as exc:
                if exc.returncode != SSH_CONNECT_FAILED or time.monotonic() > deadline:
                    raise
                time.sleep(2)
