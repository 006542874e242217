"""Commands inside the new root: a private mount and PID namespace per call.

/proc, /sys and /dev are mounted inside a fresh mount namespace, so they vanish with it:
nothing can leak onto the host, whatever happens to amiforge. The PID namespace means a
script cannot leave a daemon running after it returns. Commands get a fixed environment;
recipe values are passed as arguments or files, never spliced into a host shell line."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from builder.run import run

# A constant host-side helper: positional arguments carry the root and the command.
_ENTER = r"""set -e
root=$1; shift
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
exec chroot "$root" "$@"
"""

CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "DEBIAN_FRONTEND": "noninteractive",
    "LC_ALL": "C.UTF-8",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
}


def chroot_argv(root: Path, command: Sequence[str]) -> list[str]:
    """The argument list that runs ``command`` inside ``root`` in private namespaces."""
    return ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation",
            "private", "/bin/sh", "-c", _ENTER, "amiforge-chroot", str(root), *command]


def run_in_root(root: Path, command: Sequence[str], capture: bool = False) -> str:
    passed = ("http_proxy", "https_proxy", "SOURCE_DATE_EPOCH")
    env = {k: v for k, v in os.environ.items() if k in passed}
    return run(chroot_argv(root, command), env={**CHROOT_ENV, **env}, capture=capture)


@contextlib.contextmanager
def prepared_root(root: Path) -> Iterator[None]:
    """For the duration: no service starts (policy-rc.d) and the host's resolver works.

    Both are undone on the way out, even on error or interrupt, so the image keeps its
    own /etc/resolv.conf and no build-time policy."""
    policy = root / "usr/sbin/policy-rc.d"
    resolv = root / "etc/resolv.conf"
    saved = root / "etc/.resolv.conf.amiforge"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    had_resolv = resolv.is_symlink() or resolv.exists()
    if had_resolv:
        os.replace(resolv, saved)
    try:
        if Path("/etc/resolv.conf").exists():
            shutil.copyfile("/etc/resolv.conf", resolv)
        yield
    finally:
        policy.unlink(missing_ok=True)
        resolv.unlink(missing_ok=True)
        if had_resolv:
            os.replace(saved, resolv)
