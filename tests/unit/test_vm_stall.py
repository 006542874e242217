"""The boot helper starts a guest again, once, when its first boot goes silent (TCG's rare
hang early in a kernel's boot), and never after a boot it has seen."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

import builder.vm as vm
from builder.errors import BuildFailed
from builder.host.run import qemu_img, spawn, stop

pytestmark = pytest.mark.unit


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A VirtualMachine whose 'QEMU' plays the given console scripts, one per start."""
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "1M")
    monkeypatch.setattr(vm, "CONSOLE_STALL", 1)
    starts: list[str] = []

    def plays(*scripts: str) -> vm.VirtualMachine:
        def fake_argv(*_args, **_kwargs) -> list[str]:
            starts.append(scripts[len(starts)])
            return ["sh", "-c", starts[-1]]
        monkeypatch.setattr(vm, "qemu_argv", fake_argv)
        return vm.VirtualMachine(image, "bios")
    plays.starts = starts
    return plays


def test_a_silent_first_boot_is_started_once_more(machine, caplog) -> None:
    hangs = "echo '[ 1.05] clocksource: hpet'; exec sleep 30"
    with machine(hangs, "echo 'debian login:'") as guest:
        guest.wait_for(timeout=20)
    assert len(machine.starts) == 2
    assert "silent for 1s" in caplog.text and "clocksource" in caplog.text


def test_a_guest_silent_twice_fails_with_its_console(machine) -> None:
    with machine("echo first; exec sleep 30", "echo second; exec sleep 30") as guest, \
            pytest.raises(BuildFailed, match=r"no 'login:'.*\n.*second"):
        guest.wait_for(timeout=4)
    assert len(machine.starts) == 2


def test_a_guest_idle_at_its_prompt_or_after_a_seen_boot_is_not_restarted(machine) -> None:
    with machine("echo 'debian login:'; exec sleep 30", "echo never") as guest:
        with pytest.raises(BuildFailed):
            guest.wait_for("user-data ran", timeout=3)   # silent, but at its login prompt
        guest.wait_for(timeout=10)   # (timeouts count from the machine's start)
        with pytest.raises(BuildFailed):
            guest.wait_for("after reboot", timeout=6)   # a boot was seen: no fresh disks
    assert len(machine.starts) == 1


def test_a_machine_stops_at_once_with_what_it_started(tmp_path: Path) -> None:
    """QEMU gets SIGTERM in its own process group (it used to wait out a 20 s grace)."""
    proc = spawn(["sh", "-c", "sleep 60 & exec sleep 60"], log_path=tmp_path / "log")
    began = time.monotonic()
    stop(proc)
    assert time.monotonic() - began < 5
    assert proc.returncode == -signal.SIGTERM


def test_a_guest_silent_after_its_kernel_started_init_is_not_restarted(machine) -> None:
    """A slow machine (TCG, the other tier's tests alongside): systemd starts services for
    minutes without a line on the console; starting again would only lose that time."""
    slow = "echo '[ 9.1] Freeing unused kernel image (initmem) memory'; sleep 3; echo 'login:'"
    with machine(slow, "echo never") as guest:
        guest.wait_for(timeout=20)
    assert len(machine.starts) == 1


def test_a_kernel_panic_early_in_a_first_boot_starts_it_again(machine, caplog) -> None:
    panics = "echo '[ 6.7] Kernel panic - not syncing: Fatal exception'; exec sleep 30"
    with machine(panics, "echo 'debian login:'") as guest:
        guest.wait_for(timeout=20)
    assert len(machine.starts) == 2 and "panicked" in caplog.text


def test_a_panic_twice_fails_at_once(machine) -> None:
    panics = "echo '[ 6.7] Kernel panic - not syncing: Fatal exception'; exec sleep 30"
    started = time.monotonic()
    with machine(panics, panics) as guest, pytest.raises(BuildFailed, match="Kernel panic"):
        guest.wait_for(timeout=25)
    assert time.monotonic() - started < 15  # not the whole timeout
