"""Layered trees: a cached tree is the read-only lower layer of an overlay mount and the
build's changes go to an upper folder of its own, instead of copying ~9000 files for every
rebuild. A configured tree is then kept in the cache as its upper folder alone (a few MiB).

The mounts live in the build process's own mount namespace, entered before it starts any
thread: they vanish with the process, even when it is killed, and the host never sees them.
Where that is not possible (not root, no overlayfs, an upper folder on a filesystem that
overlayfs refuses, as inside some containers) the build copies trees as before."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from builder.errors import ToolFailed
from builder.host.run import run

log = logging.getLogger("amiforge.overlay")
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
_UNSAFE_IN_OPTIONS = (",", ":", "\\", "\n")
_private = False


def enter_private_mount_namespace() -> bool:
    """Move this process into a mount namespace of its own, with nothing propagated back
    to the host. Call it before the process starts threads (the namespace is per thread)."""
    global _private
    if _private:
        return True
    if os.geteuid() != 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        log.info("    no private mount namespace: %s", os.strerror(ctypes.get_errno()))
        return False
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        log.info("    cannot make mounts private: %s", os.strerror(ctypes.get_errno()))
        return False
    _private = True
    return True


def overlay_options(lowers: Sequence[Path], upper: Path | None, work: Path | None) -> str:
    """overlayfs mount options; the first lower layer is the topmost."""
    options = "lowerdir=" + ":".join(str(p) for p in lowers)
    if upper is not None and work is not None:
        options += f",upperdir={upper},workdir={work}"
    return options


def usable(*paths: Path) -> bool:
    """Whether layered trees can be used here for these paths."""
    return _private and not any(c in str(p) for p in paths for c in _UNSAFE_IN_OPTIONS)


@contextlib.contextmanager
def mounted(target: Path, lowers: Sequence[Path], upper: Path | None = None,
            work: Path | None = None) -> Iterator[None]:
    """``target`` shows the layers (read-only without ``upper``) until the block ends.
    Raises ToolFailed if overlayfs refuses the layers."""
    for folder in (target, upper, work):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "overlay", "overlay", "-o", overlay_options(lowers, upper, work),
         str(target)])
    try:
        yield
    finally:
        try:
            run(["umount", str(target)])
        except ToolFailed:  # still busy (an interrupted tool): detach it
            run(["umount", "--lazy", str(target)])


def try_mount(stack: contextlib.ExitStack, target: Path, lowers: Sequence[Path],
              upper: Path | None = None, work: Path | None = None) -> bool:
    """Mount the layers at ``target`` for the life of ``stack``; False if not possible."""
    if not usable(target, *lowers, *(p for p in (upper, work) if p is not None)):
        return False
    try:
        stack.enter_context(mounted(target, lowers, upper, work))
    except ToolFailed as exc:
        log.info("    overlayfs not usable here, copying trees instead: %s", exc)
        return False
    return True
