"""The commit a recipe's git repository has checked out, read from the repository's files.

git itself is not run: a recipe's repository comes from a pull request, and git reads the
repository's own configuration (core.fsmonitor runs a command; hooks; includes), which is
not for amiforge to execute as root. HEAD, the ref it names (loose or packed) and a
worktree's commondir are plain files; anything else (an unusual layout, a symbolic ref
chain, a detached HEAD in another form) gives None, not a guess."""

from __future__ import annotations

import re
from pathlib import Path

OBJECT_ID = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")  # SHA-1 or SHA-256
REF = re.compile(r"^refs/[A-Za-z0-9._/-]+$")
LIMIT = 1 << 20


def checked_out_commit(path: Path) -> str | None:
    """The commit id of HEAD of the repository that holds ``path``, or None."""
    gitdir = _gitdir(path.resolve().parent)
    if gitdir is None:
        return None
    head = _read(gitdir / "HEAD")
    if head is None:
        return None
    if OBJECT_ID.match(head):
        return head
    ref = head.removeprefix("ref: ").strip()
    if not head.startswith("ref: ") or not REF.match(ref) or ".." in ref:
        return None
    common = gitdir
    commondir = _read(gitdir / "commondir")
    if commondir:
        common = (gitdir / commondir).resolve()
    for base in dict.fromkeys((gitdir, common)):
        loose = _read(base / ref)
        if loose is not None:
            return loose if OBJECT_ID.match(loose) else None
    return _packed(common / "packed-refs", ref)


def _gitdir(folder: Path) -> Path | None:
    for candidate in (folder, *folder.parents):
        dotgit = candidate / ".git"
        if dotgit.is_dir():
            return dotgit
        if dotgit.is_file():  # a worktree or submodule: "gitdir: PATH"
            text = _read(dotgit) or ""
            return (candidate / text[8:]).resolve() if text.startswith("gitdir: ") else None
    return None


def _packed(path: Path, ref: str) -> str | None:
    text = _read(path, keep_lines=True)
    for line in (text or "").splitlines():
        object_id, _, name = line.partition(" ")
        if name == ref and OBJECT_ID.match(object_id):
            return object_id
    return None


def _read(path: Path, keep_lines: bool = False) -> str | None:
    try:
        if not path.is_file():
            return None
        with open(path, encoding="ascii", errors="strict") as handle:
            text = handle.read(LIMIT)
    except (OSError, UnicodeDecodeError):
        return None
    return text if keep_lines else text.strip()
