"""The one place that starts external programs.

Argument lists are built elsewhere by pure functions; this module runs them, hides their
output unless asked (``-v``), and turns failures into :mod:`builder.errors` exceptions that
carry the tail of the tool's output. qemu-img goes through the ``sh`` package.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import platform
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import sh

from builder.errors import ToolFailed, ToolMissing
from builder.host.aptauth import redact

log = logging.getLogger("amiforge.run")

TAIL_LINES = 200

# arm64 binaries on an x86_64 host run under qemu-user, whose default CPU ("max") has SVE;
# glibc then picks SVE string and memory routines, which TCG emulates element by element:
# systemd-hwdb took 36 s instead of 2 s, perl scripts 4x as long. A Neoverse N1 (the core
# of Graviton2) has no SVE. QEMU_CPU reaches every emulated process of a build through the
# environment; one the user set wins.
EMULATION_ENV = {"QEMU_CPU": "neoverse-n1"} if platform.machine() == "x86_64" else {}


def _describe(argv: Sequence[str]) -> str:
    return redact(shlex.join(str(a) for a in argv))


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    capture: bool = False,
    cwd: str | os.PathLike[str] | None = None,
) -> str:
    """Run ``argv``; return its stdout when ``capture`` is set, else "".

    Without ``capture`` stdout and stderr are merged and kept (the last lines) for the
    error message; with ``-v`` logging they are also echoed as they arrive.
    """
    args = [str(a) for a in argv]
    log.debug("$ %s", _describe(args))
    full_env = {**EMULATION_ENV, **os.environ, "LC_ALL": "C.UTF-8", **(env or {})}
    try:
        if capture:
            proc = subprocess.run(args, env=full_env, input=input, cwd=cwd,
                                  capture_output=True, check=False)
            if proc.returncode != 0:
                raise ToolFailed(args, proc.returncode,
                                 redact(proc.stderr.decode(errors="replace")))
            return proc.stdout.decode(errors="replace")
        return _run_streaming(args, full_env, input, cwd)
    except FileNotFoundError as exc:
        raise ToolMissing([(args[0], "this build step", package_for(args[0]))]) from exc


def _run_streaming(args: list[str], env: Mapping[str, str], input: bytes | None,
                   cwd: str | os.PathLike[str] | None) -> str:
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    echo = log.isEnabledFor(logging.DEBUG)
    with subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.PIPE if input else
                          subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, start_new_session=True) as proc:
        try:
            if input is not None and proc.stdin:
                proc.stdin.write(input)
                proc.stdin.close()
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                tail.append(line)
                if echo:
                    print(f"    {redact(line)}", file=sys.stderr, flush=True)
            returncode = proc.wait()
        except BaseException:
            _stop(proc)
            raise
    if returncode == 127:
        raise ToolMissing([(args[0], "this build step", package_for(args[0]))])
    if returncode != 0:
        raise ToolFailed(args, returncode, redact("\n".join(tail)))
    return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a child we are abandoning (interrupt or error), with everything it
    started (its own process group), and reap it."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _signal_group(proc, signal.SIGKILL)  # stragglers that outlived their parent


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def qemu_img(*args: str | os.PathLike[str]) -> str:
    """Run ``qemu-img`` through the ``sh`` package and return its stdout."""
    return run_sh("qemu-img", [str(a) for a in args], "disk image conversion")


def run_sh(program: str, args: list[str], purpose: str) -> str:
    """A program run through ``sh``, with ``run()``'s behaviour: logged, errors as
    ToolFailed with the tail of its output, and on an interrupt or error the program is
    stopped with everything it started (its own session)."""
    log.debug("$ %s", _describe([program, *args]))
    try:
        cmd = sh.Command(program)
    except sh.CommandNotFound as exc:
        raise ToolMissing([(program, purpose, package_for(program))]) from exc
    running = cmd(*args, _env={**os.environ, "LC_ALL": "C.UTF-8"}, _bg=True,
                  _bg_exc=False, _new_session=True)
    try:
        running.wait()
    except sh.ErrorReturnCode as exc:
        output = redact((exc.stderr or b"").decode(errors="replace"))
        raise ToolFailed([program, *args], exc.exit_code, output) from exc
    except BaseException:
        with contextlib.suppress(ProcessLookupError, OSError):
            running.process.signal_group(signal.SIGTERM)
        with contextlib.suppress(Exception):
            running.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError, OSError):
            running.process.signal_group(signal.SIGKILL)
        raise
    return str(running)


PACKAGES = {
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "mkfs.fat": "dosfstools",
    "debugfs": "e2fsprogs",
    "mcopy": "mtools",
    "mmd": "mtools",
    "sfdisk": "fdisk",
    "grub-mkimage": "grub-common grub-pc-bin grub-efi-amd64-bin",
    "grub-script-check": "grub-common",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "unshare": "util-linux",
    "chroot": "coreutils",
    "dpkg-query": "dpkg",
}


def package_for(program: str) -> str:
    return PACKAGES.get(os.path.basename(program), os.path.basename(program))


def spawn(argv: Sequence[str | os.PathLike[str]], *, log_path: Path) -> subprocess.Popen[bytes]:
    """Start a long-running program (a VM) with stdout and stderr going to ``log_path``."""
    args = [str(a) for a in argv]
    log.debug("$ %s &", _describe(args))
    with open(log_path, "wb") as handle:
        try:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except FileNotFoundError as exc:
            raise ToolMissing([(args[0], "booting images", package_for(args[0]))]) from exc


def start(argv: Sequence[str | os.PathLike[str]]) -> subprocess.Popen[bytes]:
    """Start a program whose stdout and stderr the caller reads as it runs (the builds of
    a ``-j`` run)."""
    args = [str(a) for a in argv]
    log.debug("$ %s &", _describe(args))
    try:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except FileNotFoundError as exc:
        raise ToolMissing([(args[0], "this step", package_for(args[0]))]) from exc


def stop(proc: subprocess.Popen[bytes]) -> None:
    _stop(proc)
