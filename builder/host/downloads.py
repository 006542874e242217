"""apt's downloaded packages (.deb files), shared by every build that uses one cache.

Builds that run at once (``-j N``, or two CI jobs on one cache) read and fill the same
folder. Handed to mmdebstrap's sync-in and sync-out, it was archived by tar while another
build wrote into it, and tar fails on a folder or file that changes as it reads it (seen
in CI: "special hook failed" in the setup of a bootstrap). So mmdebstrap gets a private
copy of the folder instead (hard links where they can be made), and the new packages go
into the shared folder afterwards, each written under a hidden random name there (never
read as a package) and renamed to its own name whole. A package in the shared folder is
never changed afterwards, so reading it takes no lock. (The hard links cannot carry the
tree's writes back: mmdebstrap's untar replaces a file rather than writing into it.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from builder.host.fsutil import atomic_copy


def private_copy(shared: Path, private: Path) -> None:
    """PRIVATE (new) holds the .deb files of SHARED as they are now."""
    private.mkdir(parents=True)
    for name in _packages(shared):
        try:
            os.link(shared / name, private / name)
        except OSError:  # another filesystem (or links refused): a copy
            shutil.copyfile(shared / name, private / name)


def publish(private: Path, shared: Path) -> list[str]:
    """Put into SHARED each .deb file of PRIVATE it lacks, whole: written to a new file of
    a random hidden name in SHARED (created exclusively: no link planted there is followed;
    the same filesystem, even when SHARED is a mount point; its name never ends in .deb),
    then renamed to its name. Returns the names added."""
    known = set(_packages(shared))
    added = [name for name in _packages(private) if name not in known]
    for name in added:
        atomic_copy(private / name, shared / name)
    return added


def _packages(folder: Path) -> list[str]:
    """The names of FOLDER's regular .deb files (no links, no folders)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries
                      if e.name.endswith(".deb") and e.is_file(follow_symlinks=False))
