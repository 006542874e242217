"""apt's downloaded packages (.deb files), shared by every build that uses one cache.

Builds that run at once (``-j N``, or two CI jobs on one cache) read and fill the same
folder. Handed to mmdebstrap's sync-in and sync-out, it was archived by tar while another
build wrote into it, and tar fails on a folder or file that changes as it reads it (seen
in CI: "special hook failed" in the setup of a bootstrap). So mmdebstrap gets a private
copy of the folder instead (hard links where they can be made), and the new packages go
into the shared folder afterwards, each written beside it and renamed into it whole. A
package in the shared folder is never changed afterwards, so reading it takes no lock."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def private_copy(shared: Path, private: Path) -> None:
    """PRIVATE (new) holds the .deb files of SHARED as they are now."""
    private.mkdir(parents=True)
    for name in _packages(shared):
        try:
            os.link(shared / name, private / name)
        except OSError:  # another filesystem (or links refused): a copy
            shutil.copyfile(shared / name, private / name)


def publish(private: Path, shared: Path) -> list[str]:
    """Put into SHARED each .deb file of PRIVATE it lacks, whole: written in a folder
    beside it (the same filesystem, out of what private_copy reads), then renamed in.
    Returns the names added."""
    folder = shared.resolve()
    incoming = folder.parent / f".{folder.name}.incoming"
    incoming.mkdir(exist_ok=True)
    known = set(_packages(folder))
    added = []
    for name in _packages(private):
        if name in known:
            continue
        partial = incoming / f"{name}.{os.getpid()}"
        try:
            shutil.copyfile(private / name, partial)
            os.chmod(partial, 0o644)
            os.replace(partial, folder / name)
        finally:
            partial.unlink(missing_ok=True)
        added.append(name)
    return added


def _packages(folder: Path) -> list[str]:
    """The names of FOLDER's regular .deb files (no links, no folders)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries
                      if e.name.endswith(".deb") and e.is_file(follow_symlinks=False))
