"""Commands inside the new root: a private mount and PID namespace per call.

/proc, /sys and /dev are mounted inside a fresh mount namespace, so they vanish with it:
nothing can leak onto the host, whatever happens to amiforge. The PID namespace means a
script cannot leave a daemon running after it returns. Commands get a fixed environment;
recipe values are passed as arguments or files, never spliced into a host shell line."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from builder.host import treepath
from builder.host.aptauth import AUTH_FILE
from builder.host.run import run

# A constant host-side helper: positional arguments carry the root and the command. The
# tree gets a private, minimal /dev (the nodes a package script or a recipe script needs),
# not the host's: no disks, no /dev/mem. Mount points that are not plain folders (a link
# left by a script) are refused rather than followed.
_ENTER = r"""set -e
root=$1; shift
for dir in proc sys dev; do
    if [ -L "$root/$dir" ] || [ ! -d "$root/$dir" ]; then
        echo "amiforge: /$dir in the image is not a folder" >&2; exit 1
    fi
done
mount -t proc proc "$root/proc"
mount -t sysfs -o ro sysfs "$root/sys"
mount -t tmpfs -o mode=0755,nosuid,size=16m tmpfs "$root/dev"
for node in null zero full random urandom tty; do
    : > "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
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
def prepared_root(root: Path, apt_auth: str | None = None) -> Iterator[None]:
    """For the duration: no service starts (policy-rc.d), the host's resolver works, and
    apt has the mirror's credentials (``apt_auth``).

    All are undone on the way out, even on error or interrupt, so the image keeps its
    own /etc/resolv.conf and no build-time policy or credentials."""
    policy, resolv, saved = "/usr/sbin/policy-rc.d", "/etc/resolv.conf", \
        "/etc/.resolv.conf.amiforge"
    treepath.write_file(root, policy, "#!/bin/sh\nexit 101\n", mode=0o755, replace_link=True)
    resolv_host = treepath.in_root(root, resolv, follow_last=False)
    had_resolv = resolv_host.is_symlink() or resolv_host.exists()
    if had_resolv:
        os.replace(resolv_host, treepath.in_root(root, saved, follow_last=False))
    try:
        if Path("/etc/resolv.conf").exists():
            treepath.copy_in(root, Path("/etc/resolv.conf"), resolv, 0o644)
        if apt_auth:
            treepath.write_file(root, AUTH_FILE, apt_auth, mode=0o600, replace_link=True)
        yield
    finally:  # the scripts may have changed the tree: resolve everything again
        treepath.remove(root, AUTH_FILE)
        treepath.remove(root, policy)
        treepath.remove(root, resolv)
        if had_resolv:  # unless a script removed it: then the image has none, as it asked
            with contextlib.suppress(FileNotFoundError):
                os.replace(treepath.in_root(root, saved, follow_last=False),
                           treepath.in_root(root, resolv, follow_last=False))
